"""TensorRT / TensorRT-RTX ε backend on device buffers: a plan + its sidecar, run with ``execute_async_v3``.

The plan is refused before it is deserialized when its sidecar is missing, does not describe this plan
file, or says it cannot run with this TensorRT and GPU (``runtime.plan``). Batches outside the plan's
optimisation profile are refused with the profile and what to do. Each batch size is bound once
(``set_input_shape`` + ``set_tensor_address`` on our buffers); ``enqueue`` runs on our stream.

CUDA graphs: a ``tensorrt`` context is captured by the device loop together with our kernels (TensorRT
supports capturing ``enqueueV3``). A TensorRT-RTX context is captured only where ``is_stream_capturable``
says so (plans built with user allocation); otherwise it uses RTX's own graphs (runtime config
``cuda_graph_strategy = WHOLE_GRAPH_CAPTURE``).

TensorRT-RTX compiles its kernels just in time, on the first runs of every new process, unless its runtime cache
is kept: a TensorRT-RTX plan's runner loads ``<plan>.runtime-cache`` (beside the plan; ``runtime_cache`` to choose
another file or ``None`` for none) into the runtime config before the context is made, and writes it back when
the runner closes, if it changed (atomically; a read-only folder is a warning, not an error). TensorRT-RTX itself
refuses a cache made on another GPU, TensorRT-RTX version or an older driver major version (``deserialize``
returns False): then the kernels are compiled again and the file is replaced.
"""

from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ModelCard
from ..contract import INPUT_T, INPUT_X, IO_DTYPES, IO_TEXT, OUTPUT_EPS, PlanSidecar
from ..errors import ArtifactError, ConfigError, DDPMError, MissingDependencyError, option
from ..plan import check_plan_compat, read_plan_sidecar
from .base import DeviceRunner, Runner

log = logging.getLogger(__name__)

FLAVOURS = ("auto", "tensorrt", "rtx")
MIN_TENSORRT_MAJOR = 10
RTX_MODULES = ("tensorrt_rtx_bindings", "tensorrt_rtx")  # the cu13 pip wheels; the name NVIDIA's API docs use
INSTALL = {
    "rtx": "pip install tensorrt-rtx-cu13-bindings==1.7.1.116 tensorrt-rtx-cu13-libs==1.7.1.116",
    "tensorrt": "pip install 'tensorrt>=10' (NVIDIA's wheel, for the CUDA version of this machine)",
}
_REBUILD = PlanSidecar.REWRITE


class TensorRTVersionError(MissingDependencyError):
    """TensorRT is installed but older than the API this package is written against."""

    def __init__(self, version: str, feature: str = "TensorRT"):
        self.package = "tensorrt"
        DDPMError.__init__(self, f"{feature} needs TensorRT >= {MIN_TENSORRT_MAJOR}, found tensorrt {version}; upgrade "
                                 f"with {INSTALL['tensorrt']}, or use TensorRT-RTX: {INSTALL['rtx']}")


def _import_one(flavour: str, feature: str):
    if flavour == "rtx":
        for name in RTX_MODULES:
            try:
                return importlib.import_module(name)
            except ImportError:
                log.debug("module %s is not importable", name)
        raise MissingDependencyError("tensorrt_rtx_bindings", feature, INSTALL["rtx"])
    try:
        trt = importlib.import_module("tensorrt")
    except ImportError:
        raise MissingDependencyError("tensorrt", feature, INSTALL["tensorrt"]) from None
    if int(str(trt.__version__).split(".")[0]) < MIN_TENSORRT_MAJOR:
        raise TensorRTVersionError(trt.__version__, feature)
    return trt


def load_tensorrt(flavour: str = "auto", feature: str = "TensorRT") -> tuple[Any, str]:
    """Import a TensorRT flavour: ``(module, flavour)``; "auto" tries tensorrt, then TensorRT-RTX.
    MissingDependencyError names the wheel to install."""
    if flavour in ("tensorrt", "rtx"):
        return _import_one(flavour, feature), flavour
    if flavour != "auto":
        raise ConfigError(f"TensorRT flavour must be one of {FLAVOURS}, found {flavour!r}")
    try:
        return _import_one("tensorrt", feature), "tensorrt"
    except MissingDependencyError as first:
        log.debug("tensorrt unavailable (%s); trying TensorRT-RTX", first)
        try:
            return _import_one("rtx", feature), "rtx"
        except MissingDependencyError:
            raise MissingDependencyError(
                "tensorrt", f"{feature} (neither tensorrt nor tensorrt_rtx_bindings imports)",
                f"{INSTALL['rtx']}  -- or NVIDIA's TensorRT: {INSTALL['tensorrt']}",
            ) from first


def import_tensorrt(flavour: str):
    """The TensorRT module of a plan's flavour ('tensorrt' or 'rtx')."""
    if flavour not in ("tensorrt", "rtx"):
        raise ArtifactError(f"the plan sidecar names TensorRT flavour {flavour!r}; expected 'tensorrt' or 'rtx'; "
                            f"{_REBUILD}")
    return load_tensorrt(flavour, f"Running a {'TensorRT-RTX' if flavour == 'rtx' else 'TensorRT'} plan")[0]


_LOGGERS: dict[str, Any] = {}


def trt_logger(trt):
    """One ILogger per TensorRT module (TensorRT keeps a process-wide logger): forwards to ``logging`` and
    records error messages (``.errors``) so that a failed parse, build or load can say why."""
    if trt.__name__ not in _LOGGERS:

        class _CaptureLogger(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)
                self.errors: list[str] = []

            def log(self, severity, msg):
                level = int(severity)
                if level <= int(trt.ILogger.ERROR):
                    self.errors.append(msg)
                    log.debug("TensorRT error: %s", msg)
                elif level == int(trt.ILogger.WARNING):
                    log.warning("TensorRT: %s", msg)
                else:
                    log.debug("TensorRT: %s", msg)

        _LOGGERS[trt.__name__] = _CaptureLogger()
    return _LOGGERS[trt.__name__]


def check_batch_in_profile(batch: int, profile: dict[str, int], plan: str | os.PathLike = "the plan") -> None:
    """ConfigError unless ``profile['min'] <= batch <= profile['max']``."""
    lo, opt, hi = int(profile["min"]), int(profile.get("opt", profile["min"])), int(profile["max"])
    if not lo <= int(batch) <= hi:
        raise ConfigError(
            f"{plan}: batch {batch} is outside the plan's optimisation profile (min/opt/max = {lo}/{opt}/{hi}); use "
            f"{option('batch')} between {lo} and {hi} (fastest at {opt}), or rebuild the plan with a profile that covers "
            f"{batch} (ddpm-export --engine, batch min/max)"
        )


RUNTIME_CACHE_SUFFIX = ".runtime-cache"


def default_runtime_cache(plan: str | os.PathLike) -> Path:
    """Where a TensorRT-RTX plan's runtime cache lives by default: beside the plan, ``model.plan.runtime-cache``."""
    plan = Path(plan)
    return plan.with_name(plan.name + RUNTIME_CACHE_SUFFIX)


class RuntimeCacheFile:
    """A TensorRT-RTX runtime cache (``IRuntimeCache``) kept in a file: ``attach`` it to a runtime config
    before the execution context is created; ``save`` writes it back if it changed. ``loaded`` says whether the
    file's contents were accepted (None: there was no file)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.cache = None
        self.loaded: bool | None = None
        self._saved: bytes | None = None

    def attach(self, runtime_config) -> None:
        self.cache = runtime_config.create_runtime_cache()
        if self.cache is None:
            log.warning("TensorRT-RTX could not create a runtime cache; kernels will be compiled in every process")
            return
        try:
            blob = self.path.read_bytes()
        except FileNotFoundError:
            blob = None
        except OSError as e:
            log.warning("cannot read the TensorRT-RTX runtime cache %s (%s); compiling the kernels again", self.path, e)
            blob = None
        if blob is not None:
            self.loaded = bool(self.cache.deserialize(blob))
            if self.loaded:
                self._saved = blob
                log.info("TensorRT-RTX runtime cache loaded from %s (%d bytes)", self.path, len(blob))
            else:
                log.warning("the TensorRT-RTX runtime cache %s was made for another GPU, driver or TensorRT-RTX "
                            "version (TensorRT-RTX refused it); compiling the kernels again and replacing it", self.path)
        if not runtime_config.set_runtime_cache(self.cache):
            log.warning("TensorRT-RTX did not accept the runtime cache; kernels will be compiled in every process")
            self.cache = None

    def save(self) -> bool:
        """Write the cache if it holds anything new; True if the file was written."""
        if self.cache is None:
            return False
        memory = self.cache.serialize()
        blob = bytes(memory) if memory is not None else b""
        if not blob or blob == self._saved:
            return False
        from ..fileio import atomic_write_bytes

        try:
            atomic_write_bytes(self.path, blob)
        except OSError as e:
            log.warning("cannot save the TensorRT-RTX runtime cache to %s (%s); the next process compiles the "
                        "kernels again", self.path, e)
            return False
        self._saved = blob
        log.info("TensorRT-RTX runtime cache saved to %s (%d bytes)", self.path, len(blob))
        return True


def sidecar_io(inputs: list[dict], outputs: list[dict], where: str) -> tuple[int, int, int]:
    """Check a sidecar's I/O (its ``inputs`` and ``outputs``) against our contract; return the sample shape."""
    io = {t.get("name"): t for t in [*inputs, *outputs]}
    found = {name: (t.get("dtype"), t.get("shape")) for name, t in io.items()}
    for name, dtype in IO_DTYPES.items():
        if name not in io or io[name].get("dtype") != dtype:
            raise ArtifactError(f"{where}: expected {IO_TEXT}, found {found}; {_REBUILD} from a ddpm-export ONNX")
    shape = io[INPUT_X]["shape"]
    if len(shape) != 4 or any(int(d) < 1 for d in shape[1:]) or list(io[OUTPUT_EPS]["shape"])[1:] != list(shape[1:]):
        raise ArtifactError(f"{where}: expected x and eps of one static shape [B,C,H,W], found {found}; {_REBUILD}")
    return tuple(int(d) for d in shape[1:])  # type: ignore[return-value]


class TrtRunner(Runner, DeviceRunner):
    """A TensorRT / TensorRT-RTX plan (+ sidecar) as a device runner (and a host ``eps``).

    ``gpu``: a ``device.cuda.GpuContext`` to share; without one the runner opens (and closes) its own on
    ``device_id``. The sidecar is read and checked before TensorRT is imported or the GPU touched."""

    device = "cuda"

    def __init__(self, path: str | os.PathLike, gpu=None, cuda_graph: bool = True, verify_hash: bool = True,
                 device_id: int = 0, runtime_cache: str | os.PathLike | None = "auto"):
        self.path = Path(path)
        self.runtime_cache: RuntimeCacheFile | None = None
        self._runtime_config = None
        self.sidecar = read_plan_sidecar(self.path, verify_hash=verify_hash)
        where = str(self.path)
        self.card = ModelCard.from_dict(self.sidecar.ddpm, where=f"{where} sidecar [ddpm]")
        self.sample_shape = sidecar_io(self.sidecar.inputs, self.sidecar.outputs, where)
        self.profile = {k: int(self.sidecar.profile[k]) for k in ("min", "opt", "max")}
        self.flavour = self.sidecar.trt["flavour"]
        self.precision = self.sidecar.precision
        self.trt = trt = import_tensorrt(self.flavour)
        self._own_gpu = gpu is None
        self.context = self.engine = self.runtime = None
        self._bound: tuple | None = None
        self._scratch: dict[str, Any] = {}
        if gpu is None:
            from ..device.cuda import GpuContext

            gpu = GpuContext(device_id)
        self.gpu = gpu
        try:
            reasons = check_plan_compat(self.sidecar, trt.__name__, trt.__version__, gpu.props.compute_capability)
            if reasons:
                raise ArtifactError(f"{where}: this plan cannot run on {gpu.props.name}:\n  - " + "\n  - ".join(reasons))
            self.logger = trt_logger(trt)
            self.logger.errors.clear()
            self.runtime = trt.Runtime(self.logger)
            self.engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
            if self.engine is None:
                raise ArtifactError(
                    f"{where}: {trt.__name__} {trt.__version__} could not deserialize the plan on "
                    f"{gpu.props.name}. TensorRT reported:\n" + "\n".join(f"  - {m}" for m in self.logger.errors)
                    + f"\nA CUDA error above points at the GPU or driver; otherwise {_REBUILD}"
                )
            self._check_engine()
            self.uses_graphs = False
            if self.flavour == "rtx" and runtime_cache is not None:
                where_cache = default_runtime_cache(self.path) if runtime_cache == "auto" else Path(runtime_cache)
                self.runtime_cache = RuntimeCacheFile(where_cache)
            self.context = self._create_context(cuda_graph)
        except BaseException:
            self.close()
            raise

    def _check_engine(self) -> None:
        e = self.engine
        names = [e.get_tensor_name(i) for i in range(e.num_io_tensors)]
        want = {INPUT_X: ("INPUT", "FLOAT"), INPUT_T: ("INPUT", "INT32"), OUTPUT_EPS: ("OUTPUT", "FLOAT")}
        found = {n: (e.get_tensor_mode(n).name, e.get_tensor_dtype(n).name) for n in names}
        if found != want:
            raise ArtifactError(f"{self.path}: expected engine I/O {want}, found {found}; {_REBUILD}")
        lo, _, hi = (int(d[0]) for d in e.get_tensor_profile_shape(INPUT_X, 0))
        if (lo, hi) != (self.profile["min"], self.profile["max"]):
            raise ArtifactError(f"{self.path}: the engine's batch profile is {lo}..{hi} but its sidecar says "
                                f"{self.profile['min']}..{self.profile['max']}; {_REBUILD}")

    def _create_context(self, cuda_graph: bool):
        from ..device.cuda import CudaError

        trt, e = self.trt, self.engine
        if self.flavour == "rtx" and hasattr(e, "create_runtime_config"):
            # kept on the runner: the config and its cache must outlive the context
            self._runtime_config = config = e.create_runtime_config()
            if cuda_graph:
                config.cuda_graph_strategy = trt.CudaGraphStrategy.WHOLE_GRAPH_CAPTURE
                self.uses_graphs = True
            if self.runtime_cache is not None:
                self.runtime_cache.attach(config)
            context = e.create_execution_context(config)
        else:
            context = e.create_execution_context()
        if context is None:
            raise CudaError(f"{self.path}: create_execution_context returned None (TensorRT: "
                            f"{'; '.join(self.logger.errors) or 'no message'}); the GPU may be out of memory")
        return context

    # ----------------------------------------------------------------------------------- DeviceRunner

    @property
    def name(self) -> str:
        return f"tensorrt-{self.flavour}"

    def check_batch(self, batch: int) -> None:
        check_batch_in_profile(batch, self.profile, self.path)

    def _call(self, what: str, ok: bool) -> None:
        if not ok:
            from ..device.cuda import CudaError

            raise CudaError(f"{self.path}: IExecutionContext.{what} returned False (TensorRT: "
                            f"{'; '.join(self.logger.errors[-3:]) or 'no message'})")

    def bind(self, x: int, t: int, eps: int, batch: int) -> None:
        self.check_batch(batch)
        self.logger.errors.clear()
        c, h, w = self.sample_shape
        self._call(f"set_input_shape({INPUT_X!r}, {(batch, c, h, w)})", self.context.set_input_shape(INPUT_X, (batch, c, h, w)))
        self._call(f"set_input_shape({INPUT_T!r}, {(batch,)})", self.context.set_input_shape(INPUT_T, (batch,)))
        for name, address in ((INPUT_X, x), (INPUT_T, t), (OUTPUT_EPS, eps)):
            self._call(f"set_tensor_address({name!r})", self.context.set_tensor_address(name, int(address)))
        self._bound = (x, t, eps, batch)

    def enqueue(self, stream) -> None:
        if self._bound is None:
            from ..device.cuda import CudaError

            raise CudaError(f"{self.path}: enqueue before bind: no buffers are bound")
        self._call("execute_async_v3", self.context.execute_async_v3(stream.handle_int))

    def capturable(self, stream) -> bool:
        if self.flavour == "tensorrt":
            return True
        check = getattr(self.context, "is_stream_capturable", None)
        return bool(check(stream.handle_int)) if check is not None and not self.uses_graphs else False

    # ----------------------------------------------------------------------------------- host convenience

    def eps(self, x: np.ndarray, t: np.ndarray) -> np.ndarray:
        """ε for host arrays (parity): copies in, runs on our stream, copies out."""
        from ..device.cuda import DeviceArray

        x = np.ascontiguousarray(x, dtype=np.float32)
        t = np.ascontiguousarray(t, dtype=np.int32)
        batch, stream = x.shape[0], self.gpu.stream
        for name, arr in (("x", x), ("t", t), ("eps", x)):
            if name not in self._scratch or self._scratch[name].count < arr.size:
                if name in self._scratch:
                    self._scratch.pop(name).close()
                self._scratch[name] = DeviceArray(arr.size, arr.dtype)
        s = self._scratch
        s["x"].upload(x.reshape(-1), stream)
        s["t"].upload(t, stream)
        previous = self._bound
        self.bind(s["x"].address, s["t"].address, s["eps"].address, batch)
        self.enqueue(stream)
        out = s["eps"].download(np.empty(x.shape, np.float32).reshape(-1), stream).reshape(x.shape)
        if previous is not None:
            self.bind(*previous)
        return out

    def close(self) -> None:
        if getattr(self, "runtime_cache", None) is not None and getattr(self, "context", None) is not None:
            try:
                self.runtime_cache.save()  # the kernels this process compiled, for the next one
            except Exception as e:  # never keep close() from freeing the GPU: the cache is an optimisation
                log.warning("could not save the TensorRT-RTX runtime cache %s (%s: %s)", self.runtime_cache.path,
                            type(e).__name__, e)
        for arr in self._scratch.values():
            arr.close()
        self._scratch.clear()
        self.context = self.engine = self.runtime = self._runtime_config = None
        if self._own_gpu and getattr(self, "gpu", None) is not None:
            self.gpu.close()
            self.gpu = None
