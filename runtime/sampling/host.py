"""The host loop: NumPy steps on host arrays, ε from any host runner (ONNX Runtime CPU, OpenVINO, or a PyTorch
model wrapped in an object with ``eps(x, t)`` in tests). Noise is counter-based (runtime.rng), so the images
depend only on (seed, sample index) and the plan, not on the batch, the slots, the backend or the shard."""

from __future__ import annotations

import time
from typing import Protocol, Sequence

import numpy as np

from ..errors import ConfigError, SamplingError
from .base import Loop, Timings
from .plan import COL
from .rules import linear_step, nonfinite_error
from .state import PlanTable, Slots


class EpsModel(Protocol):
    """What the host loop needs of a model: ``eps(x, t)`` on host arrays."""

    def eps(self, x: np.ndarray, t: np.ndarray) -> np.ndarray: ...


class HostLoop(Loop):
    """``Loop`` over host arrays for a runner (or any ``EpsModel``)."""

    kind = "host"

    def __init__(self, runner, shape: Sequence[int], capacity: int):
        self.runner = runner
        self.slots = Slots(capacity, tuple(int(s) for s in shape))
        self.capacity = self.slots.capacity
        self.timings = Timings()

    @property
    def shape(self) -> tuple[int, ...]:
        return self.slots.shape

    def admit(self, slots, plan, seed: int, indices, x_T: np.ndarray | None = None) -> None:
        """As ``Loop.admit``; ``x_T`` (float32 [n, C, H, W]) replaces the initial noise (tests, golden loops)."""
        self.slots.admit(slots, plan, seed, indices, x_T)

    def occupied(self) -> int:
        return int(self.slots.active.sum())

    def step(self) -> list[int]:
        S = self.slots
        if not S.active.any():
            return []
        occ = np.flatnonzero(S.active)
        act = occ[S.k[occ] < S.plans.lengths[S.plan[occ]]]  # occupied and not yet done
        if len(act) == 0:
            return []
        clock = time.perf_counter
        whole = len(act) == act[-1] + 1  # slots 0…n−1: views, no copies
        sel = slice(0, len(act)) if whole else act
        rows = S.rows(act)
        t = S.plans.timesteps[rows]
        x = S.x[sel]
        c0 = clock()
        eps = self.runner.eps(x, t)
        c1 = clock()
        if eps.shape != x.shape or eps.dtype != np.float32:
            raise SamplingError(
                f"the model returned ε of {eps.dtype} {list(eps.shape)} for x of float32 {list(x.shape)} (t={int(t[0])});"
                f" ε must have x's shape and dtype: check the model's output {getattr(self.runner, 'path', '')}".rstrip())
        n_steps = S.plans.lengths[S.plan[act]]
        if not np.isfinite(eps).all():
            bad = np.flatnonzero(~np.isfinite(eps.reshape(len(act), -1)).all(axis=1))
            raise nonfinite_error("ε from the model", int(t[bad[0]]), int(S.k[act[bad[0]]]) + 1, int(n_steps[bad[0]]),
                                  S.index[act], bad)
        coef = S.plans.table32[rows]
        need = coef[:, COL["z"]] != 0
        z = S.noise(act, rows, need) if need.any() else None
        hist = S.hist[:, sel] if S.hist is not None else None
        xp = S.xp[sel] if S.xp is not None else None
        x_next, m0, xp_next = linear_step(x, eps, coef, hist, xp, z)
        if not np.isfinite(x_next).all():
            bad = np.flatnonzero(~np.isfinite(x_next.reshape(len(act), -1)).all(axis=1))
            raise nonfinite_error("values", int(t[bad[0]]), int(S.k[act[bad[0]]]) + 1, int(n_steps[bad[0]]),
                                  S.index[act], bad, where=" (ε was finite: the step overflowed)")
        S.x[sel] = x_next
        if S.hist is not None:
            S.hist[1:, sel] = S.hist[:-1, sel]
            S.hist[0, sel] = m0
        if xp_next is not None:
            S.xp[sel] = xp_next
        S.k[act] += 1
        if self.timings is not None:
            self.timings.eps.append(c1 - c0)
            self.timings.other.append(clock() - c1)
        done = act[S.k[act] >= n_steps]
        return done.tolist()

    def clear(self) -> None:
        self.slots.free(np.arange(self.capacity))

    def drop(self, slots) -> None:
        self.slots.free(np.asarray(slots, dtype=np.int64))

    def plans_held(self) -> int:
        return len(self.slots.plans.plans)

    def forget_plans(self) -> None:
        if self.occupied():
            raise ConfigError("forget_plans needs every slot free")
        self.slots.plans = PlanTable()

    def take(self, slots) -> np.ndarray:
        slots = np.asarray(slots, dtype=np.int64)
        S = self.slots
        if not S.active[slots].all():
            raise ConfigError(f"slots {slots[~S.active[slots]].tolist()} hold no image")
        unfinished = S.k[slots] < S.plans.lengths[S.plan[slots]]
        if unfinished.any():
            raise ConfigError(f"slots {slots[unfinished].tolist()} are still sampling")
        out = S.x[slots].copy()
        S.free(slots)
        return out


def sample(model: EpsModel, plan, shape: Sequence[int], seed: int, indices,
           callback=None) -> np.ndarray:
    """One batch along ``plan`` with the host loop: float32 x_0 [B, *shape] (tests, references, scripts)."""
    idx = np.asarray(indices, dtype=np.int64)
    x, _ = HostLoop(model, shape, len(idx)).sample(plan, seed, idx, callback=callback)
    return x
