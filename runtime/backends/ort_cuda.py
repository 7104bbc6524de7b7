"""ONNX Runtime CUDA ε backend on device buffers: IO binding to our x / t / eps, on our stream.

The CUDA execution provider gets ``user_compute_stream`` = our stream, so its kernels are ordered with ours
and no synchronisation is needed (run option ``disable_synchronize_execution_providers``). Should the
provider not take the stream, the loop synchronises our stream before each run and ONNX Runtime
synchronises its own after it. ``enable_cuda_graph`` lets ONNX Runtime capture and replay the model (one
graph per batch size, ``gpu_graph_id``); it needs every node on the GPU, and a model with CPU nodes is
reloaded without it (logged). ONNX Runtime's run cannot be captured into our graph. Note: ONNX Runtime's graph
replay (``CUDAGraph::Replay``) synchronizes the stream after each launch, so with its graphs the host does not
run ahead of the GPU; which of the two (ORT graphs, or plain runs on our stream) is faster per step is what
``scripts/gpu_check.sh`` measures ("graph" and "no graph" rows) — not yet measured on a GPU.

Needs ``onnxruntime-gpu`` (instead of ``onnxruntime``, never both).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from ..contract import INPUT_T, INPUT_X, OUTPUT_EPS
from ..errors import ArtifactError, ConfigError, SamplingError, lazy_import
from .base import DeviceRunner, Runner
from .ort import INSTALL, OrtSession, check_provider, first_line

log = logging.getLogger(__name__)

PROVIDER = "CUDAExecutionProvider"
INSTALL_ORT_GPU = INSTALL["cuda"]


CONV_ALGO_SEARCH = ("EXHAUSTIVE", "HEURISTIC", "DEFAULT")


def provider_options(device_id: int, stream: int | None, cuda_graph: bool, tf32: bool = False,
                     conv_algo_search: str = "EXHAUSTIVE") -> dict[str, str]:
    """CUDA execution provider options (all strings, as ONNX Runtime parses them). ``tf32`` off keeps fp32
    convolutions and matmuls in full fp32 (the parity contract); the provider derives
    ``has_user_compute_stream`` from ``user_compute_stream``, we set both for older versions."""
    if conv_algo_search not in CONV_ALGO_SEARCH:
        raise ConfigError(f"cudnn_conv_algo_search must be one of {CONV_ALGO_SEARCH}, found {conv_algo_search!r}")
    opts = {"device_id": str(int(device_id)), "enable_cuda_graph": "1" if cuda_graph else "0",
            "use_tf32": "1" if tf32 else "0", "arena_extend_strategy": "kSameAsRequested",
            "cudnn_conv_algo_search": conv_algo_search}
    if stream:
        opts["user_compute_stream"] = str(int(stream))
        opts["has_user_compute_stream"] = "1"
    return opts


def run_options(ort, same_stream: bool, graph_id: int | None):
    options = ort.RunOptions()
    if same_stream:
        options.add_run_config_entry("disable_synchronize_execution_providers", "1")
    if graph_id is not None:
        options.add_run_config_entry("gpu_graph_id", str(int(graph_id)))
    return options


def _preload(ort) -> None:
    """Load the CUDA/cuDNN libraries of the nvidia-* wheels if this onnxruntime-gpu can (>= 1.21)."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        try:
            preload()
        except Exception as e:  # best effort: a system CUDA install may be found anyway
            log.debug("onnxruntime.preload_dlls() failed: %s", e)


class OrtCudaRunner(Runner, DeviceRunner):
    """An ONNX model on ONNX Runtime's CUDA provider, as a device runner (and a host ``eps``).

    ``gpu``: a ``device.loop.GpuContext`` to share; without one the runner opens (and closes) its own on
    ``device_id``. The session must really run on CUDA: a silent CPU fallback of ONNX Runtime is refused."""

    device = "cuda"

    def __init__(self, path: str | os.PathLike, gpu=None, cuda_graph: bool = True, opt_level: str = "all",
                 same_stream: bool = True, tf32: bool = False, conv_algo_search: str = "EXHAUSTIVE",
                 device_id: int = 0):
        self.path = Path(path)
        check_provider(lazy_import("onnxruntime", "The ONNX Runtime CUDA backend", INSTALL_ORT_GPU), "cuda")
        self._own_gpu = gpu is None
        if gpu is None:
            from ..device.loop import GpuContext

            gpu = GpuContext(device_id)
        self.gpu = gpu
        self._bindings: dict[tuple, tuple] = {}
        self._current: tuple | None = None
        self.session = None
        try:
            self._open(cuda_graph, opt_level, same_stream, tf32, conv_algo_search)
        except BaseException:
            self.close()
            raise

    def _open(self, cuda_graph, opt_level, same_stream, tf32, conv_algo_search) -> None:
        _preload(lazy_import("onnxruntime", "The ONNX Runtime CUDA backend", INSTALL_ORT_GPU))
        gpu = self.gpu
        self.graph_error: str | None = None
        stream = gpu.stream.handle_int if same_stream else None
        options = lambda graph: provider_options(gpu.props.ordinal, stream, graph, tf32, conv_algo_search)  # noqa: E731

        def session(graph: bool) -> OrtSession:
            try:
                return OrtSession(self.path, "cuda", opt_level=opt_level, provider_options=options(graph))
            except (ArtifactError, ConfigError):
                raise
            except Exception as e:  # ORT's own exception types
                if graph:
                    raise _GraphsImpossible(first_line(e)) from None
                raise ArtifactError(f"{self.path}: ONNX Runtime CUDA cannot load this model ({first_line(e)})") from None

        try:
            s = session(cuda_graph)
        except _GraphsImpossible as e:
            self.graph_error = str(e)
            log.warning("ONNX Runtime CUDA graphs are not possible for %s (%s); loading it without them",
                        self.path.name, self.graph_error)
            s = session(False)
        self._ort, self.session = s.ort, s.session
        self.card, self.precision, self.sample_shape, self.fixed_batch = s.card, s.precision, s.sample_shape, s.fixed_batch
        effective = self.session.get_provider_options().get(PROVIDER, {})
        self.same_stream = bool(stream) and effective.get("has_user_compute_stream") == "1"
        if stream and not self.same_stream:
            log.warning("ONNX Runtime did not take our CUDA stream; synchronising around each run instead")
        self.uses_graphs = effective.get("enable_cuda_graph") == "1"

    @property
    def name(self) -> str:
        return "onnxruntime-cuda"

    def bind(self, x: int, t: int, eps: int, batch: int) -> None:
        key = (int(x), int(t), int(eps), int(batch))
        if key not in self._bindings:
            c, h, w = self.sample_shape
            dev = self.gpu.props.ordinal
            binding = self.session.io_binding()
            binding.bind_input(INPUT_X, "cuda", dev, np.float32, [batch, c, h, w], int(x))
            binding.bind_input(INPUT_T, "cuda", dev, np.int32, [batch], int(t))
            binding.bind_output(OUTPUT_EPS, "cuda", dev, np.float32, [batch, c, h, w], int(eps))
            graph_id = len(self._bindings) if self.uses_graphs else None
            self._bindings[key] = (binding, run_options(self._ort, self.same_stream, graph_id))
        self._current = self._bindings[key]

    def enqueue(self, stream) -> None:
        if self._current is None:
            raise SamplingError(f"{self.path}: enqueue before bind: no buffers are bound")
        binding, options = self._current
        if not self.same_stream:
            stream.synchronize()  # x and t must be written before ONNX Runtime's stream reads them
        try:
            self.session.run_with_iobinding(binding, options)
        except Exception as e:
            raise SamplingError(f"{self.path}: ONNX Runtime CUDA failed to run the model ({first_line(e)})") from None

    def eps(self, x: np.ndarray, t: np.ndarray) -> np.ndarray:
        """ε for host arrays (parity tests); never captured into ONNX Runtime's graphs (gpu_graph_id -1)."""
        feeds = {INPUT_X: np.ascontiguousarray(x, dtype=np.float32), INPUT_T: np.ascontiguousarray(t, dtype=np.int32)}
        options = run_options(self._ort, False, -1 if self.uses_graphs else None)
        return self.session.run([OUTPUT_EPS], feeds, options)[0]

    def capturable(self, stream) -> bool:
        return False  # ONNX Runtime's run cannot be captured from outside; it has enable_cuda_graph instead

    def close(self) -> None:
        self._bindings.clear()
        self._current = None
        self.session = None
        if self._own_gpu and getattr(self, "gpu", None) is not None:
            self.gpu.close()
            self.gpu = None


class _GraphsImpossible(Exception):
    """The session could not be created with enable_cuda_graph (e.g. CPU nodes); retried without."""
