"""DDPMScheduler: ancestral sampling (Ho et al. 2020, eq. 11 via x̂0, eq. 15), respaced over K ≤ T steps as in
improved DDPM (Nichol & Dhariwal 2021 §4: β recomputed from ᾱ at the kept steps)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ...schedule import VARIANCE_TYPES, DiffusionConfig, Schedule
from ..plan import NO_CLIP, Lin, StepPlan, check_steps, noise_ids_for, row
from ..timesteps import SPACINGS, spaced
from .base import SchedulerConfig


@dataclass(frozen=True)
class DDPMConfig(SchedulerConfig):
    """diffusers' DDPMScheduler options. Defaults: diffusers', except ``timestep_spacing``: "linspace" (the
    respacing ``ddpm-run sample --steps`` has always used; diffusers' default is "leading"), and ``variance_type``
    and ``clip_sample``, which default to the model card's (``None`` here: take the card's)."""

    NAME: ClassVar[str] = "DDPMScheduler"
    ALIAS: ClassVar[str] = "ddpm"
    CHOICES: ClassVar[dict] = {"variance_type": (None, *VARIANCE_TYPES), "clip_sample": (None, True, False),
                               "timestep_spacing": SPACINGS}
    RANGES: ClassVar[dict] = {"clip_sample_range": (1e-6, 1e6), "steps_offset": (0, 1000)}

    variance_type: str | None = None
    clip_sample: bool | None = None
    clip_sample_range: float = 1.0
    timestep_spacing: str = "linspace"
    steps_offset: int = 0

    def resolved(self, diffusion: DiffusionConfig) -> "DDPMConfig":
        """The card's variance type and clipping where the config leaves them to it."""
        return dataclasses.replace(
            self, variance_type=self.variance_type or diffusion.variance_type,
            clip_sample=diffusion.clip_denoised if self.clip_sample is None else self.clip_sample)

    def plan(self, diffusion: DiffusionConfig, steps: int | None = None) -> StepPlan:
        cfg = self.resolved(diffusion)
        T = diffusion.num_timesteps
        K = check_steps(steps, T, lo=1 if cfg.timestep_spacing != "linspace" else 2) if steps != T else T
        ts = np.arange(T)[::-1] if K == T and cfg.steps_offset == 0 else spaced(T, K, cfg.timestep_spacing,
                                                                                  cfg.steps_offset)
        ascending = np.ascontiguousarray(ts[::-1])
        if ascending[-1] >= T or len(np.unique(ascending)) != len(ascending):
            from ...errors import ConfigError

            raise ConfigError(f"DDPMScheduler: {K} steps with {cfg.timestep_spacing} spacing and steps_offset "
                              f"{cfg.steps_offset} give timesteps outside [0, {T - 1}] or repeated ones")
        s = Schedule(dataclasses.replace(diffusion, variance_type=cfg.variance_type), timesteps=ascending)
        clip = float(cfg.clip_sample_range) if cfg.clip_sample else NO_CLIP
        m0, x, z = Lin.of("m0"), Lin.of("x"), Lin.of("z")
        rows = []
        for i in range(K - 1, -1, -1):  # eq. 7: μ = c1·x̂0 + c2·x; eq. 11: + σ·z (none at the last step)
            rows.append(row(s.sqrt_recip_alphas_cumprod[i], s.sqrt_recipm1_alphas_cumprod[i],
                            s.posterior_mean_coef1[i] * m0 + s.posterior_mean_coef2[i] * x + s.sigmas[i] * z, clip=clip))
        return StepPlan(self.NAME, cfg.options(), ts, noise_ids_for(ts), np.array(rows))
