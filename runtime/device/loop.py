"""The device loop: ancestral sampling with x, ε and t in GPU buffers, one fused NVRTC step kernel per step.

Per step, on one stream: ``ddpm_prepare`` (t ← timesteps[i]), the ε backend (TensorRT ``execute_async_v3``
or ONNX Runtime CUDA with IO binding, both on our stream), ``ddpm_step`` (noise + step, in place on x) and
``ddpm_advance`` (i ← i − 1 on the device). No per-step host argument changes, so one step is captured
once into a CUDA graph and replayed K times when the backend allows capture; otherwise the backend may use
its own graphs (ONNX Runtime's ``enable_cuda_graph``, TensorRT-RTX's runtime strategy). ``cuda_graph=False``
turns every graph off; the same kernels run either way, so the results are identical.

Typical use (what ``ddpm-run sample`` does)::

    with open_runner("model.plan", "cuda") as runner:     # or "model.onnx" on "cuda": ONNX Runtime CUDA
        with open_sampler(runner, schedule, (3, 32, 32), max_batch=256) as sampler:   # a DeviceSampler
            x0, timings = sampler.sample(seed, indices)    # float32 [B, 3, 32, 32] on the host
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from .. import rng
from ..backends.base import DeviceRunner, Sampler
from ..errors import ConfigError, SamplingError
from ..schedule import Schedule
from . import kernels as K
from .cuda import CudaError, Device, DeviceArray, Event, Graph, Module, Stream

log = logging.getLogger(__name__)

GRAPH_OURS, GRAPH_BACKEND, GRAPH_OFF = "captured", "backend", "off"


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


@dataclass
class DeviceTimings:
    """GPU-event timings of one batch, in milliseconds. ``eps_ms``/``other_ms`` are per step when the loop
    ran without our graph (with it, only whole steps are timed)."""

    step_ms: list[float] = field(default_factory=list)
    eps_ms: list[float] | None = None
    other_ms: list[float] | None = None
    graph: str = GRAPH_OFF
    setup_seconds: dict[str, float] = field(default_factory=dict)

    def extend(self, other: "DeviceTimings") -> "DeviceTimings":
        """Append another batch's timings (one run.json over all batches); per-part lists survive only if
        every batch has them."""
        first = not self.step_ms
        for name in ("eps_ms", "other_ms"):
            mine, theirs = getattr(self, name), getattr(other, name)
            setattr(self, name, list(theirs or []) if first and theirs is not None
                    else (mine + theirs if mine is not None and theirs is not None else None))
        self.step_ms = self.step_ms + other.step_ms
        self.graph, self.setup_seconds = other.graph, {**self.setup_seconds, **other.setup_seconds}
        return self

    def summary(self) -> dict:
        """The keys of ``sampler.LoopTimings.summary`` (None where not measured) plus the graph mode."""
        s = np.asarray(self.step_ms)
        e = np.asarray(self.eps_ms) if self.eps_ms is not None else None
        o = np.asarray(self.other_ms) if self.other_ms is not None else None
        total = float(s.sum()) / 1e3
        return {
            "steps": int(len(s)),
            "eps_ms_median": float(np.median(e)) if e is not None and len(e) else None,
            "eps_ms_mean": float(e.mean()) if e is not None and len(e) else None,
            "loop_ms_median": float(np.median(o)) if o is not None and len(o) else None,
            "step_ms_median": float(np.median(s)) if len(s) else 0.0,
            "eps_seconds": float(e.sum()) / 1e3 if e is not None else None,
            "loop_seconds": float(o.sum()) / 1e3 if o is not None else None,
            "total_seconds": total,
            "overhead_ratio": total / (float(e.sum()) / 1e3) if e is not None and e.sum() > 0 else None,
            "graph": self.graph,
            "setup_seconds": dict(self.setup_seconds),
        }


def check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    dims = tuple(int(d) for d in shape)
    if len(dims) != 3 or min(dims) < 1:
        raise ConfigError(f"sample shape must be (C, H, W) with positive sizes, found {tuple(shape)}")
    return dims  # type: ignore[return-value]


def check_indices(indices, max_batch: int) -> np.ndarray:
    """Sample indices as uint32 [B] with 1 <= B <= max_batch; ConfigError otherwise."""
    idx = np.asarray(indices)
    if idx.ndim != 1 or idx.size == 0 or (idx.dtype.kind not in "iu"):
        raise ConfigError(f"indices must be a non-empty 1-D integer sequence, found {idx.dtype} {idx.shape}")
    if idx.size > max_batch:
        raise ConfigError(f"a batch of {idx.size} samples does not fit the device buffers (max_batch {max_batch})")
    if int(idx.min()) < 0 or int(idx.max()) > rng.MAX_WORD:
        raise ConfigError(f"sample indices must be in [0, 2**32 - 1], found [{int(idx.min())}, {int(idx.max())}]")
    return idx.astype(np.uint32)


class DeviceSampler(Sampler):
    """The device loop as a ``Sampler``: kernels, buffers and (once per batch size) the captured step graph of
    one device runner and schedule. ``gpu`` defaults to the runner's."""

    loop = "device"

    def __init__(self, backend: DeviceRunner, schedule: Schedule, shape: Sequence[int], max_batch: int,
                 gpu: GpuContext | None = None, cuda_graph: bool = True):
        gpu = gpu if gpu is not None else backend.gpu
        self.shape = check_shape(shape)
        if int(max_batch) < 1:
            raise ConfigError(f"max_batch must be >= 1, found {max_batch}")
        backend.check_batch(int(max_batch))
        self.backend, self.schedule, self.gpu, self.cuda_graph = backend, schedule, gpu, bool(cuda_graph)
        self.runner = backend
        self.max_batch = int(max_batch)
        self.n = math.prod(self.shape)
        self.nblocks = -(-self.n // rng.WORDS_PER_BLOCK)
        self.steps = len(schedule)
        self._owned: list = []
        self._graph: Graph | None = None
        self._graph_batch = self._bound_batch = None
        self.graph_error: str | None = None
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    def _own(self, obj):
        self._owned.append(obj)
        return obj

    def _setup(self) -> None:
        start = time.perf_counter()
        target = K.select_target(self.gpu.props.compute_capability, K.supported_archs())
        self.kernels = K.compile_kernels(target)
        self.module = self._own(Module(self.kernels.image, K.SIGNATURES))
        self.setup_seconds = {"compile": self.kernels.seconds, "load": time.perf_counter() - start - self.kernels.seconds}
        B, n, s = self.max_batch, self.n, self.gpu.stream
        self.x = self._own(DeviceArray(B * n, np.float32))
        self.eps = self._own(DeviceArray(B * n, np.float32))
        self.t = self._own(DeviceArray(B, np.int32))
        self.idx = self._own(DeviceArray(B, np.uint32))
        self.key = self._own(DeviceArray(2, np.uint32))
        self.state = self._own(DeviceArray(K.STATE_WORDS, np.int32))
        self.table = self._own(DeviceArray(self.steps * K.TABLE_COLUMNS, np.float32))
        self.timesteps = self._own(DeviceArray(self.steps, np.int32))
        self.table.upload(np.ascontiguousarray(self.schedule.table32, dtype=np.float32).reshape(-1), s)
        self.timesteps.upload(np.asarray(self.schedule.timesteps, dtype=np.int32), s)
        self._events: list[Event] = []
        s.synchronize()

    # -------------------------------------------------------------------------------------- launches

    def _grid(self, batch: int) -> tuple[int, int, int]:
        return (-(-self.nblocks // K.THREADS), batch, 1)

    def _launch_normals(self, batch: int, step: int) -> None:
        self.module.launch("ddpm_normals", self._grid(batch), (K.THREADS, 1, 1),
                           (self.x.address, self.idx.address, self.key.address, step, self.n, self.nblocks),
                           self.gpu.stream)

    def _enqueue_prepare(self, batch: int, stream: Stream) -> None:
        self.module.launch("ddpm_prepare", (-(-batch // K.THREADS), 1, 1), (K.THREADS, 1, 1),
                           (self.t.address, self.timesteps.address, self.state.address, self.steps, batch), stream)

    def _enqueue_update(self, batch: int, stream: Stream) -> None:
        clip = int(self.schedule.config.clip_denoised)
        self.module.launch("ddpm_step", self._grid(batch), (K.THREADS, 1, 1),
                           (self.x.address, self.eps.address, self.table.address, self.timesteps.address,
                            self.state.address, self.idx.address, self.key.address, self.n, self.nblocks,
                            self.steps, clip), stream)
        self.module.launch("ddpm_advance", (1, 1, 1), (1, 1, 1), (self.state.address,), stream)

    def _enqueue_step(self, batch: int, stream: Stream) -> None:
        self._enqueue_prepare(batch, stream)
        self.backend.enqueue(stream)
        self._enqueue_update(batch, stream)

    def _graph_for(self, batch: int) -> Graph | None:
        """Our captured step for this batch size; None when graphs are off or the backend cannot be captured."""
        if not self.cuda_graph or not self.backend.capturable(self.gpu.stream):
            return None
        if self._graph is not None and self._graph_batch == batch:
            return self._graph
        if self._graph is not None:
            self._graph.close()
            self._graph = None
        stream = self.gpu.stream
        # warm-up outside the capture (TensorRT flushes deferred shape updates; ONNX Runtime's first runs search
        # convolution algorithms and grow its memory arena, which must not happen under capture)
        for _ in range(max(1, int(getattr(self.backend, "capture_warmup", 1)))):
            self.backend.enqueue(stream)
        stream.synchronize()
        start = time.perf_counter()
        try:
            self._graph = Graph(stream, lambda st: self._enqueue_step(batch, st))
            host = self._host_nodes(self._graph)
            if host:  # a host callback replayed every step would run again on state its owner has moved on from
                self._graph.close()
                self._graph = None
                raise CudaError(f"the captured step holds {host} host-function node(s) (the backend's run enqueues "
                                f"host callbacks), which are not safe to replay")
        except (CudaError, SamplingError) as e:  # SamplingError: the backend's own call failed under capture
            self.graph_error = str(e)
            log.warning("CUDA graph capture of the step failed, running without graphs: %s", e)
            self.cuda_graph = False
            return None
        self._graph_batch = batch
        self.setup_seconds["capture"] = time.perf_counter() - start
        return self._graph

    @staticmethod
    def _host_nodes(graph: Graph) -> int:
        """Host-function nodes in the captured graph (0 where the driver cannot list them: logged)."""
        try:
            return sum(1 for name in graph.node_types() if name.endswith("_HOST"))
        except CudaError as e:
            log.debug("cannot list the captured graph's nodes: %s", e)
            return 0

    def _ensure_events(self, count: int) -> list[Event]:
        while len(self._events) < count:
            self._events.append(self._own(Event()))
        return self._events[:count]

    # -------------------------------------------------------------------------------------- sampling

    def new_timings(self) -> DeviceTimings:
        return DeviceTimings()

    def sample(self, seed: int, indices, callback: Callable[[int, int], None] | None = None
               ) -> tuple[np.ndarray, DeviceTimings]:
        """Sample one batch; returns float32 x_0 [B, C, H, W] on the host and the batch's timings.
        ``callback(done, total)`` after each step is enqueued (the host runs ahead of the GPU)."""
        idx = check_indices(indices, self.max_batch)
        key = np.asarray(rng.key_from_seed(seed), dtype=np.uint32)
        batch, stream, steps = len(idx), self.gpu.stream, self.steps
        self.gpu.device.make_current()  # a server may call from another thread than the one that made the context
        self.backend.check_batch(batch)
        self.idx.upload(idx, stream)
        self.key.upload(key, stream)
        self.state.upload(np.array([0, 0, -1, 0], dtype=np.int32), stream)
        self.t.fill32(int(self.schedule.timesteps[-1]), stream, batch)
        self._launch_normals(batch, rng.INITIAL_STEP)
        if self._bound_batch != batch:
            self.backend.bind(self.x.address, self.t.address, self.eps.address, batch)
            self._bound_batch = batch
        graph = self._graph_for(batch)
        timings = DeviceTimings(setup_seconds=dict(self.setup_seconds))
        if graph is not None:
            timings.graph = GRAPH_OURS
            ev = self._ensure_events(steps + 1)
            ev[0].record(stream)
            for k in range(steps):
                graph.launch(stream)
                ev[k + 1].record(stream)
                if callback is not None:
                    callback(k + 1, steps)
            ev[-1].synchronize()
            timings.step_ms = [ev[k].elapsed_ms(ev[k + 1]) for k in range(steps)]
        else:
            timings.graph = GRAPH_BACKEND if self.backend.uses_graphs else GRAPH_OFF
            ev = self._ensure_events(3 * steps + 1)
            ev[0].record(stream)
            for k in range(steps):
                self._enqueue_prepare(batch, stream)
                ev[3 * k + 1].record(stream)
                self.backend.enqueue(stream)
                ev[3 * k + 2].record(stream)
                self._enqueue_update(batch, stream)
                ev[3 * k + 3].record(stream)
                if callback is not None:
                    callback(k + 1, steps)
            ev[-1].synchronize()
            ms = [ev[j].elapsed_ms(ev[j + 1]) for j in range(3 * steps)]
            timings.eps_ms = ms[1::3]
            timings.other_ms = [a + b for a, b in zip(ms[0::3], ms[2::3])]
            timings.step_ms = [a + b + c for a, b, c in zip(ms[0::3], ms[1::3], ms[2::3])]
        x = np.empty((batch, *self.shape), dtype=np.float32)
        self.x.download(x.reshape(-1), stream)
        state = self.state.download(np.empty(K.STATE_WORDS, dtype=np.int32), stream)
        self._check_result(x, state, idx)
        return x, timings

    def _check_result(self, x: np.ndarray, state: np.ndarray, idx: np.ndarray) -> None:
        if state[3] or state[0] != self.steps:
            raise CudaError(f"the device step counter ended at {int(state[0])} of {self.steps} steps "
                            f"(overrun flag {int(state[3])}): the loop did not run as enqueued")
        finite = np.isfinite(x.reshape(len(idx), -1)).all(axis=1)
        if state[2] >= 0 or not finite.all():
            i = int(state[2]) if state[2] >= 0 else 0
            bad = np.flatnonzero(~finite)
            first = f"sample index {int(idx[bad[0]])} ({len(bad)} of {len(idx)} samples affected)" if len(bad) else \
                "a sample that recovered by the end"
            raise SamplingError(
                f"non-finite values first at step t={int(self.schedule.timesteps[i])} (loop step {self.steps - i}/"
                f"{self.steps}) on the GPU, in {first}; check the model file and its precision (try the fp32 model)"
            )

    def close(self) -> None:
        if self._graph is not None:
            self._graph.close()
            self._graph = None
        while self._owned:
            self._owned.pop().close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
