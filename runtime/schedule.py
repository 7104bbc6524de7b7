"""The DDPM noise schedule and its posterior tables (Ho, Jain & Abbeel 2020), as a pure NumPy object.

The forward process (β, ᾱ) is the model card's (``DiffusionConfig``). The reverse step of every scheduler lives in
``runtime.sampling`` (plans, the step rule); ``Schedule`` keeps DDPM's float64 posterior tables, from which the
DDPM plan is built, and its ``step`` is that rule on one row (the parity suite's L0/L1 check these tables).

Tables are computed once in float64 and cast to float32 at use. Equation numbers refer to the DDPM paper;
respacing follows Nichol & Dhariwal 2021 (improved DDPM), section 4.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .checks import found as _found
from .checks import is_int, is_number
from .errors import ConfigError, invalid

DEFAULT_BETA_START = 1e-4
DEFAULT_BETA_END = 0.02
DEFAULT_NUM_TIMESTEPS = 1000
SCHEDULES = ("linear", "cosine")
VARIANCE_TYPES = ("fixed_small", "fixed_large")


@dataclass(frozen=True)
class DiffusionConfig:
    """The forward process and the sampler's variance choice."""

    schedule: str = "linear"
    beta_start: float = DEFAULT_BETA_START
    beta_end: float = DEFAULT_BETA_END
    num_timesteps: int = DEFAULT_NUM_TIMESTEPS
    variance_type: str = "fixed_small"  # σ² = β̃_t (fixed_small) or β_t (fixed_large)
    clip_denoised: bool = True

    def __post_init__(self):
        for name, (ok, what) in _FIELD_TYPES.items():
            if not ok(getattr(self, name)):
                raise ConfigError(f"{name} must be {what}, found {_found(getattr(self, name))}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {SCHEDULES}, found {self.schedule!r}")
        if self.variance_type not in VARIANCE_TYPES:
            raise ConfigError(f"variance_type must be one of {VARIANCE_TYPES}, found {self.variance_type!r}")
        if int(self.num_timesteps) < 2:
            raise ConfigError(f"num_timesteps must be >= 2, found {self.num_timesteps}")
        if self.schedule == "linear" and not (0 < self.beta_start <= self.beta_end < 1):
            raise ConfigError(
                f"linear schedule needs 0 < beta_start <= beta_end < 1, found {self.beta_start}, {self.beta_end}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str | None = None) -> "DiffusionConfig":
        """From a file's ``diffusion`` section; every present field is type-checked (messages name
        ``where: diffusion.F``)."""
        pre = f"{where}: " if where else ""
        if not isinstance(d, dict):
            raise ConfigError(f"{pre}diffusion must be a JSON object, found {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"{pre}unknown diffusion config keys {sorted(unknown)}; known: {sorted(known)}")
        for k, v in d.items():
            ok, what = _FIELD_TYPES[k]
            if not ok(v):
                raise ConfigError(f"{pre}diffusion.{k} must be {what}, found {_found(v)}")
        try:
            return cls(**d)
        except ConfigError as e:
            raise ConfigError(f"{pre}diffusion: {e}") from None


_FIELD_TYPES = {  # field -> (test, what it must be): checked on construction and, with the file named, in from_dict
    "schedule": (lambda v: isinstance(v, str), "a string"),
    "beta_start": (is_number, "a number"),
    "beta_end": (is_number, "a number"),
    "num_timesteps": (is_int, "an integer"),
    "variance_type": (lambda v: isinstance(v, str), "a string"),
    "clip_denoised": (lambda v: isinstance(v, bool), "true or false"),
}


def make_betas(cfg: DiffusionConfig) -> np.ndarray:
    """β_1..β_T in float64 (paper §4: linear 1e-4 → 0.02; cosine: Nichol & Dhariwal eq. 17)."""
    T = int(cfg.num_timesteps)
    if cfg.schedule == "linear":
        return np.linspace(cfg.beta_start, cfg.beta_end, T, dtype=np.float64)
    s = 0.008
    f = lambda t: np.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    t = np.arange(T + 1, dtype=np.float64)
    abar = f(t) / f(0.0)
    return np.minimum(1.0 - abar[1:] / abar[:-1], 0.999)


def respaced_timesteps(num_timesteps: int, steps: int | None) -> np.ndarray:
    """Kept timesteps, ascending, both ends included (evenly spaced, rounded)."""
    T = int(num_timesteps)
    if steps is None or steps == T:
        return np.arange(T, dtype=np.int64)
    if not (2 <= steps <= T):
        raise ConfigError(invalid("steps", steps, f"must be between 2 and {T} (the model's T)"))
    return np.unique(np.round(np.linspace(0, T - 1, steps)).astype(np.int64))


class Schedule:
    """Coefficient tables over the kept timesteps and the ancestral step. No I/O, no model.

    Index i runs over ``timesteps`` (ascending); sampling goes i = K-1 … 0 and calls the model at
    ``timesteps[i]`` (the original, un-respaced timestep).
    """

    def __init__(self, cfg: DiffusionConfig, steps: int | None = None, timesteps: np.ndarray | None = None):
        """``timesteps``: the kept timesteps, ascending (default: ``respaced_timesteps(T, steps)``)."""
        self.config = cfg
        base_betas = make_betas(cfg)
        base_abar = np.cumprod(1.0 - base_betas)
        self.base_betas = base_betas
        self.base_alphas_cumprod = base_abar
        self.timesteps = respaced_timesteps(cfg.num_timesteps, steps) if timesteps is None else \
            np.asarray(timesteps, dtype=np.int64)
        abar = base_abar[self.timesteps]
        abar_prev = np.concatenate([[1.0], abar[:-1]])
        # Respacing (improved DDPM §4): β from ᾱ at the kept steps; identical to the base β when K = T.
        betas = 1.0 - abar / abar_prev
        if len(self.timesteps) == cfg.num_timesteps:
            betas = base_betas.copy()
        self.betas = betas
        self.alphas_cumprod = abar
        self.alphas_cumprod_prev = abar_prev
        # eq. 15 rearranged: x̂0 = √(1/ᾱ_t)·x_t − √(1/ᾱ_t − 1)·ε
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / abar)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / abar - 1.0)
        # eq. 7: posterior q(x_{t-1} | x_t, x0) mean coefficients and variance β̃_t
        self.posterior_mean_coef1 = betas * np.sqrt(abar_prev) / (1.0 - abar)
        self.posterior_mean_coef2 = (1.0 - abar_prev) * np.sqrt(1.0 - betas) / (1.0 - abar)
        self.posterior_variance = betas * (1.0 - abar_prev) / (1.0 - abar)
        var = self.posterior_variance if cfg.variance_type == "fixed_small" else betas
        sigma = np.sqrt(var)
        sigma[0] = 0.0  # no noise at the last step (t = 0)
        self.sigmas = sigma

    def __len__(self) -> int:
        return len(self.timesteps)

    def step(self, x_t: np.ndarray, eps: np.ndarray, i: int, noise: np.ndarray | None) -> np.ndarray:
        """One ancestral step x_t → x_{t-1} at ascending index i (eq. 11 via x̂0, eq. 15), in float32: the sampling
        layer's rule (``sampling.rules.linear_step``) on this schedule's DDPM row, the one step the loops run.

        ``noise`` is z ~ N(0, I) of x's shape; ignored (may be None) at i = 0.
        """
        from .sampling.plan import NO_CLIP, Lin, row
        from .sampling.rules import linear_step

        if i > 0 and noise is None:
            raise ValueError("noise is required for i > 0")
        m0, x = Lin.of("m0"), Lin.of("x")
        x_next = self.posterior_mean_coef1[i] * m0 + self.posterior_mean_coef2[i] * x + self.sigmas[i] * Lin.of("z")
        r = row(self.sqrt_recip_alphas_cumprod[i], self.sqrt_recipm1_alphas_cumprod[i], x_next,
                clip=1.0 if self.config.clip_denoised else NO_CLIP).astype(np.float32)
        coef = np.broadcast_to(r, (len(x_t), len(r)))
        out, _, _ = linear_step(x_t, eps, coef, None, None, noise if i > 0 else None)
        return out

    def q_sample(self, x0: np.ndarray, t: np.ndarray, noise: np.ndarray) -> np.ndarray:
        """Forward process x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε (eq. 4), t in original timesteps."""
        abar = self.base_alphas_cumprod[np.asarray(t)].astype(np.float32).reshape(-1, *([1] * (x0.ndim - 1)))
        return np.sqrt(abar) * x0 + np.sqrt(1.0 - abar) * noise
