"""TensorRT / TensorRT-RTX ε backend on device buffers: a plan + its sidecar, run with ``execute_async_v3``.

The plan is refused before it is deserialized when its sidecar is missing, does not describe this plan
file, or says it cannot run with this TensorRT and GPU (``runtime.plan``). Batches outside the plan's
optimisation profile are refused with the profile and what to do. Each batch size is bound once
(``set_input_shape`` + ``set_tensor_address`` on our buffers); ``enqueue`` runs on our stream.

CUDA graphs: a ``tensorrt`` context is captured by the device loop together with our kernels (TensorRT
supports capturing ``enqueueV3``). A TensorRT-RTX context is captured only where ``is_stream_capturable``
says so (plans built with user allocation); otherwise it uses RTX's own graphs (runtime config
``cuda_graph_strategy = WHOLE_GRAPH_CAPTURE``).
"""

from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ModelCard
from ..device.cuda import CudaError, DeviceArray
from ..errors import ArtifactError, ConfigError, MissingDependencyError
from ..plan import check_plan_compat, read_plan_sidecar

log = logging.getLogger(__name__)

RTX_MODULES = ("tensorrt_rtx_bindings", "tensorrt_rtx")
INSTALL = {
    "rtx": "pip install tensorrt-rtx-cu13-bindings==1.7.1.116 tensorrt-rtx-cu13-libs==1.7.1.116",
    "tensorrt": "pip install 'tensorrt>=10' (NVIDIA's wheel for this machine's CUDA)",
}
INPUT_X, INPUT_T, OUTPUT_EPS = "x", "t", "eps"
_IO_DTYPES = {INPUT_X: "float32", INPUT_T: "int32", OUTPUT_EPS: "float32"}
_REBUILD = "rebuild the plan and its sidecar with `ddpm-export --engine`"


def import_tensorrt(flavour: str):
    """The TensorRT module of a plan's flavour ('tensorrt' or 'rtx'); MissingDependencyError naming the wheel."""
    if flavour == "rtx":
        for name in RTX_MODULES:
            try:
                return importlib.import_module(name)
            except ImportError:
                log.debug("module %s is not importable", name)
        raise MissingDependencyError("tensorrt_rtx_bindings", "Running a TensorRT-RTX plan", INSTALL["rtx"])
    if flavour == "tensorrt":
        try:
            trt = importlib.import_module("tensorrt")
        except ImportError:
            raise MissingDependencyError("tensorrt", "Running a TensorRT plan", INSTALL["tensorrt"]) from None
        if int(str(trt.__version__).split(".")[0]) < 10:
            raise MissingDependencyError("tensorrt", f"Running plans needs TensorRT >= 10 (found {trt.__version__});"
                                         " it", INSTALL["tensorrt"])
        return trt
    raise ArtifactError(f"the plan sidecar names TensorRT flavour {flavour!r}; expected 'tensorrt' or 'rtx'; {_REBUILD}")


def check_batch_in_profile(batch: int, profile: dict[str, int], plan: str | os.PathLike = "the plan") -> None:
    """ConfigError unless ``profile['min'] <= batch <= profile['max']``."""
    lo, opt, hi = int(profile["min"]), int(profile.get("opt", profile["min"])), int(profile["max"])
    if not lo <= int(batch) <= hi:
        raise ConfigError(
            f"{plan}: batch {batch} is outside the plan's optimisation profile (min/opt/max = {lo}/{opt}/{hi}); use "
            f"--batch between {lo} and {hi} (fastest at {opt}), or rebuild the plan with a profile that covers "
            f"{batch} (ddpm-export --engine, batch min/max)"
        )


def sidecar_io(sidecar: dict[str, Any], where: str) -> tuple[int, int, int]:
    """Check the sidecar's I/O against our contract; return the sample shape (C, H, W)."""
    io = {t.get("name"): t for t in [*sidecar.get("inputs", []), *sidecar.get("outputs", [])]}
    found = {name: (t.get("dtype"), t.get("shape")) for name, t in io.items()}
    for name, dtype in _IO_DTYPES.items():
        if name not in io or io[name].get("dtype") != dtype:
            raise ArtifactError(f"{where}: expected inputs x float32 [B,C,H,W], t int32 [B] and output eps float32 "
                                f"[B,C,H,W], found {found}; {_REBUILD} from a ddpm-export ONNX")
    shape = io[INPUT_X]["shape"]
    if len(shape) != 4 or any(int(d) < 1 for d in shape[1:]) or list(io[OUTPUT_EPS]["shape"])[1:] != list(shape[1:]):
        raise ArtifactError(f"{where}: expected x and eps of one static shape [B,C,H,W], found {found}; {_REBUILD}")
    return tuple(int(d) for d in shape[1:])  # type: ignore[return-value]


def _logger(trt):
    class _Capture(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            if int(severity) <= int(trt.ILogger.ERROR):
                self.errors.append(msg)
                log.debug("TensorRT error: %s", msg)
            elif int(severity) == int(trt.ILogger.WARNING):
                log.warning("TensorRT: %s", msg)
            else:
                log.debug("TensorRT: %s", msg)

    return _Capture()


class TrtRunner:
    """A TensorRT / TensorRT-RTX plan as a device ε backend (see ``device.loop.DeviceEpsBackend``)."""

    def __init__(self, plan_path: str | os.PathLike, gpu, cuda_graph: bool = True, verify_hash: bool = True):
        self.path = Path(plan_path)
        self.sidecar = read_plan_sidecar(self.path, verify_hash=verify_hash)
        where = str(self.path)
        self.card = ModelCard.from_dict(self.sidecar["ddpm"], where=f"{where} sidecar [ddpm]")
        self.sample_shape = sidecar_io(self.sidecar, where)
        self.profile = {k: int(self.sidecar["profile"][k]) for k in ("min", "opt", "max")}
        self.flavour = self.sidecar["trt"]["flavour"]
        self.precision = self.sidecar.get("precision", "fp32")
        self.trt = trt = import_tensorrt(self.flavour)
        if gpu is None:
            raise ConfigError(f"{where}: running a plan needs a GPU context (device.loop.GpuContext), found None")
        reasons = check_plan_compat(self.sidecar, trt.__name__, trt.__version__, gpu.props.compute_capability)
        if reasons:
            raise ArtifactError(f"{where}: this plan cannot run here:\n  - " + "\n  - ".join(reasons))
        self.gpu = gpu
        self.logger = _logger(trt)
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
        self.context = self._create_context(cuda_graph)
        self._bound: tuple | None = None
        self._scratch: dict[str, DeviceArray] = {}

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
        trt, e = self.trt, self.engine
        if self.flavour == "rtx" and cuda_graph and hasattr(e, "create_runtime_config"):
            config = e.create_runtime_config()
            config.cuda_graph_strategy = trt.CudaGraphStrategy.WHOLE_GRAPH_CAPTURE
            context = e.create_execution_context(config)
            self.uses_graphs = True
        else:
            context = e.create_execution_context()
        if context is None:
            raise CudaError(f"{self.path}: create_execution_context returned None (TensorRT: "
                            f"{'; '.join(self.logger.errors) or 'no message'}); the GPU may be out of memory")
        return context

    # ----------------------------------------------------------------------------------- DeviceEpsBackend

    @property
    def name(self) -> str:
        return f"tensorrt-{self.flavour}"

    def check_batch(self, batch: int) -> None:
        check_batch_in_profile(batch, self.profile, self.path)

    def _call(self, what: str, ok: bool) -> None:
        if not ok:
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
            raise CudaError(f"{self.path}: enqueue before bind: no buffers are bound")
        self._call("execute_async_v3", self.context.execute_async_v3(stream.handle_int))

    def capturable(self, stream) -> bool:
        if self.flavour == "tensorrt":
            return True
        check = getattr(self.context, "is_stream_capturable", None)
        return bool(check(stream.handle_int)) if check is not None and not self.uses_graphs else False

    # ----------------------------------------------------------------------------------- host convenience

    def eps(self, x: np.ndarray, t: np.ndarray) -> np.ndarray:
        """ε for host arrays (parity tests): copies in, runs on our stream, copies out."""
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
        for arr in self._scratch.values():
            arr.close()
        self._scratch.clear()
        self.context = self.engine = self.runtime = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
