"""A CPU stand-in for the CUDA driver API, for testing the device loop on machines without a GPU.

``HostDriver`` implements the ``cuda.bindings.driver`` calls that ``device.cuda`` makes, with host memory
as "device" memory and the kernels compiled from the *same* source as the GPU build by the host C++
compiler (``kernels.kernel_source`` compiles as C++ too: each kernel body loops over its threads). Streams
run synchronously; stream capture records launches into a graph that ``cuGraphLaunch`` replays, and the
capture-unsafe calls (synchronize, copies) fail during capture as they do on a GPU. Enums and handle types
come from the real ``cuda.bindings.driver``, so cuda-python must be installed (no driver or GPU needed).

    with HostDriver.installed() as drv:   # device.cuda now talks to the host stand-in
        ...                               # GpuContext(), DeviceSampler(...) etc. run on the CPU

Not a simulator of GPU timing, concurrency or numerics of the device's libm: it checks the loop's logic.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import itertools
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from ddpm_deploy.runtime.backends.base import DeviceRunner, Runner
from ddpm_deploy.runtime.device import cuda, kernels

_CTYPES = {"ptr": ctypes.c_void_p, "u32": ctypes.c_uint32, "i32": ctypes.c_int32}
_READ = {"ptr": ctypes.c_uint64, "u32": ctypes.c_uint32, "i32": ctypes.c_int32}
CXX_FLAGS = ("-O2", "-std=c++17", "-ffp-contract=off", "-fno-fast-math", "-fPIC", "-shared")


def host_compiler() -> str | None:
    for name in ("g++", "c++", "clang++"):
        if path := shutil.which(name):
            return path
    return None


def build_host_library(source: str, cache_dir: str | Path | None = None) -> ctypes.CDLL:
    """Compile ``source`` as host C++ into a shared library (cached by the source's hash) and load it."""
    cxx = host_compiler()
    if cxx is None:
        raise RuntimeError("the host simulation needs a C++ compiler (g++, c++ or clang++) on PATH")
    digest = hashlib.sha256((source + " ".join(CXX_FLAGS)).encode()).hexdigest()[:16]
    out_dir = Path(cache_dir or Path(tempfile.gettempdir()) / "ddpm-hostsim")
    out_dir.mkdir(parents=True, exist_ok=True)
    lib = out_dir / f"kernels-{digest}.so"
    if not lib.exists():
        src = out_dir / f"kernels-{digest}.cpp"
        src.write_text(source)
        tmp = lib.with_suffix(".tmp.so")
        proc = subprocess.run([cxx, *CXX_FLAGS, str(src), "-o", str(tmp)], capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"host compile of the kernel source failed:\n{proc.stderr}")
        tmp.replace(lib)
    return ctypes.CDLL(str(lib))


class _Handle:
    _ids = itertools.count(1)

    def __init__(self, kind: str, **attrs):
        self.kind, self.id = kind, next(self._ids)
        self.__dict__.update(attrs)

    def __int__(self):
        return self.id

    def __repr__(self):
        return f"<hostsim {self.kind} {self.id}>"


class HostDriver:
    """The driver-API subset used by ``device.cuda``, on the CPU. ``fail[name] = CUresult`` makes the next
    call of ``name`` return that error; ``calls`` counts the calls by name."""

    def __init__(self, extra_source: str = "", signatures: dict[str, tuple[str, ...]] | None = None,
                 compute_capability: tuple[int, int] = (9, 0)):
        from cuda.bindings import driver as real

        self._real = real
        self.lib = build_host_library(kernels.kernel_source() + extra_source)
        self.signatures = {**kernels.SIGNATURES, **(signatures or {})}
        self.cc = compute_capability
        self.memory: dict[int, ctypes.Array] = {}
        self.capturing: dict[int, list] = {}
        self.fail: dict[str, object] = {}
        self.calls: dict[str, int] = {}

    def __getattr__(self, name):  # enums and handle types: the real module's
        return getattr(self._real, name)

    @classmethod
    @contextlib.contextmanager
    def installed(cls, *args, **kwargs):
        drv = cls(*args, **kwargs)
        previous = cuda.use_driver(drv)
        try:
            yield drv
        finally:
            cuda.use_driver(previous)

    # ---------------------------------------------------------------------------------------- plumbing

    def _ok(self, name: str, *values):
        self.calls[name] = self.calls.get(name, 0) + 1
        if name in self.fail:
            return (self.fail.pop(name), *([None] * len(values)))
        return (self._real.CUresult.CUDA_SUCCESS, *values)

    def _injected(self, name: str):
        """The injected failure of ``name``, returned before the call has any effect (None: no failure)."""
        return self._ok(name) if name in self.fail else None

    def _err(self, name: str, code: str):
        self.calls[name] = self.calls.get(name, 0) + 1
        return (getattr(self._real.CUresult, code),)

    def _run(self, op) -> None:
        if op[0] == "host":  # a host callback: fn(user_data), as the driver would call it
            if op[1] is not None:
                op[1](op[2])
            return
        name, grid, block, values = op
        for var, v in zip(("ddpm_grid_x", "ddpm_grid_y", "ddpm_block_x"), (grid[0], grid[1], block[0])):
            ctypes.c_uint.in_dll(self.lib, var).value = v
        fn = getattr(self.lib, name)
        fn.restype = None
        fn.argtypes = [_CTYPES[k] for k in self.signatures[name]]
        fn(*values)

    # ---------------------------------------------------------------------------------------- device

    def cuInit(self, flags):
        return self._ok("cuInit")

    def cuDeviceGetCount(self):
        return self._ok("cuDeviceGetCount", 1)

    def cuDeviceGet(self, ordinal):
        return self._ok("cuDeviceGet", self._real.CUdevice(ordinal))

    def cuDeviceGetName(self, length, dev):
        return self._ok("cuDeviceGetName", b"hostsim CPU stand-in\0")

    def cuDeviceGetAttribute(self, attr, dev):
        A = self._real.CUdevice_attribute
        values = {A.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR: self.cc[0],
                  A.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR: self.cc[1],
                  A.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT: 1}
        return self._ok("cuDeviceGetAttribute", values.get(attr, 0))

    def cuDriverGetVersion(self):
        return self._ok("cuDriverGetVersion", 13000)

    def cuDeviceTotalMem(self, dev):
        return self._ok("cuDeviceTotalMem", 1 << 34)

    def cuDevicePrimaryCtxRetain(self, dev):
        return self._ok("cuDevicePrimaryCtxRetain", _Handle("context"))

    def cuCtxSetCurrent(self, ctx):
        return self._ok("cuCtxSetCurrent")

    def cuCtxSynchronize(self):
        return self._ok("cuCtxSynchronize")

    def cuDevicePrimaryCtxRelease(self, dev):
        return self._ok("cuDevicePrimaryCtxRelease")

    def cuGetErrorName(self, err):
        return (self._real.CUresult.CUDA_SUCCESS, err.name.encode())

    def cuGetErrorString(self, err):
        return (self._real.CUresult.CUDA_SUCCESS, f"hostsim: {err.name}".encode())

    # ---------------------------------------------------------------------------------------- memory

    def cuMemAlloc(self, nbytes):
        buf = (ctypes.c_uint8 * int(nbytes))()
        ctypes.memset(buf, 0xFF, int(nbytes))  # NaN / 0xFFFFFFFF: uninitialised reads show up
        self.memory[ctypes.addressof(buf)] = buf
        return self._ok("cuMemAlloc", self._real.CUdeviceptr(ctypes.addressof(buf)))

    def cuMemFree(self, ptr):
        if failed := self._injected("cuMemFree"):
            return failed
        self.memory.pop(int(ptr))
        return self._ok("cuMemFree")

    def _capturing(self, stream) -> bool:
        return int(stream) in self.capturing

    def cuMemcpyHtoDAsync(self, dst, src, nbytes, stream):
        if failed := self._injected("cuMemcpyHtoDAsync"):
            return failed
        if self._capturing(stream):
            return self._err("cuMemcpyHtoDAsync", "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED")
        ctypes.memmove(int(dst), int(src), int(nbytes))
        return self._ok("cuMemcpyHtoDAsync")

    def cuMemcpyDtoHAsync(self, dst, src, nbytes, stream):
        if failed := self._injected("cuMemcpyDtoHAsync"):
            return failed
        if self._capturing(stream):
            return self._err("cuMemcpyDtoHAsync", "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED")
        ctypes.memmove(int(dst), int(src), int(nbytes))
        return self._ok("cuMemcpyDtoHAsync")

    def cuMemsetD32Async(self, ptr, value, count, stream):
        if failed := self._injected("cuMemsetD32Async"):
            return failed
        if self._capturing(stream):
            return self._err("cuMemsetD32Async", "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED")
        (ctypes.c_uint32 * int(count)).from_address(int(ptr))[:] = [int(value)] * int(count)
        return self._ok("cuMemsetD32Async")

    # ---------------------------------------------------------------------------------------- streams, events

    def cuStreamCreate(self, flags):
        return self._ok("cuStreamCreate", self._real.CUstream(next(_Handle._ids)))

    def cuStreamDestroy(self, stream):
        return self._ok("cuStreamDestroy")

    def cuStreamSynchronize(self, stream):
        if self._capturing(stream):
            return self._err("cuStreamSynchronize", "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED")
        return self._ok("cuStreamSynchronize")

    def cuEventCreate(self, flags):
        return self._ok("cuEventCreate", _Handle("event", time=None))

    def cuEventRecord(self, event, stream):
        if self._capturing(stream):
            return self._err("cuEventRecord", "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED")
        event.time = time.perf_counter()
        return self._ok("cuEventRecord")

    def cuEventSynchronize(self, event):
        return self._ok("cuEventSynchronize")

    def cuEventElapsedTime(self, start, end):
        if start.time is None or end.time is None:
            return self._err("cuEventElapsedTime", "CUDA_ERROR_INVALID_HANDLE")
        return self._ok("cuEventElapsedTime", (end.time - start.time) * 1e3)

    def cuEventDestroy(self, event):
        return self._ok("cuEventDestroy")

    # ---------------------------------------------------------------------------------------- modules, launches

    def cuModuleLoadData(self, image):
        if not isinstance(image, bytes) or not (image.startswith(b"\x7fELF") or b".entry" in image):
            return self._err("cuModuleLoadData", "CUDA_ERROR_INVALID_IMAGE")
        return self._ok("cuModuleLoadData", _Handle("module"))

    def cuModuleGetFunction(self, module, name):
        name = name.decode() if isinstance(name, bytes) else name
        if name not in self.signatures or not hasattr(self.lib, name):
            return self._err("cuModuleGetFunction", "CUDA_ERROR_NOT_FOUND")
        return self._ok("cuModuleGetFunction", _Handle("function", name=name))

    def cuModuleUnload(self, module):
        return self._ok("cuModuleUnload")

    def cuLaunchKernel(self, f, gx, gy, gz, bx, by, bz, shared, stream, params, extra):
        if failed := self._injected("cuLaunchKernel"):
            return failed
        if (gy > 65535 or gz != 1 or by != 1 or bz != 1 or bx > 1024) or not isinstance(params, int):
            return self._err("cuLaunchKernel", "CUDA_ERROR_INVALID_VALUE")
        values = []
        for k, kind in enumerate(self.signatures[f.name]):
            arg = ctypes.c_uint64.from_address(params + 8 * k).value
            values.append(_READ[kind].from_address(arg).value)
        op = (f.name, (gx, gy), (bx,), values)
        if self._capturing(stream):
            self.capturing[int(stream)].append(op)
        else:
            self._run(op)
        return self._ok("cuLaunchKernel")

    # ---------------------------------------------------------------------------------------- graphs

    def cuStreamBeginCapture(self, stream, mode):
        self.capturing[int(stream)] = []
        return self._ok("cuStreamBeginCapture")

    def cuStreamEndCapture(self, stream):
        ops = self.capturing.pop(int(stream), None)
        if ops is None:
            return self._err("cuStreamEndCapture", "CUDA_ERROR_ILLEGAL_STATE") + (None,)
        return self._ok("cuStreamEndCapture", _Handle("graph", ops=ops))

    def cuGraphGetNodes(self, graph, num_nodes=0):
        if not num_nodes:
            return self._ok("cuGraphGetNodes", None, len(graph.ops))
        nodes = [_Handle("graph_node", op=op) for op in graph.ops[: int(num_nodes)]]
        return self._ok("cuGraphGetNodes", nodes, len(nodes))

    def cuGraphNodeGetType(self, node):
        kinds = self._real.CUgraphNodeType
        kind = kinds.CU_GRAPH_NODE_TYPE_HOST if node.op[0] == "host" else kinds.CU_GRAPH_NODE_TYPE_KERNEL
        return self._ok("cuGraphNodeGetType", kind)

    def cuLaunchHostFunc(self, stream, fn, user_data):
        """Not used by the runtime: a test backend calls it to put a host callback into a capture."""
        op = ("host", fn, user_data)
        if self._capturing(stream):
            self.capturing[int(stream)].append(op)
        else:
            self._run(op)
        return self._ok("cuLaunchHostFunc")

    def cuGraphInstantiate(self, graph, flags):
        return self._ok("cuGraphInstantiate", _Handle("graph_exec", ops=list(graph.ops)))

    def cuGraphLaunch(self, graph_exec, stream):
        if failed := self._injected("cuGraphLaunch"):
            return failed
        if self._capturing(stream):
            self.capturing[int(stream)].extend(graph_exec.ops)
        else:
            for op in graph_exec.ops:
                self._run(op)
        return self._ok("cuGraphLaunch")

    def cuGraphExecDestroy(self, graph_exec):
        return self._ok("cuGraphExecDestroy")

    def cuGraphDestroy(self, graph):
        return self._ok("cuGraphDestroy")


# ------------------------------------------------------------------------------------------- test ε model

LINEAR_EPS_SOURCE = r"""
DDPM_KERNEL test_eps_linear(float* eps, const float* x, const int* t, unsigned n, int batch, int nan_t, int inf) {
  DDPM_THREADS
  if (ty < (unsigned)batch && tx < n) {
    const size_t off = (size_t)ty * n + tx;
    const float v = __fsub_rn(__fmul_rn(0.1f, x[off]), __fmul_rn(1e-4f, (float)t[ty]));
    eps[off] = t[ty] == nan_t ? (inf ? DDPM_INF : DDPM_NAN) : v;
  }
  DDPM_END_THREADS
}
"""
LINEAR_EPS_SIGNATURES = {"test_eps_linear": ("ptr", "ptr", "ptr", "u32", "i32", "i32", "i32")}


class LinearEpsBackend(Runner, DeviceRunner):
    """A device runner for tests, on a GPU or on ``HostDriver``: ε = 0.1·x − 1e-4·t in float32 (NaN where
    t == ``nan_t``, or +Inf with ``inf``). ``eps(x, t)`` is the same model in NumPy, for the host sampler."""

    device = "cuda"
    uses_graphs = False
    precision = "fp32"

    def __init__(self, gpu, shape, nan_t: int = -1, capture: bool = True, inf: bool = False):
        import math

        self.gpu, self.path, self.sample_shape = gpu, Path("<test-linear>"), tuple(shape)
        self.n, self.nan_t, self.capture, self.inf = math.prod(shape), int(nan_t), capture, int(inf)
        target = kernels.select_target(gpu.props.compute_capability, kernels.supported_archs())
        compiled = kernels.compile_kernels(target, kernels.kernel_source() + LINEAR_EPS_SOURCE)
        self.module = cuda.Module(compiled.image, LINEAR_EPS_SIGNATURES)
        self.args = None

    @property
    def name(self) -> str:
        return "test-linear"

    def bind(self, x: int, t: int, eps: int, batch: int) -> None:
        self.args, self.batch = (eps, x, t, self.n, batch, self.nan_t, self.inf), batch

    def enqueue(self, stream) -> None:
        self.module.launch("test_eps_linear", (-(-self.n // kernels.THREADS), self.batch, 1),
                           (kernels.THREADS, 1, 1), self.args, stream)

    def capturable(self, stream) -> bool:
        return self.capture

    def eps(self, x, t):
        import numpy as np

        out = np.float32(0.1) * x - np.float32(1e-4) * np.asarray(t).astype(np.float32)[:, None, None, None]
        out[np.asarray(t) == self.nan_t] = np.inf if self.inf else np.nan
        return out

    def close(self) -> None:
        self.module.close()
