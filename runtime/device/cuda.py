"""Thin wrappers over cuda-python's driver API (``cuda.bindings.driver``): device, stream, buffers, events,
modules, launches and graphs. Every call goes through ``call(name, ...)``, which checks its ``CUresult`` and
raises ``CudaError`` naming the call, the CUDA error and what to do.

The device's *primary* context is made current, so TensorRT and ONNX Runtime (which use the CUDA runtime
API, i.e. the primary context) share our buffers and our stream. ``use_driver`` swaps the driver module
(the tests' ``tests/hostsim.py`` supplies a CPU stand-in).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError, DDPMError, MissingDependencyError, OutOfMemoryError, option

log = logging.getLogger(__name__)

INSTALL_GPU = "pip install cuda-python==13.4.4 nvidia-cuda-nvrtc==13.4.92"
NO_GPU_HINT = ("the GPU runtime needs an NVIDIA GPU with a CUDA 13 driver (580 or newer); on a machine "
               "without one, sample with ONNX Runtime on the CPU (ddpm-run sample --onnx … --device cpu)")
# The oldest driver API version (cuDriverGetVersion: 1000 * major + 10 * minor) the cuda-python 13 bindings work
# with. An older driver can pass cuInit and fail later at an unrelated-looking call, so query_device checks it.
MIN_DRIVER_VERSION = 13000


class CudaError(DDPMError):
    """A CUDA driver call failed; the message names the call and the CUDA error."""


class NoDeviceError(CudaError):
    """No usable GPU: cuda-python, the NVIDIA driver or a GPU is missing, or the driver is too old."""


_HINTS = {
    "CUDA_ERROR_NO_DEVICE": "no NVIDIA GPU is visible to this process: check `nvidia-smi` and CUDA_VISIBLE_DEVICES",
    "CUDA_ERROR_CALL_REQUIRES_NEWER_DRIVER": "the NVIDIA driver is older than this cuda-python (CUDA 13) needs: "
                                             "upgrade the driver to 580 or newer",
    "CUDA_ERROR_STUB_LIBRARY": "the libcuda.so found is the CUDA toolkit's stub, not a driver: install the NVIDIA "
                               "driver (580 or newer)",
    "CUDA_ERROR_DEVICE_UNAVAILABLE": "the GPU is busy or in exclusive-process mode: check `nvidia-smi`",
    "CUDA_ERROR_SYSTEM_DRIVER_MISMATCH": "the NVIDIA kernel module and user-space driver versions differ: "
                                         "reboot or reinstall the driver",
    "CUDA_ERROR_UNSUPPORTED_PTX_VERSION": "the driver is older than the NVRTC that made the PTX: upgrade the "
                                          "driver, or install the nvidia-cuda-nvrtc wheel matching it",
    "CUDA_ERROR_NO_BINARY_FOR_GPU": "the kernels were compiled for another GPU architecture",
    "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED": "an operation is not allowed in a CUDA graph: run without graphs",
    "CUDA_ERROR_STREAM_CAPTURE_INVALIDATED": "the CUDA graph capture was invalidated: run without graphs",
}
_NO_DEVICE = {"CUDA_ERROR_NO_DEVICE", "CUDA_ERROR_CALL_REQUIRES_NEWER_DRIVER", "CUDA_ERROR_STUB_LIBRARY",
              "CUDA_ERROR_SYSTEM_DRIVER_MISMATCH", "CUDA_ERROR_COMPAT_NOT_SUPPORTED_ON_DEVICE",
              "CUDA_ERROR_DEVICE_UNAVAILABLE", "CUDA_ERROR_INVALID_DEVICE"}

_DRIVER = None


def driver():
    """The ``cuda.bindings.driver`` module (or the stand-in set by ``use_driver``)."""
    global _DRIVER
    if _DRIVER is None:
        try:
            module = importlib.import_module("cuda.bindings.driver")
        except ImportError:
            raise MissingDependencyError("cuda-python", "The GPU runtime", INSTALL_GPU) from None
        _DRIVER = module
    return _DRIVER


def use_driver(module):
    """Use ``module`` as the driver API from now on (None: the real one); returns the previous module."""
    global _DRIVER
    previous, _DRIVER = _DRIVER, module
    return previous


def _error_name(d, err) -> tuple[str, str]:
    try:
        name = d.cuGetErrorName(err)[1].decode()
        text = d.cuGetErrorString(err)[1].decode()
    except Exception:  # the lookup needs libcuda too; fall back to the enum's name
        name, text = getattr(err, "name", str(err)), ""
    return name, text


class CudaOutOfMemoryError(CudaError, OutOfMemoryError):
    """CUDA_ERROR_OUT_OF_MEMORY: a CudaError and the project's OutOfMemoryError alike."""


def error_for(call_name: str, err) -> CudaError:
    """The exception for a failed call: NoDeviceError for the 'no usable GPU' codes, CudaOutOfMemoryError for
    CUDA_ERROR_OUT_OF_MEMORY, else CudaError."""
    name, text = _error_name(driver(), err)
    hint = _HINTS.get(name)
    if name == "CUDA_ERROR_OUT_OF_MEMORY":  # --batch in a CLI, batch in the API
        hint = f"the GPU is out of memory: use a smaller {option('batch')} or free the GPU"
    msg = f"{call_name} failed: {name}" + (f" ({text})" if text else "") + (f"; {hint}" if hint else "")
    if name == "CUDA_ERROR_OUT_OF_MEMORY":
        return CudaOutOfMemoryError(msg)
    return (NoDeviceError if name in _NO_DEVICE else CudaError)(msg)


def _is_library_missing(exc: BaseException) -> bool:
    return any(c.__name__ == "DynamicLibNotFoundError" for c in type(exc).__mro__)


def check(call_name: str, result):
    """Raise for a failed ``result`` (a CUresult or a tuple starting with one); return the other values."""
    d = driver()
    err, rest = (result[0], result[1:]) if isinstance(result, tuple) else (result, ())
    if err != d.CUresult.CUDA_SUCCESS:
        raise error_for(call_name, err)
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else rest


def call(name: str, *args, label: str | None = None):
    """``driver().<name>(*args)``, checked; ``label`` replaces the name in messages (e.g. with the kernel)."""
    fn = getattr(driver(), name)
    try:
        result = fn(*args)
    except RuntimeError as e:
        if _is_library_missing(e):
            raise NoDeviceError(
                f"{label or name}: the NVIDIA driver library (libcuda.so.1) was not found: this machine has no "
                f"usable NVIDIA driver; {NO_GPU_HINT}"
            ) from None
        if "not found" in str(e):  # the binding found no such symbol in libcuda: an older driver
            raise NoDeviceError(f"{label or name}: {e}; the NVIDIA driver is older than this cuda-python (CUDA 13) "
                                f"needs: upgrade it to 580 or newer") from None
        raise
    return check(label or name, result)


# ----------------------------------------------------------------------------------------------- device


@dataclass(frozen=True)
class DeviceProps:
    ordinal: int
    name: str
    compute_capability: tuple[int, int]
    total_memory: int
    multiprocessors: int
    driver_version: tuple[int, int]

    def to_dict(self) -> dict:
        return {"ordinal": self.ordinal, "name": self.name,
                "compute_capability": f"{self.compute_capability[0]}.{self.compute_capability[1]}",
                "total_memory_mib": self.total_memory >> 20, "multiprocessors": self.multiprocessors,
                "driver_cuda_version": f"{self.driver_version[0]}.{self.driver_version[1]}"}


def _attribute(attr_name: str, dev) -> int:
    d = driver()
    return int(call("cuDeviceGetAttribute", getattr(d.CUdevice_attribute, attr_name), dev))


def _cuda_version(version: int) -> str:
    """``cuDriverGetVersion``'s integer as "major.minor" (12040 -> "12.4")."""
    return f"{version // 1000}.{version % 1000 // 10}"


def check_driver_version(version: int) -> int:
    """``version`` (from ``cuDriverGetVersion``) if it is at least MIN_DRIVER_VERSION, else NoDeviceError."""
    if version < MIN_DRIVER_VERSION:
        raise NoDeviceError(
            f"the NVIDIA driver supports CUDA {_cuda_version(version)} (cuDriverGetVersion: {version}), but this "
            f"cuda-python needs CUDA {_cuda_version(MIN_DRIVER_VERSION)} or newer (driver 580 or newer on Linux): "
            f"upgrade the NVIDIA driver, or sample on the CPU (ddpm-run sample --onnx … --device cpu)"
        )
    return version


def query_device(ordinal: int = 0) -> DeviceProps:
    """Initialise the driver and describe GPU ``ordinal``; NoDeviceError if there is none or the driver is too
    old (below MIN_DRIVER_VERSION)."""
    call("cuInit", 0)
    version = check_driver_version(int(call("cuDriverGetVersion")))
    count = int(call("cuDeviceGetCount"))
    if count == 0:
        raise NoDeviceError(f"cuDeviceGetCount found no CUDA device; {NO_GPU_HINT}")
    if not 0 <= ordinal < count:
        raise ConfigError(f"GPU index must be in [0, {count - 1}] (this machine has {count}), found {ordinal}")
    dev = call("cuDeviceGet", ordinal)
    raw = call("cuDeviceGetName", 256, dev)
    name = (raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)).split("\0")[0].strip()
    cc = (_attribute("CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR", dev),
          _attribute("CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR", dev))
    return DeviceProps(ordinal, name, cc, int(call("cuDeviceTotalMem", dev)),
                       _attribute("CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT", dev), (version // 1000, version % 1000 // 10))


class Device:
    """GPU ``ordinal`` with its primary context current on this thread. A context manager."""

    def __init__(self, ordinal: int = 0):
        self.props = query_device(ordinal)
        self.handle = call("cuDeviceGet", ordinal)
        self.context = call("cuDevicePrimaryCtxRetain", self.handle)
        self._open = True
        self.make_current()

    def make_current(self) -> None:
        call("cuCtxSetCurrent", self.context)

    def synchronize(self) -> None:
        call("cuCtxSynchronize")

    def close(self) -> None:
        if self._open:
            self._open = False
            call("cuDevicePrimaryCtxRelease", self.handle)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ----------------------------------------------------------------------------------------------- resources


class Stream:
    """A non-blocking CUDA stream; ``handle_int`` is what TensorRT and ONNX Runtime take."""

    def __init__(self):
        self.handle = call("cuStreamCreate", driver().CUstream_flags.CU_STREAM_NON_BLOCKING)

    @property
    def handle_int(self) -> int:
        return int(self.handle)

    def synchronize(self) -> None:
        call("cuStreamSynchronize", self.handle)

    def close(self) -> None:
        if self.handle is not None:
            handle, self.handle = self.handle, None
            call("cuStreamDestroy", handle)


class DeviceArray:
    """``cuMemAlloc`` memory for ``count`` elements of ``dtype``; copies are asynchronous on a stream."""

    def __init__(self, count: int, dtype):
        self.dtype = np.dtype(dtype)
        self.count = int(count)
        self.nbytes = max(self.count * self.dtype.itemsize, 4)
        self.ptr = call("cuMemAlloc", self.nbytes)

    @property
    def address(self) -> int:
        return int(self.ptr)

    def _host(self, host: np.ndarray, what: str) -> np.ndarray:
        if host.dtype != self.dtype or not host.flags.c_contiguous or host.size > self.count:
            raise ValueError(f"{what}: expected a C-contiguous {self.dtype} array of at most {self.count} "
                             f"elements, found {host.dtype} {host.shape} (contiguous: {host.flags.c_contiguous})")
        return host

    def upload(self, host: np.ndarray, stream: Stream) -> None:
        host = self._host(np.ascontiguousarray(host), "upload")
        if host.size:
            call("cuMemcpyHtoDAsync", self.ptr, host.ctypes.data, host.nbytes, stream.handle)

    def upload_at(self, host: np.ndarray, offset: int, stream: Stream) -> None:
        """Copy ``host`` to elements ``offset`` … ``offset + host.size − 1``."""
        host = np.ascontiguousarray(host, dtype=self.dtype)
        if offset < 0 or offset + host.size > self.count:
            raise ValueError(f"upload_at: elements {offset}..{offset + host.size} outside the {self.count} allocated")
        if host.size:
            call("cuMemcpyHtoDAsync", self.address + offset * self.dtype.itemsize, host.ctypes.data, host.nbytes,
                 stream.handle)

    def download(self, out: np.ndarray, stream: Stream) -> np.ndarray:
        """Copy the first ``out.size`` elements into ``out`` (returns after the copy has finished)."""
        self._host(out, "download")
        if out.size:
            call("cuMemcpyDtoHAsync", out.ctypes.data, self.ptr, out.nbytes, stream.handle)
            stream.synchronize()
        return out

    def fill32(self, value: int, stream: Stream, count: int | None = None) -> None:
        """Set ``count`` (default: all) 32-bit words to ``value``."""
        if self.dtype.itemsize != 4:
            raise ValueError(f"fill32 needs a 4-byte dtype, this array holds {self.dtype}")
        call("cuMemsetD32Async", self.ptr, int(value) & 0xFFFFFFFF, self.count if count is None else count,
             stream.handle)

    def close(self) -> None:
        if self.ptr is not None:
            ptr, self.ptr = self.ptr, None
            call("cuMemFree", ptr)


class Event:
    def __init__(self):
        self.handle = call("cuEventCreate", driver().CUevent_flags.CU_EVENT_DEFAULT)

    def record(self, stream: Stream) -> None:
        call("cuEventRecord", self.handle, stream.handle)

    def synchronize(self) -> None:
        call("cuEventSynchronize", self.handle)

    def elapsed_ms(self, end: "Event") -> float:
        return float(call("cuEventElapsedTime", self.handle, end.handle))

    def close(self) -> None:
        if self.handle is not None:
            handle, self.handle = self.handle, None
            call("cuEventDestroy", handle)


# ----------------------------------------------------------------------------------------------- code


_ARG_DTYPES = {"ptr": np.uint64, "u32": np.uint32, "i32": np.int32}
_ARG_RANGES = {"ptr": (0, 2**64 - 1), "u32": (0, 2**32 - 1), "i32": (-(2**31), 2**31 - 1)}


def pack_args(kernel: str, signature: Sequence[str], values: Sequence) -> tuple[list[np.ndarray], np.ndarray]:
    """The ``kernelParams`` array (void**, as uint64) of a launch and the buffers it points into (keep them
    alive until the launch call returns)."""
    if len(values) != len(signature):
        raise ValueError(f"{kernel} takes {len(signature)} arguments {tuple(signature)}, got {len(values)}")
    holders = []
    for k, (kind, v) in enumerate(zip(signature, values)):
        v = int(v)
        lo, hi = _ARG_RANGES[kind]
        if not lo <= v <= hi:
            raise ValueError(f"{kernel} argument {k} ({kind}) must be in [{lo}, {hi}], found {v}")
        holders.append(np.array([v], dtype=_ARG_DTYPES[kind]))
    return holders, np.array([h.ctypes.data for h in holders], dtype=np.uint64)


class Module:
    """A loaded CUBIN/PTX image and its kernels (``signatures``: name -> argument kinds)."""

    def __init__(self, image: bytes, signatures: dict[str, tuple[str, ...]]):
        self.handle = call("cuModuleLoadData", image)
        self.signatures = dict(signatures)
        self._functions = {name: call("cuModuleGetFunction", self.handle, name.encode(), label=f"cuModuleGetFunction({name})")
                           for name in self.signatures}

    def launch(self, name: str, grid: tuple[int, int, int], block: tuple[int, int, int], args: Sequence,
               stream: Stream) -> None:
        _holders, params = pack_args(name, self.signatures[name], args)
        call("cuLaunchKernel", self._functions[name], *grid, *block, 0, stream.handle, params.ctypes.data, 0,
             label=f"cuLaunchKernel({name})")

    def close(self) -> None:
        if self.handle is not None:
            handle, self.handle = self.handle, None
            call("cuModuleUnload", handle)


class Graph:
    """A CUDA graph captured from the work ``record(stream)`` enqueues, instantiated for replay."""

    def __init__(self, stream: Stream, record: Callable[[Stream], None]):
        d = driver()
        call("cuStreamBeginCapture", stream.handle, d.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        try:
            record(stream)
        except BaseException:
            graph = d.cuStreamEndCapture(stream.handle)  # end the capture whatever happened; then re-raise
            if isinstance(graph, tuple) and len(graph) > 1 and graph[0] == d.CUresult.CUDA_SUCCESS:
                d.cuGraphDestroy(graph[1])
            raise
        self.graph = call("cuStreamEndCapture", stream.handle)
        try:
            self.exec = call("cuGraphInstantiate", self.graph, 0)
        except CudaError:
            call("cuGraphDestroy", self.graph)
            raise

    def node_types(self) -> list[str]:
        """The captured graph's node types by name (``CU_GRAPH_NODE_TYPE_KERNEL``, ``..._HOST``, ...)."""
        _, count = call("cuGraphGetNodes", self.graph, 0)
        if not count:
            return []
        nodes, _ = call("cuGraphGetNodes", self.graph, int(count))
        return [call("cuGraphNodeGetType", node).name for node in nodes if node is not None]

    def launch(self, stream: Stream) -> None:
        call("cuGraphLaunch", self.exec, stream.handle)

    def close(self) -> None:
        if self.graph is not None:
            graph, self.graph = self.graph, None
            call("cuGraphExecDestroy", self.exec)
            call("cuGraphDestroy", graph)


class GpuContext:
    """A GPU (primary context current) and the stream everything runs on. A context manager."""

    def __init__(self, ordinal: int = 0):
        self.device = Device(ordinal)
        try:
            self.stream = Stream()
        except BaseException:
            self.device.close()
            raise
        self.props = self.device.props

    def close(self) -> None:
        try:
            self.stream.close()
        finally:
            self.device.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
