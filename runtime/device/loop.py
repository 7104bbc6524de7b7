"""The device loop: sampling with x, ε, t and every image's state in GPU buffers, one fused NVRTC step kernel per
step, for any plan of the sampling layer.

Per step, on one stream: ``ddpm_prepare`` (each image's table row and t), the ε backend (TensorRT
``execute_async_v3`` or ONNX Runtime CUDA with IO binding, both on our stream), ``ddpm_step`` (noise + the step
rule + history, in place) and ``ddpm_advance`` (each image's k += 1 on the device). No per-step host argument
changes, so one step is captured once per batch size into a CUDA graph and replayed when the backend allows
capture; otherwise the backend may use its own graphs (ONNX Runtime's ``enable_cuda_graph``, TensorRT-RTX's
runtime strategy). ``cuda_graph=False`` turns every graph off; the same kernels run either way.

One loop per runner (``DeviceLoop.for_runner``): it owns the runner's binding, its buffers and its plan table;
a new scheduler or step count is a table upload, not a new loop. Typical use (what ``ddpm-run sample`` does)::

    with open_runner("model.plan", "cuda") as runner:
        loop = open_loop(runner, (3, 32, 32), max_batch=256)           # a DeviceLoop
        x0, timings = loop.sample(plan, seed, indices)                 # float32 [B, 3, 32, 32] on the host
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from .. import rng
from ..backends.base import DeviceRunner
from ..errors import ConfigError, SamplingError
from ..sampling.base import Loop
from ..sampling.plan import COL, MAX_HISTORY, StepPlan
from ..sampling.rules import nonfinite_error
from ..sampling.state import PlanTable
from . import kernels as K
from .cuda import CudaError, DeviceArray, Event, GpuContext, Graph, Module, Stream

log = logging.getLogger(__name__)

GRAPH_OURS, GRAPH_BACKEND, GRAPH_OFF = "captured", "backend", "off"


@dataclass
class DeviceTimings:
    """GPU-event timings, in milliseconds. ``eps_ms``/``other_ms`` are per step when the loop ran without our
    graph (with it, only whole steps are timed)."""

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
        """The keys of ``sampling.base.Timings.summary`` (None where not measured) plus the graph mode."""
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


class DeviceLoop(Loop):
    """``Loop`` on the GPU for one device runner: buffers for ``max_batch`` slots of samples of ``shape``, the
    kernels, the plan table, and (once per batch size) the captured step graph. ``gpu`` defaults to the runner's."""

    kind = "device"

    def __init__(self, runner: DeviceRunner, shape: Sequence[int], max_batch: int, gpu: GpuContext | None = None,
                 cuda_graph: bool = True):
        gpu = gpu if gpu is not None else runner.gpu
        self.shape = check_shape(shape)
        if int(max_batch) < 1:
            raise ConfigError(f"max_batch must be >= 1, found {max_batch}")
        runner.check_batch(int(max_batch))
        self.runner, self.gpu, self.cuda_graph = runner, gpu, bool(cuda_graph)
        self.requested_graph = bool(cuda_graph)  # cuda_graph turns False when a capture fails; this does not
        self._token = object()  # whose buffers the runner is bound to (an id() could be reused by a new loop)
        self.closed = True  # until _setup has run
        self.capacity = self.max_batch = int(max_batch)
        self.n = math.prod(self.shape)
        self.nblocks = -(-self.n // rng.WORDS_PER_BLOCK)
        self.plans = PlanTable()
        self._owned: list = []
        self._graph: Graph | None = None
        self._graph_key = None
        self.graph_error: str | None = None
        self._table_rows = 0
        # host mirrors of the per-slot state (uploaded when it changes between steps)
        B = self.capacity
        self.h_active = np.zeros(B, np.int32)
        self.h_plan = np.zeros(B, np.int32)
        self.h_k = np.zeros(B, np.int32)
        self.h_idx = np.zeros(B, np.uint32)
        self.h_keys = np.zeros((B, 2), np.uint32)
        self._dirty = False
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    @classmethod
    def for_runner(cls, runner: DeviceRunner, shape: Sequence[int], max_batch: int, cuda_graph: bool = True
                   ) -> "DeviceLoop":
        """The runner's device loop, shared by every caller that asks for one that fits (the shape, at least this
        batch, the same graph request); a new one otherwise (the older stays open for whoever holds it: its owner
        closes it). Every loop binds the runner to its own buffers before it runs it, so loops that share a runner
        never compute ε on each other's buffers."""
        loop = getattr(runner, "_device_loop", None)
        if loop is not None and not loop.closed and loop.shape == check_shape(shape) \
                and loop.capacity >= int(max_batch) and loop.requested_graph == bool(cuda_graph):
            return loop
        loop = cls(runner, shape, max_batch, cuda_graph=cuda_graph)
        runner._device_loop = loop
        return loop

    def _own(self, obj):
        self._owned.append(obj)
        return obj

    def _setup(self) -> None:
        start = time.perf_counter()
        target = K.select_target(self.gpu.props.compute_capability, K.supported_archs())
        self.kernels = K.compile_kernels(target)
        self.module = self._own(Module(self.kernels.image, K.SIGNATURES))
        self.setup_seconds = {"compile": self.kernels.seconds, "load": time.perf_counter() - start - self.kernels.seconds}
        B, n = self.capacity, self.n
        self.x = self._own(DeviceArray(B * n, np.float32))
        self.eps = self._own(DeviceArray(B * n, np.float32))
        self.hist = self._own(DeviceArray(1, np.float32))  # grown for the first plan with history (_ensure_state)
        self.xp = self._own(DeviceArray(1, np.float32))  # grown for the first plan with UniPC's corrected sample
        self.t = self._own(DeviceArray(B, np.int32))
        self.t.fill32(0, self.gpu.stream)  # a defined t for the runner's warm-up and idle slots
        self.row = self._own(DeviceArray(B, np.int32))
        self.idx = self._own(DeviceArray(B, np.uint32))
        self.keys = self._own(DeviceArray(2 * B, np.uint32))
        self.plan = self._own(DeviceArray(B, np.int32))
        self.k = self._own(DeviceArray(B, np.int32))
        self.active = self._own(DeviceArray(B, np.int32))
        self.mask = self._own(DeviceArray(B, np.int32))
        self.state = self._own(DeviceArray(K.STATE_WORDS, np.int32))
        self.table = self.timesteps = self.noise_ids = self.offsets = self.lengths = None
        self._events: list[Event] = []
        self.closed = False

    # -------------------------------------------------------------------------------------- the plan table

    def _upload_plans(self, stream: Stream) -> None:
        """(Re)upload the plan table after a plan was added; a larger table is a new buffer, so our graph goes."""
        P = self.plans
        rows = len(P.table32)
        if rows == self._table_rows:
            return
        for name in ("table", "timesteps", "noise_ids", "offsets", "lengths"):
            old = getattr(self, name)
            if old is not None:
                self._owned.remove(old)
                old.close()
        self._drop_graph()
        self.table = self._own(DeviceArray(rows * len(P.table32[0]), np.float32))
        self.timesteps = self._own(DeviceArray(rows, np.int32))
        self.noise_ids = self._own(DeviceArray(rows, np.uint32))
        self.offsets = self._own(DeviceArray(len(P.plans), np.int32))
        self.lengths = self._own(DeviceArray(len(P.plans), np.int32))
        self.table.upload(np.ascontiguousarray(P.table32).reshape(-1), stream)
        self.timesteps.upload(P.timesteps.astype(np.int32), stream)
        self.noise_ids.upload(P.noise_ids.astype(np.uint32), stream)
        self.offsets.upload(P.offsets.astype(np.int32), stream)
        self.lengths.upload(P.lengths.astype(np.int32), stream)
        self._table_rows = rows

    @property
    def history(self) -> int:
        return self.plans.history

    def _ensure_state(self) -> None:
        """The x̂0 history [B, HMAX, n] and UniPC's xp [B, n] once a plan needs them (a new buffer: our graph goes)."""
        B, n = self.capacity, self.n
        for name, need, count in (("hist", self.plans.history > 0, B * MAX_HISTORY * n),
                                  ("xp", self.plans.uses_xp, B * n)):
            old = getattr(self, name)
            if need and old.count < count:
                self._owned.remove(old)
                old.close()
                self._drop_graph()
                setattr(self, name, self._own(DeviceArray(count, np.float32)))

    # -------------------------------------------------------------------------------------- launches

    def _grid(self, batch: int) -> tuple[int, int, int]:
        return (-(-self.nblocks // K.THREADS), batch, 1)

    def _enqueue_prepare(self, batch: int, stream: Stream) -> None:
        self.module.launch("ddpm_prepare", (-(-batch // K.THREADS), 1, 1), (K.THREADS, 1, 1),
                           (self.t.address, self.row.address, self.timesteps.address, self.offsets.address,
                            self.lengths.address, self.plan.address, self.k.address, self.active.address,
                            self.state.address, batch), stream)

    def _enqueue_update(self, batch: int, stream: Stream) -> None:
        self.module.launch("ddpm_step", self._grid(batch), (K.THREADS, 1, 1),
                           (self.x.address, self.eps.address, self.hist.address, self.xp.address,
                            self.table.address, self.row.address, self.noise_ids.address, self.idx.address,
                            self.keys.address, self.k.address, self.state.address, self.n, self.nblocks, batch,
                            self.plans.history, int(self.plans.uses_xp)), stream)
        self.module.launch("ddpm_advance", (-(-batch // K.THREADS), 1, 1), (K.THREADS, 1, 1),
                           (self.k.address, self.row.address, batch), stream)

    def _enqueue_step(self, batch: int, stream: Stream) -> None:
        self._enqueue_prepare(batch, stream)
        self.runner.enqueue(stream)
        self._enqueue_update(batch, stream)

    def _bind(self, batch: int) -> None:
        """Bind the runner to our buffers unless it is bound to them at this batch size already (a runner is
        shared: whoever bound it last owns its binding)."""
        if getattr(self.runner, "_bound_to", None) != (self._token, batch):
            self.runner.bind(self.x.address, self.t.address, self.eps.address, batch)
            self.runner._bound_to = (self._token, batch)

    def _drop_graph(self) -> None:
        if self._graph is not None:
            self._graph.close()
        self._graph, self._graph_key = None, None

    def _graph_for(self, batch: int) -> Graph | None:
        """Our captured step for this batch size and table; None when graphs are off or the backend cannot be
        captured."""
        if not self.cuda_graph or not self.runner.capturable(self.gpu.stream):
            return None
        key = (batch, self._table_rows, self.plans.history, self.plans.uses_xp)
        if self._graph is not None and self._graph_key == key:
            return self._graph
        self._drop_graph()
        stream = self.gpu.stream
        # warm-up outside the capture (TensorRT flushes deferred shape updates; ONNX Runtime's first runs search
        # convolution algorithms and grow its memory arena, which must not happen under capture)
        for _ in range(max(1, int(getattr(self.runner, "capture_warmup", 1)))):
            self.runner.enqueue(stream)
        stream.synchronize()
        start = time.perf_counter()
        try:
            self._graph = Graph(stream, lambda st: self._enqueue_step(batch, st))
            host = self._host_nodes(self._graph)
            if host:  # a host callback replayed every step would run again on state its owner has moved on from
                self._drop_graph()
                raise CudaError(f"the captured step holds {host} host-function node(s) (the backend's run enqueues "
                                f"host callbacks), which are not safe to replay")
        except (CudaError, SamplingError) as e:  # SamplingError: the backend's own call failed under capture
            self.graph_error = str(e)
            log.warning("CUDA graph capture of the step failed, running without graphs: %s", e)
            self.cuda_graph = False
            return None
        self._graph_key = key
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

    # -------------------------------------------------------------------------------------- slots

    def occupied(self) -> int:
        return int(self.h_active.sum())

    def new_timings(self) -> DeviceTimings:
        return DeviceTimings()

    def _check_open(self) -> None:
        if self.closed:
            raise ConfigError("this device loop is closed (its runner's loop was closed by its owner); open a new "
                              "one with open_loop")

    def admit(self, slots, plan: StepPlan, seed: int, indices) -> None:
        """Start images in free slots: their state is uploaded and x_T drawn on the device (``INITIAL_STEP``)."""
        self._check_open()
        slots = np.asarray(slots, dtype=np.int64)
        idx = check_indices(indices, self.capacity)
        if len(slots) != len(idx) or slots.min() < 0 or slots.max() >= self.capacity \
                or len(np.unique(slots)) != len(slots):
            raise ConfigError(f"admit needs one distinct slot in [0, {self.capacity}) per index, found "
                              f"{slots.tolist()} for {len(idx)} indices")
        if self.h_active[slots].any():
            raise ConfigError(f"slots {slots[self.h_active[slots] != 0].tolist()} are occupied")
        key = np.asarray(rng.key_from_seed(seed), dtype=np.uint32)
        pid = self.plans.add(plan)
        stream = self.gpu.stream
        self.gpu.device.make_current()  # a server may call from another thread than the one that made the context
        self._upload_plans(stream)
        self._ensure_state()
        self.h_active[slots], self.h_plan[slots], self.h_k[slots] = 1, pid, 0
        self.h_idx[slots], self.h_keys[slots] = idx, key
        mask = np.zeros(self.capacity, np.int32)
        mask[slots] = 1
        self._upload_state(stream)
        self.mask.upload(mask, stream)
        self.state.upload(np.array([0, 0, K.NO_BAD_STEP, 0], dtype=np.int32), stream)
        hi = int(slots.max()) + 1
        self.module.launch("ddpm_normals", self._grid(hi), (K.THREADS, 1, 1),
                           (self.x.address, self.idx.address, self.keys.address, self.mask.address, rng.INITIAL_STEP,
                            self.n, self.nblocks), stream)
        zeros = np.zeros(MAX_HISTORY * self.n, np.float32)
        for s in slots:  # fresh history and corrected sample for the new images
            if self.plans.history:
                self.hist.upload_at(zeros, int(s) * MAX_HISTORY * self.n, stream)
            if self.plans.uses_xp:
                self.xp.upload_at(zeros[:self.n], int(s) * self.n, stream)

    def _upload_state(self, stream: Stream) -> None:
        self.active.upload(self.h_active, stream)
        self.plan.upload(self.h_plan, stream)
        self.k.upload(self.h_k, stream)
        self.idx.upload(self.h_idx, stream)
        self.keys.upload(self.h_keys.reshape(-1), stream)

    def _batch(self) -> int:
        """Slots 0 … b−1 cover every occupied slot: the batch the runner computes (free slots in it are idle)."""
        act = np.flatnonzero(self.h_active)
        return int(act[-1]) + 1 if len(act) else 0

    def step(self) -> list[int]:
        """One step of every occupied slot that has steps left (the runner computes ε over slots 0 … b−1); the
        slots that finished in this step."""
        self._check_open()
        batch = self._batch()
        if batch == 0:
            return []
        occ = np.flatnonzero(self.h_active[:batch])
        running = occ[self.h_k[occ] < self.plans.lengths[self.h_plan[occ]]]
        if len(running) == 0:
            return []
        stream = self.gpu.stream
        self.gpu.device.make_current()
        self.runner.check_batch(batch)
        self._bind(batch)
        self._enqueue_step(batch, stream)
        self.h_k[running] += 1
        stream.synchronize()
        self._check_state(occ)
        return running[self.h_k[running] >= self.plans.lengths[self.h_plan[running]]].tolist()

    def clear(self) -> None:
        self.h_active[:] = 0
        if not self.closed:
            self.active.upload(self.h_active, self.gpu.stream)

    def drop(self, slots) -> None:
        self.h_active[np.asarray(slots, dtype=np.int64)] = 0
        if not self.closed:
            self.active.upload(self.h_active, self.gpu.stream)

    def plans_held(self) -> int:
        return len(self.plans.plans)

    def forget_plans(self) -> None:
        if self.occupied():
            raise ConfigError("forget_plans needs every slot free")
        self.plans = PlanTable()
        self._table_rows = -1  # the next admit uploads the new table (and drops our graph)

    def take(self, slots) -> np.ndarray:
        self._check_open()
        slots = np.asarray(slots, dtype=np.int64)
        if not self.h_active[slots].all():
            raise ConfigError(f"slots {slots[self.h_active[slots] == 0].tolist()} hold no image")
        if (self.h_k[slots] < self.plans.lengths[self.h_plan[slots]]).any():
            raise ConfigError("those slots are still sampling")
        stream = self.gpu.stream
        hi = int(slots.max()) + 1
        x = np.empty((hi, *self.shape), dtype=np.float32)
        self.x.download(x.reshape(-1), stream)
        self._check_finite(x[slots], slots)
        self.h_active[slots] = 0
        self.active.upload(self.h_active, stream)
        return x[slots].copy()

    # -------------------------------------------------------------------------------------- whole batches

    def sample(self, plan: StepPlan, seed: int, indices, callback: Callable[[int, int], None] | None = None
               ) -> tuple[np.ndarray, DeviceTimings]:
        """Sample one batch; returns float32 x_0 [B, C, H, W] on the host and the batch's timings.
        ``callback(done, total)`` after each step is enqueued (the host runs ahead of the GPU)."""
        self._check_open()
        idx = check_indices(indices, self.capacity)
        if self.occupied():
            raise ConfigError("sample() needs an empty loop; this one has images in flight")
        batch, stream, steps = len(idx), self.gpu.stream, len(plan)
        self.runner.check_batch(batch)
        slots = np.arange(batch)
        self.admit(slots, plan, seed, idx)
        self._bind(batch)
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
            timings.graph = GRAPH_BACKEND if self.runner.uses_graphs else GRAPH_OFF
            ev = self._ensure_events(3 * steps + 1)
            ev[0].record(stream)
            for k in range(steps):
                self._enqueue_prepare(batch, stream)
                ev[3 * k + 1].record(stream)
                self.runner.enqueue(stream)
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
        self.h_k[slots] += steps
        try:
            self._check_state(slots, expect_k=steps)
            return self.take(slots), timings
        finally:
            self.h_active[slots] = 0

    def _check_state(self, slots: np.ndarray, expect_k: int | None = None) -> None:
        stream = self.gpu.stream
        state = self.state.download(np.empty(K.STATE_WORDS, dtype=np.int32), stream)
        k = self.k.download(np.empty(self.capacity, dtype=np.int32), stream)
        if state[3] or (expect_k is not None and not np.all(k[slots] == expect_k)):
            raise CudaError(f"the device step counters ended at {sorted(set(k[slots].tolist()))} of "
                            f"{expect_k} steps (overrun flag {int(state[3])}): the loop did not run as enqueued")
        if state[2] != K.NO_BAD_STEP:
            self._nonfinite(slots, int(state[2]))

    def _check_finite(self, x: np.ndarray, slots: np.ndarray) -> None:
        finite = np.isfinite(x.reshape(len(slots), -1)).all(axis=1)
        if not finite.all():
            self._nonfinite(slots, None, x)

    def _nonfinite(self, slots: np.ndarray, k: int | None, x: np.ndarray | None = None) -> None:
        stream = self.gpu.stream
        if x is None:
            hi = int(slots.max()) + 1
            x = np.empty((hi, *self.shape), dtype=np.float32)
            self.x.download(x.reshape(-1), stream)
            x = x[slots]
        bad = np.flatnonzero(~np.isfinite(x.reshape(len(slots), -1)).all(axis=1))
        s = int(slots[bad[0]]) if len(bad) else int(slots[0])
        plan = self.plans.plans[int(self.h_plan[s])]
        k = 0 if k is None else k
        raise nonfinite_error("values", int(plan.timesteps[min(k, len(plan) - 1)]), k + 1, len(plan),
                              self.h_idx[slots].astype(np.int64), bad, where=" on the GPU")

    def close(self) -> None:
        self._drop_graph()
        while self._owned:
            self._owned.pop().close()
        self.closed = True
        if getattr(self.runner, "_device_loop", None) is self:
            self.runner._device_loop = None
        if (getattr(self.runner, "_bound_to", None) or (None,))[0] is self._token:
            self.runner._bound_to = None
