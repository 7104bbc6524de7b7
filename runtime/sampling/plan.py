"""The step plan: what a scheduler decides before sampling, as one float64 table of named columns.

Every scheduler we implement (DDPM ancestral, DDIM, DPM-Solver++ and its SDE form, UniPC) is, step by step,
**linear** in a handful of per-image arrays, with per-step scalar coefficients:

    m0      = clip(a·x − b·ε, ±clip)                                   x̂0 of this step (eq. 15 of DDPM)
    x_next  = m0·m0 + x·x + eps·ε + m1·m1 + m2·m2 + m3·m3 + xp·xp + z·z
    xp_next = xp_x·x + xp_xp·xp + xp_m0·m0 + xp_m1·m1 + xp_m2·m2 + xp_m3·m3       (UniPC's corrected sample)

where x is the sample at this step, ε the model's output, m1..m3 the x̂0 of the previous steps, xp the sample
UniPC's corrector starts from, and z ~ N(0, I) from the Philox stream. A plan is the table of those
coefficients, one row per ε call (``COLUMNS``); the rule (``rules.linear_step``) applies one row per image, so
one vectorised step serves images at different steps of different plans, and the device kernel reads the same
table (its column offsets are generated from ``COLUMNS``).

A scheduler computes its rows by running its own update formula once in float64 on **basis vectors** (``Lin``):
the formula is written as in the paper or in diffusers, and whatever it computes, the coefficients fall out.
Linear solves (UniPC) happen here, at plan time, never per step.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Mapping

import numpy as np

from ..errors import ConfigError, invalid

# The symbols a step combines; a Lin is a float64 vector over them.
SYMBOLS = ("x", "eps", "m0", "m1", "m2", "m3", "xp", "z")
XP_SYMBOLS = ("x", "xp", "m0", "m1", "m2", "m3")
# The table's columns, in order: x̂0 = clip(a·x − b·ε); x_next by SYMBOLS; xp_next by XP_SYMBOLS.
COLUMNS = ("a", "b", "clip", *SYMBOLS, *(f"xp_{s}" for s in XP_SYMBOLS))
COL = {name: i for i, name in enumerate(COLUMNS)}
MAX_HISTORY = 3  # m1, m2, m3
NO_CLIP = np.inf
NOISE_ID_BY_POSITION = 0x80000000  # noise ids of plans whose timesteps repeat: this + step position


class Lin:
    """A linear combination of ``SYMBOLS`` with float64 coefficients: scheduler formulas run on these at plan
    time (``Lin.of("x")``, arithmetic with numbers and other Lins) and their result is a table row."""

    __slots__ = ("v",)

    def __init__(self, v: np.ndarray):
        self.v = v

    @classmethod
    def of(cls, name: str) -> "Lin":
        v = np.zeros(len(SYMBOLS))
        v[SYMBOLS.index(name)] = 1.0
        return cls(v)

    @classmethod
    def zero(cls) -> "Lin":
        return cls(np.zeros(len(SYMBOLS)))

    def __add__(self, o):
        return Lin(self.v + o.v) if isinstance(o, Lin) else NotImplemented

    def __sub__(self, o):
        return Lin(self.v - o.v) if isinstance(o, Lin) else NotImplemented

    def __neg__(self):
        return Lin(-self.v)

    def __mul__(self, c):
        return Lin(self.v * float(c))

    __rmul__ = __mul__

    def __truediv__(self, c):
        return Lin(self.v / float(c))

    def __getitem__(self, name: str) -> float:
        return float(self.v[SYMBOLS.index(name)])


def row(a: float, b: float, x_next: Lin, xp_next: Lin | None = None, clip: float = NO_CLIP) -> np.ndarray:
    """One table row: x̂0 = clip(a·x − b·ε) and the two combinations. ``xp_next`` may not use ε or z."""
    r = np.zeros(len(COLUMNS))
    r[COL["a"]], r[COL["b"]], r[COL["clip"]] = a, b, clip
    r[COL["x"]:COL["x"] + len(SYMBOLS)] = x_next.v
    if xp_next is not None:
        if xp_next["eps"] or xp_next["z"]:
            raise ValueError("xp_next may combine x, xp and the x̂0 history only")
        r[COL["xp_x"]:] = [xp_next[s] for s in XP_SYMBOLS]
    return r


@dataclass(frozen=True, eq=False)
class StepPlan:
    """A scheduler's decisions for one trajectory: the ε-call order, the noise ids and the coefficient table.

    ``timesteps[k]`` is the model's t at ε call k (original timesteps, the order of the calls); ``noise_ids[k]``
    the Philox step word of the z added at step k (DDPM: t, as since the first release); ``table`` float64
    [K, len(COLUMNS)], cast to float32 once (``table32``)."""

    scheduler: str  # diffusers' _class_name, e.g. "DDIMScheduler"
    options: Mapping[str, Any]  # the scheduler's options: what run.json records and --resume compares
    timesteps: np.ndarray
    noise_ids: np.ndarray
    table: np.ndarray
    history: int = 0  # x̂0 buffers read (m1..m3)
    uses_xp: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict)  # describe() extras (e.g. DDIM's previous timesteps)

    def __post_init__(self):
        self.validate()

    def __len__(self) -> int:
        return len(self.timesteps)

    @cached_property
    def table32(self) -> np.ndarray:
        return np.ascontiguousarray(self.table, dtype=np.float32)

    @property
    def stochastic(self) -> bool:
        return bool(np.any(self.table[:, COL["z"]] != 0))

    def validate(self) -> None:
        """ConfigError unless the plan is well formed (a bug in a scheduler, never a user error)."""
        K = len(self.timesteps)
        if K < 1 or self.table.shape != (K, len(COLUMNS)) or len(self.noise_ids) != K:
            raise ConfigError(f"{self.scheduler}: malformed plan (K={K}, table {self.table.shape})")
        finite = np.isfinite(np.where(np.arange(len(COLUMNS)) == COL["clip"], 0.0, self.table))
        if not finite.all():
            k, c = np.argwhere(~finite)[0]
            raise ConfigError(f"{self.scheduler}: non-finite coefficient {COLUMNS[c]} at step {k} of {K}")
        noisy = self.noise_ids[self.table[:, COL["z"]] != 0]
        if len(np.unique(noisy)) != len(noisy):
            raise ConfigError(f"{self.scheduler}: noise ids repeat along the trajectory")
        used = [COL[f"m{j}"] for j in range(self.history + 1, MAX_HISTORY + 1)]
        used += [COL[f"xp_m{j}"] for j in range(self.history + 1, MAX_HISTORY + 1)]
        if not self.uses_xp:
            used += [COL["xp"]]
        if np.any(self.table[:, used] != 0):
            raise ConfigError(f"{self.scheduler}: the table reads history it does not declare")

    @cached_property
    def key(self) -> str:
        """Identity of the plan (scheduler, options, timesteps, table bytes): equal plans share device rows."""
        h = hashlib.sha256(json.dumps([self.scheduler, dict(self.options)], sort_keys=True, default=str).encode())
        h.update(np.ascontiguousarray(self.timesteps, dtype=np.int64).tobytes())
        h.update(self.table32.tobytes())
        return h.hexdigest()[:16]

    def describe(self) -> dict[str, Any]:
        """What run.json and reports record: the scheduler, its options and the number of ε calls."""
        return {"scheduler": self.scheduler, "options": dict(self.options), "steps": len(self), **dict(self.extra)}


def noise_ids_for(timesteps: np.ndarray) -> np.ndarray:
    """The Philox step word of each step: its timestep when the timesteps are distinct (every DDPM and DDIM
    plan, so DDPM's images are those of every earlier release), else ``NOISE_ID_BY_POSITION`` + position."""
    ts = np.asarray(timesteps, dtype=np.int64)
    if len(np.unique(ts)) == len(ts):
        return ts.astype(np.uint32)
    return (NOISE_ID_BY_POSITION + np.arange(len(ts))).astype(np.uint32)


def check_steps(steps: int | None, T: int, lo: int = 1) -> int:
    """``steps`` (the API's argument, ``--steps`` of the CLIs) as an int in [lo, T] (None: T)."""
    if steps is None:
        return T
    if not (isinstance(steps, (int, np.integer)) and not isinstance(steps, bool)) or not lo <= steps <= T:
        raise ConfigError(invalid("steps", steps, f"must be between {lo} and {T} (the model's T)"))
    return int(steps)
