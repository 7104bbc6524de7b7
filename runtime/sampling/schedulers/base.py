"""What every scheduler config shares: a frozen dataclass with diffusers' option names and defaults, checked on
construction and refused by name when unknown, and ``plan(diffusion, steps)`` → ``StepPlan``."""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ...checks import found
from ...errors import ConfigError
from ...schedule import DiffusionConfig, make_betas
from ..plan import StepPlan


@dataclass(frozen=True)
class SchedulerConfig:
    """Base of the scheduler configs. Subclasses set ``NAME`` (diffusers' _class_name), ``ALIAS`` (the CLI
    name), ``CHOICES`` ({field: allowed values}) and implement ``plan``."""

    NAME: ClassVar[str] = ""
    ALIAS: ClassVar[str] = ""
    CHOICES: ClassVar[dict[str, tuple]] = {}
    RANGES: ClassVar[dict[str, tuple[float, float]]] = {}
    NON_FINITE: ClassVar[tuple[str, ...]] = ()  # float fields that may be ±inf (diffusers' lambda_min_clipped)

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            kind = hints[f.name]
            ok = (isinstance(v, bool) if kind is bool else
                  isinstance(v, int) and not isinstance(v, bool) if kind is int else
                  isinstance(v, (int, float)) and not isinstance(v, bool) and (math.isfinite(v) or f.name in self.NON_FINITE
                                                                  and not math.isnan(v)) if kind is float else
                  isinstance(v, str) if kind is str else True)
            if not ok:
                raise ConfigError(f"{self.NAME}.{f.name} must be {_KIND_TEXT.get(kind, kind)}, found {found(v)}")
            if f.name in self.CHOICES and v not in self.CHOICES[f.name]:
                raise ConfigError(f"{self.NAME}.{f.name} must be one of {list(self.CHOICES[f.name])}, found {v!r}")
            if f.name in self.RANGES:
                lo, hi = self.RANGES[f.name]
                if not lo <= v <= hi:
                    raise ConfigError(f"{self.NAME}.{f.name} must be in [{lo}, {hi}], found {v}")

    def options(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def plan(self, diffusion: DiffusionConfig, steps: int | None = None) -> StepPlan:
        raise NotImplementedError


_KIND_TEXT = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}


def alphas_cumprod(diffusion: DiffusionConfig) -> np.ndarray:
    """ᾱ_t over the model's T timesteps, float64 (the forward process is the model card's)."""
    return np.cumprod(1.0 - make_betas(diffusion))


def alpha_sigma(sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """VP (α_t, σ_t) of the noise level σ = √((1 − ᾱ)/ᾱ) (diffusers _sigma_to_alpha_sigma_t)."""
    alpha = 1.0 / np.sqrt(sigma ** 2 + 1.0)
    return alpha, sigma * alpha
