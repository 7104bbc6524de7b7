"""DDIMScheduler (Song et al. 2021, eq. 12): x_prev = √ᾱ_prev·x̂0 + √(1 − ᾱ_prev − σ²)·ε + σ·z, σ = η·σ_DDIM (eq. 16).

The previous timestep is the next entry of the timestep list. diffusers computes it as t − T // N
(huggingface/diffusers #9261, #11347, #12633; the fix #14357 is still open), which is the same for "leading"
spacing and for "trailing" when N divides T, and wrong otherwise ("linspace"; "trailing" with N ∤ T): there it
steps to a timestep that is not the next one called, and the trajectory ends away from the ODE's. We follow the
list; tests/parity/test_schedulers_diffusers.py shows both the agreement and the difference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ...errors import ConfigError
from ...schedule import DiffusionConfig
from ..plan import NO_CLIP, Lin, StepPlan, check_steps, noise_ids_for, row
from ..timesteps import SPACINGS, spaced
from .base import SchedulerConfig, alphas_cumprod


@dataclass(frozen=True)
class DDIMConfig(SchedulerConfig):
    """diffusers' DDIMScheduler options and defaults, plus ``eta`` (a ``step()`` argument in diffusers, an option
    here so that run.json records it)."""

    NAME: ClassVar[str] = "DDIMScheduler"
    ALIAS: ClassVar[str] = "ddim"
    CHOICES: ClassVar[dict] = {"timestep_spacing": SPACINGS}
    RANGES: ClassVar[dict] = {"eta": (0.0, 1.0), "clip_sample_range": (1e-6, 1e6), "steps_offset": (0, 1000)}

    eta: float = 0.0
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    set_alpha_to_one: bool = True
    clip_sample: bool = True
    clip_sample_range: float = 1.0

    def plan(self, diffusion: DiffusionConfig, steps: int | None = None) -> StepPlan:
        T = diffusion.num_timesteps
        K = check_steps(steps, T)
        ts = spaced(T, K, self.timestep_spacing, self.steps_offset)
        if ts.max() >= T or ts.min() < 0 or len(np.unique(ts)) != K:
            raise ConfigError(f"DDIMScheduler: {K} steps with {self.timestep_spacing} spacing and steps_offset "
                              f"{self.steps_offset} give timesteps outside [0, {T - 1}] or repeated ones")
        abar = alphas_cumprod(diffusion)
        final = 1.0 if self.set_alpha_to_one else abar[0]
        clip = float(self.clip_sample_range) if self.clip_sample else NO_CLIP
        m0, eps, z = Lin.of("m0"), Lin.of("eps"), Lin.of("z")
        rows = []
        for k, t in enumerate(ts):
            a_t = abar[t]
            a_prev = abar[ts[k + 1]] if k + 1 < K else final
            var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)  # σ_DDIM², eq. 16
            std = self.eta * np.sqrt(max(var, 0.0))
            x_next = np.sqrt(a_prev) * m0 + np.sqrt(max(1 - a_prev - std ** 2, 0.0)) * eps + std * z
            rows.append(row(np.sqrt(1 / a_t), np.sqrt(1 / a_t - 1), x_next, clip=clip))
        return StepPlan(self.NAME, self.options(), ts, noise_ids_for(ts), np.array(rows))
