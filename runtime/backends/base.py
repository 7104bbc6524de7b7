"""The runner contract: one base class for every ε backend, a device mixin, and ``open_runner``.

A **runner** (Polygraphy's word) turns one artifact into ε = model(x, t):

- ``Runner``: ``path``, ``card`` (the DDPM ModelCard the artifact carries, or None), ``sample_shape`` (C, H, W;
  None where the artifact leaves an axis dynamic), ``precision`` ('fp32', 'fp16', …), ``device`` ('cpu' or
  'cuda'), ``name`` (what run.json and reports call it), ``eps(x, t)`` on host arrays, ``check_shape``,
  ``check_batch``, ``close``; a context manager.
- ``DeviceRunner`` (mixin, device runners only): ``gpu`` (the ``device.cuda.GpuContext``), ``bind`` device
  buffers, ``enqueue`` on our stream, ``capturable`` in our CUDA graph, ``uses_graphs`` (its own graphs).

``open_runner(path, device)`` picks the runner class from the artifact's suffix and the device (``RUNNERS``).
The loops that drive runners live in ``runtime.sampling`` (``open_loop``); nothing here knows them. Adding a
backend = one module here + one line in ``RUNNERS`` (docs/architecture.md has an example).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..device.cuda import GpuContext

import numpy as np

from ..config import ModelCard
from ..errors import ArtifactError, ConfigError, invalid, is_cli_style, option

DEVICES = ("cpu", "cuda")


class Runner:
    """ε(x, t) from one artifact. Subclasses set the attributes in ``__init__`` and implement ``eps``."""

    device: str = "cpu"
    path: Path
    card: ModelCard | None = None
    sample_shape: tuple[int | None, int | None, int | None] = (None, None, None)
    precision: str = "unknown"
    fixed_batch: int | None = None  # a model exported with a static batch axis

    @property
    def name(self) -> str:
        """Short backend name for run.json and reports, e.g. 'onnxruntime-cpu'."""
        raise NotImplementedError

    def eps(self, x: np.ndarray, t: np.ndarray) -> np.ndarray:
        """ε for host arrays x float32 [B, C, H, W] and t int32 [B]; float32 [B, C, H, W]."""
        raise NotImplementedError

    def check_shape(self, shape: Sequence[int]) -> None:
        """ArtifactError unless the model takes samples of ``shape`` (C, H, W)."""
        for want, got in zip(self.sample_shape, shape):
            if want is not None and int(want) != int(got):
                raise ArtifactError(f"{self.path}: the model's input x is [B, {', '.join(map(str, self.sample_shape))}]"
                                    f", the sampler asks for samples of shape {tuple(shape)}")

    def check_batch(self, batch: int) -> None:
        """ConfigError unless the model accepts a batch of ``batch`` samples."""
        if self.fixed_batch is not None and int(batch) != self.fixed_batch:
            raise ConfigError(f"{self.path}: the model has a fixed batch of {self.fixed_batch}, the sampler asks for "
                              f"{batch}; use {option('batch', self.fixed_batch)} or re-export with a dynamic batch")

    def describe(self) -> dict[str, Any]:
        """What reports record about the runner: its class, name, device, precision and artifact."""
        return {"runner": type(self).__name__, "name": self.name, "device": self.device,
                "precision": self.precision, "path": str(self.path)}

    def close(self) -> None:
        """Release the session / engine (idempotent)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class DeviceRunner:
    """Mixin for runners whose ε runs on device buffers in the device loop (``device.loop.DeviceLoop``)."""

    gpu: "GpuContext"
    uses_graphs: bool = False  # the backend replays its own CUDA graphs (ONNX Runtime, TensorRT-RTX)

    def bind(self, x: int, t: int, eps: int, batch: int) -> None:
        """Use the device buffers at these addresses (x, eps float32 [batch, C, H, W]; t int32 [batch])."""
        raise NotImplementedError

    def enqueue(self, stream) -> None:
        """Enqueue ε = model(x, t) on ``stream`` (asynchronously), on the buffers given to ``bind``."""
        raise NotImplementedError

    def capturable(self, stream) -> bool:
        """Whether ``enqueue`` may be captured into the device loop's CUDA graph."""
        return False


# --- choosing a runner -----------------------------------------------------------------------------------------

# (artifact suffix, device) -> "module:Class": a module of runtime.backends, or else an importable module of that
# name (a plugin, a test double). One line per backend.
RUNNERS: dict[tuple[str, str], str] = {
    (".onnx", "cpu"): "ort:OrtRunner",
    (".onnx", "cuda"): "ort_cuda:OrtCudaRunner",
    (".plan", "cuda"): "trt:TrtRunner",
    (".engine", "cuda"): "trt:TrtRunner",
    (".xml", "cpu"): "openvino:OpenVinoRunner",
}
# Named backends (`--backend`), for artifacts more than one runner reads: (backend, device) -> "module:Class".
BACKENDS: dict[tuple[str, str], str] = {
    ("onnxruntime", "cpu"): "ort:OrtRunner",
    ("onnxruntime", "cuda"): "ort_cuda:OrtCudaRunner",
    ("openvino", "cpu"): "openvino:OpenVinoRunner",
    ("tensorrt", "cuda"): "trt:TrtRunner",
}


def runner_class(path: str | os.PathLike, device: str, backend: str | None = None) -> type[Runner]:
    """The runner class for an artifact on a device (imported on demand), or of the named ``backend``;
    ConfigError if there is none."""
    if device not in DEVICES:
        raise ConfigError(invalid("device", device, f"must be one of {list(DEVICES)}"))
    suffix = Path(path).suffix.lower()
    if backend is not None:
        target = BACKENDS.get((backend, device))
        if target is None:
            offered = sorted(f"{b} on {d}" for b, d in BACKENDS)
            raise ConfigError(f"no backend {option('backend', backend)} on {device}; backends: {', '.join(offered)}")
    else:
        target = RUNNERS.get((suffix, device))
    if target is None:
        offered = sorted(f"{s} on {d}" for s, d in RUNNERS)
        raise ConfigError(f"{path}: no runner for a {suffix or 'suffix-less'} file on {device}; runners exist for "
                          f"{', '.join(offered)}")
    module, cls = target.split(":")
    ours = f"{__package__}.{module}"
    try:
        mod = importlib.import_module(ours)
    except ModuleNotFoundError as e:
        if e.name != ours:
            raise
        mod = importlib.import_module(module)
    return getattr(mod, cls)


PRECISIONS = ("fp32", "bf16", "int8", "int8-bf16", "auto")  # what `ddpm-run sample --precision` / ``Sampler.from_onnx(precision=)`` take
INT8_MODEL = "model.int8.xml"  # the NNCF int8 OpenVINO IR that `ddpm-export --onnx model.onnx --int8` writes beside it


INT8_REPORT = "precision.int8.json"  # its ε error per timestep bucket, written beside it
# --precision auto puts int8 in a timestep bucket only where the int8 model's own report measured ε rel L2 at most
# this; bf16 elsewhere. Measured (README, benchmarks/results/cpu-bf16-avx512/quality/): on the demo model the bands
# int8 where ≤ 0.018 (t ≥ 100), bf16 below (0.062) kept FID/KID within the spread of two fp32 seeds.
AUTO_INT8_MAX_EPS_REL_L2 = 0.02


def int8_bands(onnx: str | os.PathLike, limit: float = AUTO_INT8_MAX_EPS_REL_L2, low: str = "bf16",
               high: str = "int8-bf16") -> tuple[str | None, str]:
    """(bands, why): ``"bf16:0-99,int8-bf16:100-999"`` from the ``precision.int8.json`` beside ``onnx`` (``high``
    in every timestep bucket whose measured ε rel L2 is at most ``limit``, ``low`` elsewhere), or (None, why not):
    no int8 model or report beside it, a report of another ONNX (export again), or no bucket within ``limit``."""
    from ..contract import PrecisionReport
    from ..fileio import sha256_file

    onnx = Path(onnx)
    xml, rep = onnx.with_name(INT8_MODEL), onnx.with_name(INT8_REPORT)
    if not xml.is_file() or not rep.is_file():
        return None, f"no int8 model beside {onnx.name} (ddpm-export --onnx {onnx.name} --int8 writes it)"
    try:
        report = PrecisionReport.load(rep)
        buckets = [(int(b["t_min"]), int(b["t_max"]), float(b["rel_l2"])) for b in report.error["buckets"]]
    except (ArtifactError, KeyError, TypeError, ValueError) as e:
        return None, f"{rep.name} unreadable ({str(e)[:120]})"
    if report.model_sha256 and report.model_sha256 != sha256_file(onnx):
        return None, f"{INT8_MODEL} was quantized from another ONNX than {onnx.name} (export it again with --int8)"
    merged: list[list] = []
    for lo, hi, err in sorted(buckets):
        key = high if err <= limit else low
        if merged and merged[-1][2] == key and merged[-1][1] + 1 == lo:
            merged[-1][1] = hi
        else:
            merged.append([lo, hi, key])
    if not any(k == high for _, _, k in merged):
        return None, f"int8's ε error exceeds {limit} in every timestep bucket ({rep.name})"
    return ",".join(f"{k}:{lo}-{hi}" for lo, hi, k in merged), (
        f"int8 where its ε rel L2 ({rep.name}) is at most {limit}, {low} elsewhere")


def auto_precision(path: str | os.PathLike, device: str = "cpu", backend: str | None = None,
                   flags: list[str] | None = None, bands: bool = True) -> tuple[str | None, str, str]:
    """``precision="auto"``: the fastest setting that keeps sample quality on this machine, as (backend, precision,
    reason). On a CPU with native bf16 (AVX512_BF16 or AMX-BF16) and OpenVINO installed: precision bands (a
    ``P:FIRST-LAST,…`` text, see ``backends/banded.py``) when the int8 model and its report lie beside the ONNX —
    int8 (its float-kept layers in bf16) in the timestep buckets where its measured ε error is at most
    ``AUTO_INT8_MAX_EPS_REL_L2``, bf16 elsewhere — else OpenVINO bf16 (both measured to keep FID/KID within the
    spread of two fp32 seeds, benchmarks/results/cpu-bf16-*/); else the file's own precision on its backend.
    ``bands=False``: never bands (for callers that open one runner). int8 alone is never chosen: how much it
    moves the images at small t depends on the model (judge it with ``ddpm-run fid-compare``)."""
    import importlib.util

    from ..cpu import cpu_precisions

    p = Path(path)
    if device != "cpu" or p.suffix.lower() not in (".onnx", "") or backend not in (None, "openvino"):
        return backend, "fp32", f"the precision stored in {p.name} ({device}): auto chooses only among CPU precisions"
    cpu = cpu_precisions(flags)
    if not cpu.native_bf16:
        return backend, "fp32", (f"fp32: this CPU has no native bf16 (no AVX512_BF16/AMX in its flags "
                                 f"{', '.join(cpu.flags) or 'unknown'}), where bf16 is emulated and slower")
    if importlib.util.find_spec("openvino") is None:
        return backend, "fp32", (f"fp32: this CPU runs bf16 natively ({', '.join(cpu.bf16)}) but OpenVINO is not "
                                 "installed (pip install 'ddpm-deploy[openvino]' for bf16)")
    native = f"this CPU runs bf16 natively ({', '.join(cpu.bf16)})"
    chosen, why = int8_bands(p) if bands else (None, "bands not available here")
    if chosen is not None:
        return "openvino", chosen, (f"OpenVINO precision bands {chosen}: {native}; {why} (measured to keep the "
                                    "samples' FID/KID within the spread of two fp32 seeds)")
    return "openvino", "bf16", (f"OpenVINO bf16: {native}, and bf16 keeps the samples' FID/KID within the spread of "
                                f"two fp32 seeds (no int8 bands: {why})")


def resolve_model(path: str | os.PathLike, device: str = "cpu", backend: str | None = None,
                  precision: str = "fp32") -> tuple[Path, str | None, str]:
    """The artifact, backend and runner precision for a model file, a device, a backend and a precision, as
    ``ddpm-run sample`` and the Python API both choose them (errors name flags in a CLI, arguments elsewhere).

    ``backend``: None (by the file: .onnx → ONNX Runtime, .xml → OpenVINO), "onnxruntime", "openvino" or
    "tensorrt". ``precision`` (OpenVINO only): "fp32", "bf16" (OpenVINO's precision hint) or "int8" (the NNCF int8
    model ``model.int8.xml`` beside an ONNX file, or the .xml given). Returns (path to open, backend, the
    ``precision`` option of the runner: the hint, "fp32" for an int8 model, "bf16" for int8-bf16: the int8 model
    with the layers NNCF keeps float run in bf16)."""
    path = Path(path)
    if precision not in PRECISIONS:
        raise ConfigError(invalid("precision", precision, f"must be one of {list(PRECISIONS)}"))
    if precision == "auto":
        backend, precision, _ = auto_precision(path, device, backend, bands=False)
    named = {b for b, _ in BACKENDS}
    if backend is not None and backend not in named:
        raise ConfigError(invalid("backend", backend, f"must be one of {sorted(named)} (or None: by the file's "
                                                      f"suffix)"))
    if backend == "openvino" or (backend is None and path.suffix.lower() == ".xml"):
        if device != "cpu":
            drop = "drop --device cuda / --engine" if is_cli_style() else "use device='cpu'"
            raise ConfigError(f"the OpenVINO backend runs on the CPU: {drop}")
        backend = "openvino"
        if precision in ("int8", "int8-bf16") and path.suffix.lower() != ".xml":
            onnx = path
            path = path.with_name(INT8_MODEL)
            if not path.is_file():
                raise ArtifactError(f"{option('precision', 'int8')} needs the int8 model {path}; write it with "
                                    f"`ddpm-export --onnx {onnx} --int8`")
    elif precision != "fp32":
        raise ConfigError(f"{option('precision', precision)} is an OpenVINO option: add {option('backend', 'openvino')} "
                          f"(ONNX Runtime runs the precision stored in the model: pass model.fp16.onnx for fp16)")
    # int8 is the model (its float-kept layers run fp32); int8-bf16 runs those kept layers in bf16 (OpenVINO's hint)
    return path, backend, {"int8": "fp32", "int8-bf16": "bf16"}.get(precision, precision)


def open_runner(path: str | os.PathLike, device: str = "cpu", backend: str | None = None, **options) -> Runner:
    """Open ``path`` (model.onnx, model.plan, model.int8.xml) with the runner for ``device`` (or the named
    ``backend``: "onnxruntime", "openvino", "tensorrt").

    Options go to the runner: ``threads``, ``opt_level`` (ONNX Runtime), ``precision``/``hint`` (OpenVINO),
    ``cuda_graph`` (device runners),
    ``gpu`` (a ``device.cuda.GpuContext`` to share; device runners open their own otherwise, on
    ``device_id``). Options a runner does not take are dropped, so callers need not know which runner opens.
    """
    import inspect

    cls = runner_class(path, device, backend)
    accepted = inspect.signature(cls.__init__).parameters
    return cls(path, **{k: v for k, v in options.items() if k in accepted})
