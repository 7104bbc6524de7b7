"""The loop contract: a ``Loop`` drives one runner over per-image slots (``admit`` / ``step`` / ``take``), and
``sample(plan, seed, indices)`` is whole-batch sampling written once on top of those three calls.

Two loops implement it: ``sampling.host.HostLoop`` (NumPy step on host arrays, ε from any host runner) and
``device.loop.DeviceLoop`` (device buffers, the NVRTC step kernel). Nothing here imports a backend or a loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .plan import StepPlan


@dataclass
class Timings:
    """Seconds spent in the ε calls and in the rest of the loop (noise + step + checks), per step."""

    eps: list[float] = field(default_factory=list)
    other: list[float] = field(default_factory=list)

    def extend(self, other: "Timings") -> "Timings":
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


class Loop:
    """Slots of images, each with its own seed, index, plan and step; one ε call per ``step`` over the occupied
    slots. A context manager. ``kind`` is what run.json records as "loop"."""

    kind: str = "host"
    runner = None
    capacity: int = 0
    timings = None  # the timings object steps append to (``sample`` starts a new one)

    def admit(self, slots, plan: StepPlan, seed: int, indices) -> None:
        """Start images ``indices`` of ``seed`` on ``plan`` in ``slots`` (free ones): x_T from the noise stream."""
        raise NotImplementedError

    def step(self) -> list[int]:
        """One ε call and one step of every occupied slot, each at its own timestep; the slots that finished."""
        raise NotImplementedError

    def take(self, slots) -> np.ndarray:
        """The finished images of ``slots`` (float32 [n, C, H, W]), freeing the slots."""
        raise NotImplementedError

    def occupied(self) -> int:
        raise NotImplementedError

    def clear(self) -> None:
        """Free every slot (images in flight are dropped)."""
        raise NotImplementedError

    def drop(self, slots) -> None:
        """Free ``slots`` whatever their images' state (a step-level server drops a cancelled request's images)."""
        raise NotImplementedError

    def plans_held(self) -> int:
        """Plans in the loop's table (each admitted plan is added once)."""
        raise NotImplementedError

    def forget_plans(self) -> None:
        """Start the plan table anew (only with every slot free): a long-running server keeps it bounded."""
        raise NotImplementedError

    def new_timings(self):
        """An empty timings object of this loop's kind, to ``extend`` over batches."""
        return Timings()

    def sample(self, plan: StepPlan, seed: int, indices, callback: Callable[[int, int], None] | None = None):
        """Whole-batch sampling: admit ``indices`` into slots 0…B−1, step until all are done, take them.
        Returns (x_0 float32 [B, C, H, W], timings); ``callback(done, total)`` after each step."""
        idx = np.asarray(indices, dtype=np.int64)
        if self.occupied():
            raise RuntimeError("sample() needs an empty loop; this one has images in flight")
        slots = np.arange(len(idx))
        self.timings = self.new_timings()
        self.admit(slots, plan, seed, idx)
        n = len(plan)
        for k in range(n):
            self.step()
            if callback is not None:
                callback(k + 1, n)
        return self.take(slots), self.timings

    def close(self) -> None:
        """Release buffers and kernels (idempotent)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
