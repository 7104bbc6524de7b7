"""The host sampling loop: ancestral sampling t = T−1 … 0 with NumPy steps and ε from any host backend.

Noise is counter-based (runtime.rng), so the images depend only on (seed, sample index), not on the batch
size, the backend or the shard.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import numpy as np

from . import rng
from .backends.base import Runner, Sampler
from .errors import SamplingError
from .schedule import Schedule


class EpsModel(Protocol):
    """What the host loop needs of a model: ``eps(x, t)`` on host arrays (every ``Runner`` has it; tests pass
    PyTorch models wrapped in an object with this one method)."""

    def eps(self, x: np.ndarray, t: np.ndarray) -> np.ndarray: ...


@dataclass
class LoopTimings:
    """Seconds spent in the ε calls and in the rest of the loop (noise + step + checks)."""

    eps: list[float] = field(default_factory=list)
    other: list[float] = field(default_factory=list)

    def extend(self, other: "LoopTimings") -> "LoopTimings":
        """Append another batch's timings (one run.json over all batches)."""
        self.eps += other.eps
        self.other += other.other
        return self

    def summary(self) -> dict[str, float]:
        e, o = np.asarray(self.eps), np.asarray(self.other)
        tot = float(e.sum() + o.sum())
        return {
            "steps": int(len(e)),
            "eps_ms_median": float(np.median(e) * 1e3) if len(e) else 0.0,
            "eps_ms_mean": float(e.mean() * 1e3) if len(e) else 0.0,
            "loop_ms_median": float(np.median(o) * 1e3) if len(o) else 0.0,
            "eps_seconds": float(e.sum()),
            "loop_seconds": float(o.sum()),
            "total_seconds": tot,
            "overhead_ratio": tot / float(e.sum()) if e.sum() > 0 else float("nan"),
        }


def initial_noise(seed: int, indices: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    return rng.normals(seed, indices, rng.INITIAL_STEP, tuple(shape))


PREFETCH_BYTES = 4 << 20  # noise generated ahead, per refill (bounds memory; amortises NumPy call overhead)
PREFETCH_MAX_STEPS = 64


class NoisePrefetch:
    """Noise of the coming steps, generated a chunk of steps at a time (``rng.normals_steps``), in loop order."""

    def __init__(self, seed: int, indices: np.ndarray, shape: tuple[int, ...], steps_in_order: Sequence[int]):
        self.seed, self.idx, self.shape = seed, indices, shape
        self.order = [int(s) for s in steps_in_order]
        per_step = max(1, len(indices) * int(np.prod(shape)) * 4)
        self.chunk = int(max(1, min(PREFETCH_MAX_STEPS, PREFETCH_BYTES // per_step)))
        self.pos, self.buf, self.buf_start = 0, None, 0

    def next(self, step: int) -> np.ndarray:
        if self.order[self.pos] != step:
            raise ValueError(f"noise requested for step {step}, expected {self.order[self.pos]}")
        k = self.pos - self.buf_start
        if self.buf is None or k >= len(self.buf):
            self.buf_start, k = self.pos, 0
            self.buf = rng.normals_steps(self.seed, self.idx, self.order[self.pos:self.pos + self.chunk], self.shape)
        self.pos += 1
        return self.buf[k]


def sample(
    model: EpsModel,
    schedule: Schedule,
    shape: Sequence[int],
    seed: int,
    indices: Sequence[int],
    callback: Callable[[int, int], None] | None = None,
    timings: LoopTimings | None = None,
    x_T: np.ndarray | None = None,
    noise_fn: Callable[[int, np.ndarray], np.ndarray] | None = None,
) -> np.ndarray:
    """Sample one batch; returns float32 x_0 [B, *shape]. ``callback(done, total)`` after each step.

    ``x_T`` and ``noise_fn(t, indices)`` let tests inject the noise; by default both come from runtime.rng.
    """
    idx = np.asarray(indices, dtype=np.int64)
    shape = tuple(int(s) for s in shape)
    x = initial_noise(seed, idx, shape) if x_T is None else np.array(x_T, dtype=np.float32)
    n = len(schedule)
    t_buf = np.empty(len(idx), dtype=np.int32)
    noise = NoisePrefetch(seed, idx, shape, [int(schedule.timesteps[i]) for i in range(n - 1, 0, -1)])
    clock = time.perf_counter
    for k, i in enumerate(range(n - 1, -1, -1)):
        t_val = int(schedule.timesteps[i])
        t_buf.fill(t_val)
        c0 = clock()
        eps = model.eps(x, t_buf)
        c1 = clock()
        if eps.shape != x.shape or eps.dtype != np.float32:
            raise SamplingError(
                f"the model returned ε of {eps.dtype} {list(eps.shape)} for x of float32 {list(x.shape)} (t={t_val}); "
                f"ε must have x's shape and dtype: check the model's output {getattr(model, 'path', '')}".rstrip())
        if not np.isfinite(eps).all():
            bad = np.argwhere(~np.isfinite(eps.reshape(len(idx), -1)).all(axis=1))[:, 0]
            raise SamplingError(
                f"non-finite ε from the model at step t={t_val} (loop step {k + 1}/{n}) in sample index "
                f"{int(idx[bad[0]])} ({len(bad)} of {len(idx)} samples affected); check the model file and its "
                f"precision (try the fp32 model)")
        z = None
        if i > 0:
            z = noise_fn(t_val, idx) if noise_fn is not None else noise.next(t_val)
        x = schedule.step(x, eps, i, z)
        if not np.isfinite(x).all():
            bad = np.argwhere(~np.isfinite(x.reshape(len(idx), -1)).all(axis=1))[:, 0]
            raise SamplingError(
                f"non-finite values at step t={t_val} (loop step {k + 1}/{n}) in sample index "
                f"{int(idx[bad[0]])} ({len(bad)} of {len(idx)} samples affected; ε was finite: the step overflowed); "
                f"check the model file and its precision (try the fp32 model)"
            )
        if timings is not None:
            timings.eps.append(c1 - c0)
            timings.other.append(clock() - c1)
        if callback is not None:
            callback(k + 1, n)
    return x


class HostSampler(Sampler):
    """The host loop as a ``Sampler``: NumPy step, ε from ``runner.eps`` (any runner, or any ``EpsModel``)."""

    loop = "host"

    def __init__(self, runner: Runner | EpsModel, schedule: Schedule, shape: Sequence[int]):
        self.runner, self.schedule, self.shape = runner, schedule, tuple(int(s) for s in shape)

    def new_timings(self) -> LoopTimings:
        return LoopTimings()

    def sample(self, seed: int, indices, callback: Callable[[int, int], None] | None = None
               ) -> tuple[np.ndarray, LoopTimings]:
        timings = LoopTimings()
        x = sample(self.runner, self.schedule, self.shape, seed, indices, callback=callback, timings=timings)
        return x, timings
