"""ONNX Runtime CUDA ε backend on device buffers: IO binding to our x / t / eps, on our stream.

The CUDA execution provider gets ``user_compute_stream`` = our stream, so its kernels are ordered with ours
and no synchronisation is needed (run option ``disable_synchronize_execution_providers``). Should the
provider not take the stream, the loop synchronises our stream before each run and ONNX Runtime
synchronises its own after it.

One session per batch size (``static_batch``, the default): the model's batch axis is fixed before ONNX Runtime
optimises the graph (free dimension override), so constant folding removes the shape subgraphs a dynamic-batch
export carries (ddpm-cifar10 after ONNX Runtime's own optimisation: 51 Shape and 24 Gather nodes with the batch
dynamic, none with it fixed). Left in, the CUDA provider places them on the CPU and inserts Memcpy nodes, which is
what kept ONNX Runtime's CUDA graph off in the issue's measurement (6 Memcpy nodes). The override is a level-1
optimisation: with ``opt_level="disable"`` nothing folds.

``enable_cuda_graph`` then lets ONNX Runtime capture and replay the whole model (the capture is made in ``bind``);
a session that cannot use graphs, at creation or at capture, is reloaded without them (logged, ``graph_error``).
Graphs live per session and per thread: one thread drives a runner. ONNX Runtime's graph replay synchronizes the
stream after each launch, so with its graphs the host does not run ahead of the GPU. ONNX Runtime does not
promise that its run can be captured into our graph; ``capture_in_loop`` tries (experimental). Which is fastest
per step (ORT graphs, plain runs on our stream, ε + step in our graph) is what ``scripts/gpu_check.sh`` measures.

Needs ``onnxruntime-gpu`` (instead of ``onnxruntime``, never both).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from ..contract import INPUT_T, INPUT_X, OUTPUT_EPS
from ..errors import ArtifactError, ConfigError, SamplingError, lazy_import, out_of_memory
from .base import DeviceRunner, Runner
from .ort import INSTALL, OrtSession, check_provider, first_line, is_out_of_memory, oom_detail

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


class OrtCudaRunner(Runner, DeviceRunner):
    """An ONNX model on ONNX Runtime's CUDA provider, as a device runner (and a host ``eps``).

    ``gpu``: a ``device.cuda.GpuContext`` to share; without one the runner opens (and closes) its own on
    ``device_id``. The session must really run on CUDA: a silent CPU fallback of ONNX Runtime is refused.
    ``static_batch``: the device loop runs a session of its own per batch size, with the batch fixed (see the
    module docstring); ``session`` (dynamic batch, never graphs) serves ``eps`` and describes the model.
    ``provider_extra``: more CUDA provider options (e.g. ``{"prefer_nhwc": "1"}``), strings as ORT parses them.
    ``capture_in_loop`` (experimental, off by default; implies ORT graphs off): offer ONNX Runtime's run to the
    device loop's own CUDA graph, so that ε and the step kernels replay as one graph with no host synchronisation
    per step. ONNX Runtime does not promise its run is capturable; where the capture fails the loop runs without
    graphs (logged). Measured by scripts/gpu_check.sh before it may become a default."""

    device = "cuda"
    capture_warmup = 2  # runs before the device loop captures it (capture_in_loop): ORT's own graphs wait for 2 too
    ort_device = "cuda"  # ONNX Runtime's provider and IO-binding memory; "cpu" only in the CPU test of this logic

    def __init__(self, path: str | os.PathLike, gpu=None, cuda_graph: bool = True, opt_level: str = "all",
                 same_stream: bool = True, tf32: bool = False, conv_algo_search: str = "EXHAUSTIVE",
                 device_id: int = 0, static_batch: bool = True, provider_extra: dict[str, str] | None = None,
                 capture_in_loop: bool = False):
        self.path = Path(path)
        check_provider(lazy_import("onnxruntime", "The ONNX Runtime CUDA backend", INSTALL_ORT_GPU), self.ort_device)
        self._own_gpu = gpu is None
        if gpu is None:
            from ..device.cuda import GpuContext

            gpu = GpuContext(device_id)
        self.gpu = gpu
        self._bindings: dict[tuple, tuple] = {}
        self._sessions: dict[int, tuple] = {}  # batch -> (session, uses_graphs)
        self._current: tuple | None = None
        self.session = None
        self.capture_in_loop = bool(capture_in_loop)
        self.cuda_graph = bool(cuda_graph) and not self.capture_in_loop  # one graph owner: ours or ORT's
        self.opt_level, self.static_batch = opt_level, bool(static_batch)
        self.graph_error: str | None = None
        self.uses_graphs = False
        try:
            self._open(same_stream, tf32, conv_algo_search, dict(provider_extra or {}))
        except BaseException:
            self.close()
            raise

    def _open(self, same_stream, tf32, conv_algo_search, extra) -> None:
        stream = self.gpu.stream.handle_int if same_stream else None
        self._options = lambda graph: {**provider_options(self.gpu.props.ordinal, stream, graph, tf32,  # noqa: E731
                                                          conv_algo_search), **extra}
        # the model's own session: dynamic batch; with graphs only where no per-batch sessions are made
        s = self._session(self.cuda_graph and not self.static_batch, None)
        if s.io is not None:
            raise ArtifactError(f"{self.path}: diffusers' I/O names ({s.io.describe()}) are mapped on the CPU runner "
                                f"only; the device loop binds x/t int32/eps buffers. Re-export it for CUDA with "
                                f"ddpm-export --from-diffusers (the diffusers folder), or sample on the CPU")
        self._ort, self.session, self._main_graphs = s.ort, s.session, self._graphs_on(s)
        self.card, self.precision, self.sample_shape, self.fixed_batch = s.card, s.precision, s.sample_shape, s.fixed_batch
        self.batch_dim_names = s.batch_dim_names
        effective = self.session.get_provider_options().get(PROVIDER, {})
        self.same_stream = bool(stream) and effective.get("has_user_compute_stream") == "1"
        if stream and not self.same_stream:
            log.warning("ONNX Runtime did not take our CUDA stream; synchronising around each run instead")
        if self.static_batch and not self.batch_dim_names:
            if self.fixed_batch is None:
                log.info("%s: the batch axis of x has no name to fix it by; one dynamic-batch session serves every "
                         "batch size (shape subgraphs may keep ONNX Runtime's CUDA graph off)", self.path.name)
            self.static_batch = False  # the model's one session serves every batch (or the model's fixed batch)
            if self.cuda_graph:
                s = self._session(True, None)
                self.session, self._main_graphs = s.session, self._graphs_on(s)

    def _session(self, graph: bool, batch: int | None) -> OrtSession:
        """An OrtSession on CUDA (batch: fix the batch axes to it); with graphs where ONNX Runtime can. Once a
        session could not be made with graphs, later ones (other batch sizes) are made without."""
        dims = {name: batch for name in self.batch_dim_names} if batch is not None else None
        graph = graph and self.graph_error is None
        try:
            options = self._options(graph) if self.ort_device == "cuda" else None
            return OrtSession(self.path, self.ort_device, opt_level=self.opt_level, provider_options=options,
                              batch_dims=dims)
        except (ArtifactError, ConfigError):
            raise
        except Exception as e:  # ORT's own exception types
            if not graph:
                raise ArtifactError(f"{self.path}: ONNX Runtime CUDA cannot load this model ({first_line(e)})") from None
            self.graph_error = first_line(e)
            log.warning("ONNX Runtime CUDA graphs are not possible for %s%s (%s); loading it without them",
                        self.path.name, "" if batch is None else f" at batch {batch}", self.graph_error)
            return self._session(False, batch)

    @staticmethod
    def _graphs_on(s: OrtSession) -> bool:
        return s.session.get_provider_options().get(PROVIDER, {}).get("enable_cuda_graph") == "1"

    @property
    def name(self) -> str:
        return "onnxruntime-cuda"

    def session_for(self, batch: int):
        """The session the device loop runs at this batch size, and whether it replays ORT's CUDA graphs."""
        if not self.static_batch:
            return self.session, self._main_graphs
        if batch not in self._sessions:
            s = self._session(self.cuda_graph, batch)
            self._sessions[batch] = (s.session, self._graphs_on(s))
        return self._sessions[batch]

    def bind(self, x: int, t: int, eps: int, batch: int) -> None:
        """Bind our buffers. With ORT graphs, the first run of a binding is its capture (ONNX Runtime runs the model
        twice, captures the third run and replays it: correct ε, in one call); it is done here, so that a capture
        that fails at run time falls back to plain runs for this batch size before any step counts on it."""
        key = (int(x), int(t), int(eps), int(batch))
        self._bound_batch = int(batch)
        if key not in self._bindings:
            self._bindings[key] = self._make_binding(key)
            if self._bindings[key][3]:
                try:
                    if not self.same_stream:
                        self.gpu.stream.synchronize()
                    self._run(self._bindings[key])
                except Exception as e:  # ORT's own types: capture not supported, invalidated, did not complete
                    self.graph_error = first_line(e)
                    log.warning("ONNX Runtime CUDA graph capture failed for %s at batch %d (%s); running it without "
                                "graphs", self.path.name, batch, self.graph_error)
                    # drop the bindings of the graph session first: if the session below cannot be made, the next
                    # bind tries again instead of reusing a binding whose capture failed
                    if self.static_batch:  # this batch size's session only
                        self._bindings = {k: v for k, v in self._bindings.items() if k[3] != key[3]}
                        del self._sessions[int(batch)]
                        s = self._session(False, int(batch))
                        self._sessions[int(batch)] = (s.session, False)
                    else:  # the one session of every batch size
                        self._bindings = {}
                        self.session = self._session(False, None).session
                        self._main_graphs = False
                    self._bindings[key] = self._make_binding(key)
        self._current = self._bindings[key]
        self.uses_graphs = self._current[3]

    def _make_binding(self, key: tuple) -> tuple:
        x, t, eps, batch = key
        session, graphs = self.session_for(batch)
        c, h, w = self.sample_shape
        dev = self.gpu.props.ordinal
        binding = session.io_binding()
        mem, dev = self.ort_device, (dev if self.ort_device == "cuda" else 0)
        binding.bind_input(INPUT_X, mem, dev, np.float32, [batch, c, h, w], x)
        binding.bind_input(INPUT_T, mem, dev, np.int32, [batch], t)
        binding.bind_output(OUTPUT_EPS, mem, dev, np.float32, [batch, c, h, w], eps)
        # one graph per binding of a session (its addresses are baked into the graph); ids from 1 (ORT: "users are
        # not expected to set 0", the default id)
        graph_id = 1 + sum(1 for v in self._bindings.values() if v[0] is session) if graphs else None
        return session, binding, run_options(self._ort, self.same_stream, graph_id), graphs

    def _run(self, bound: tuple) -> None:
        session, binding, options, _ = bound
        session.run_with_iobinding(binding, options)

    def enqueue(self, stream) -> None:
        if self._current is None:
            raise SamplingError(f"{self.path}: enqueue before bind: no buffers are bound")
        if not self.same_stream:
            stream.synchronize()  # x and t must be written before ONNX Runtime's stream reads them
        try:
            self._run(self._current)
        except Exception as e:
            if is_out_of_memory(e):  # the batch to try, as in the CPU runner (not exercised without a GPU here)
                raise out_of_memory(f"{self.path}: ONNX Runtime CUDA", getattr(self, "_bound_batch", 0) or 1,
                                    oom_detail(e)) from None
            raise SamplingError(f"{self.path}: ONNX Runtime CUDA failed to run the model ({first_line(e)})") from None

    def eps(self, x: np.ndarray, t: np.ndarray) -> np.ndarray:
        """ε for host arrays (parity tests), on the dynamic-batch session; never captured (gpu_graph_id -1)."""
        feeds = {INPUT_X: np.ascontiguousarray(x, dtype=np.float32), INPUT_T: np.ascontiguousarray(t, dtype=np.int32)}
        options = run_options(self._ort, False, -1 if self._main_graphs else None)
        return self.session.run([OUTPUT_EPS], feeds, options)[0]

    def capturable(self, stream) -> bool:
        """Only with ``capture_in_loop``, on our stream, and a session whose batch is fixed (no Memcpy nodes)."""
        return (self.capture_in_loop and self.same_stream and not self.uses_graphs
                and (self.static_batch or self.fixed_batch is not None))

    def close(self) -> None:
        self._bindings.clear()
        self._sessions.clear()
        self._current = None
        self.session = None
        if self._own_gpu and getattr(self, "gpu", None) is not None:
            self.gpu.close()
            self.gpu = None
