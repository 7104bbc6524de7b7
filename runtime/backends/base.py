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
from ..errors import ArtifactError, ConfigError

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
                              f"{batch}; use --batch {self.fixed_batch} or re-export with a dynamic batch")

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
        raise ConfigError(f"device must be one of {list(DEVICES)}, found {device!r}")
    suffix = Path(path).suffix.lower()
    if backend is not None:
        target = BACKENDS.get((backend, device))
        if target is None:
            offered = sorted(f"{b} on {d}" for b, d in BACKENDS)
            raise ConfigError(f"no backend {backend!r} on {device}; backends: {', '.join(offered)}")
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
