"""Per-image sampling state: the unit of step-level batching.

``PlanTable`` holds every plan a loop has seen, concatenated (rows, timesteps, noise ids) with per-plan offsets,
so an image's coefficient row is ``offset[plan] + k``. ``Slots`` is a structure of arrays over a loop's capacity:
which slots are occupied, each image's seed, index, plan and step, its sample x, its x̂0 history and UniPC's
corrected sample. Whole-batch sampling is the case where every occupied row agrees.
"""

from __future__ import annotations

import numpy as np

from .. import rng
from ..errors import ConfigError
from .plan import COLUMNS, MAX_HISTORY, StepPlan


class PlanTable:
    """Plans by identity, with their rows concatenated."""

    def __init__(self):
        self.plans: list[StepPlan] = []
        self._ids: dict[str, int] = {}
        self.offsets = np.zeros(0, dtype=np.int64)
        self.lengths = np.zeros(0, dtype=np.int64)
        self.table32 = np.zeros((0, len(COLUMNS)), dtype=np.float32)
        self.timesteps = np.zeros(0, dtype=np.int32)
        self.noise_ids = np.zeros(0, dtype=np.uint32)

    def add(self, plan: StepPlan) -> int:
        """The plan's id (added on first use)."""
        pid = self._ids.get(plan.key)
        if pid is not None:
            return pid
        pid = len(self.plans)
        self.plans.append(plan)
        self._ids[plan.key] = pid
        self.offsets = np.append(self.offsets, len(self.table32))
        self.lengths = np.append(self.lengths, len(plan))
        self.table32 = np.concatenate([self.table32, plan.table32])
        self.timesteps = np.concatenate([self.timesteps, plan.timesteps.astype(np.int32)])
        self.noise_ids = np.concatenate([self.noise_ids, plan.noise_ids.astype(np.uint32)])
        return pid

    @property
    def history(self) -> int:
        return max((p.history for p in self.plans), default=0)

    @property
    def uses_xp(self) -> bool:
        return any(p.uses_xp for p in self.plans)


class Slots:
    """Host arrays of per-image state over ``capacity`` slots of samples of ``shape`` (C, H, W)."""

    def __init__(self, capacity: int, shape: tuple[int, ...]):
        if int(capacity) < 1:
            raise ConfigError(f"the loop's capacity (max batch) must be >= 1, found {capacity}")
        B = self.capacity = int(capacity)
        self.shape = tuple(int(s) for s in shape)
        self.plans = PlanTable()
        self.active = np.zeros(B, dtype=bool)
        self.seed = np.zeros(B, dtype=np.uint64)
        self.index = np.zeros(B, dtype=np.int64)
        self.plan = np.zeros(B, dtype=np.int64)
        self.k = np.zeros(B, dtype=np.int64)
        self.x = np.zeros((B, *self.shape), dtype=np.float32)
        self.hist: np.ndarray | None = None  # [MAX_HISTORY, B, C, H, W], allocated when a plan needs it
        self.xp: np.ndarray | None = None

    def admit(self, slots: np.ndarray, plan: StepPlan, seed: int, indices: np.ndarray,
              x_T: np.ndarray | None = None) -> None:
        slots = np.asarray(slots, dtype=np.int64)
        idx = np.asarray(indices, dtype=np.int64)
        if len(slots) != len(idx) or len(idx) == 0:
            raise ConfigError(f"admit needs one slot per index, found {len(slots)} slots and {len(idx)} indices")
        if slots.min() < 0 or slots.max() >= self.capacity or len(np.unique(slots)) != len(slots):
            raise ConfigError(f"slots must be distinct and in [0, {self.capacity}), found {slots.tolist()}")
        if self.active[slots].any():
            raise ConfigError(f"slots {slots[self.active[slots]].tolist()} are occupied")
        rng.key_from_seed(seed)  # checks the seed
        pid = self.plans.add(plan)
        self.x[slots] = rng.normals(seed, idx, rng.INITIAL_STEP, self.shape) if x_T is None else x_T
        if plan.history and self.hist is None:
            self.hist = np.zeros((MAX_HISTORY, self.capacity, *self.shape), dtype=np.float32)
        if plan.uses_xp and self.xp is None:
            self.xp = np.zeros((self.capacity, *self.shape), dtype=np.float32)
        if self.hist is not None:
            self.hist[:, slots] = 0.0
        if self.xp is not None:
            self.xp[slots] = 0.0
        self.active[slots], self.seed[slots], self.index[slots] = True, np.uint64(seed), idx
        self.plan[slots], self.k[slots] = pid, 0

    def rows(self, slots: np.ndarray) -> np.ndarray:
        """Each slot's row of the plan table (its plan's offset + its step)."""
        return self.plans.offsets[self.plan[slots]] + self.k[slots]

    def noise(self, slots: np.ndarray, rows: np.ndarray, need: np.ndarray) -> np.ndarray:
        """z for the slots whose row draws noise (``need``), zeros elsewhere: one Philox call per (seed, noise id)."""
        z = np.zeros((len(slots), *self.shape), dtype=np.float32)
        ids = self.plans.noise_ids[rows]
        keys = np.stack([self.seed[slots], ids.astype(np.uint64)], axis=1)[need]
        where = np.flatnonzero(need)
        if len(where) == 0:
            return z
        uniq, inverse = np.unique(keys, axis=0, return_inverse=True)
        inverse = inverse.reshape(-1)
        for g, (seed, step) in enumerate(uniq):
            members = where[inverse == g]
            z[members] = rng.normals(int(seed), self.index[slots[members]], int(step), self.shape)
        return z

    def free(self, slots: np.ndarray) -> None:
        self.active[np.asarray(slots, dtype=np.int64)] = False
