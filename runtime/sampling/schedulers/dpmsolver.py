"""DPMSolverMultistepScheduler: DPM-Solver++ (Lu et al. 2022b, data prediction, multistep orders 1–3) and its
SDE form, on the VP noise levels σ = √((1 − ᾱ)/ᾱ); formulas and step-order rules as diffusers' (warm-up,
``lower_order_final``, ``final_sigmas_type``), Karras and Lu (uniform-λ) noise levels."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ...errors import ConfigError
from ...schedule import DiffusionConfig
from ..plan import Lin, StepPlan, check_steps, noise_ids_for, row
from ..timesteps import SPACINGS, karras, sigma_to_t, spaced_solver
from .base import SchedulerConfig, alpha_sigma, alphas_cumprod


@dataclass(frozen=True)
class DPMSolverConfig(SchedulerConfig):
    """diffusers' DPMSolverMultistepScheduler options and defaults (the ones we implement; others are refused)."""

    NAME: ClassVar[str] = "DPMSolverMultistepScheduler"
    ALIAS: ClassVar[str] = "dpmsolver++"
    CHOICES: ClassVar[dict] = {"algorithm_type": ("dpmsolver++", "sde-dpmsolver++"),
                               "solver_type": ("midpoint", "heun"), "final_sigmas_type": ("zero", "sigma_min"),
                               "timestep_spacing": SPACINGS, "solver_order": (1, 2, 3)}
    RANGES: ClassVar[dict] = {"steps_offset": (0, 1000)}
    NON_FINITE: ClassVar[tuple] = ("lambda_min_clipped",)

    solver_order: int = 2
    algorithm_type: str = "dpmsolver++"
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False
    use_karras_sigmas: bool = False
    use_lu_lambdas: bool = False
    final_sigmas_type: str = "zero"
    lambda_min_clipped: float = -float("inf")
    timestep_spacing: str = "linspace"
    steps_offset: int = 0

    def __post_init__(self):
        if self.lambda_min_clipped is None:  # how options() writes −∞ (JSON has no infinity)
            object.__setattr__(self, "lambda_min_clipped", -float("inf"))
        super().__post_init__()
        if self.use_karras_sigmas and self.use_lu_lambdas:
            raise ConfigError(f"{self.NAME}: use_karras_sigmas and use_lu_lambdas exclude each other")

    def options(self) -> dict:
        """As run.json records them: −∞ (diffusers' lambda_min_clipped default) as null, valid JSON everywhere."""
        out = super().options()
        if out["lambda_min_clipped"] == -float("inf"):
            out["lambda_min_clipped"] = None
        return out

    def sigmas(self, diffusion: DiffusionConfig, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(timesteps int64 [n], noise levels σ float64 [n + 1] with the final σ last): diffusers' set_timesteps."""
        T = diffusion.num_timesteps
        abar = alphas_cumprod(diffusion)
        train = np.sqrt((1 - abar) / abar)
        lam = np.log(np.sqrt(abar)) - np.log(np.sqrt(1 - abar))
        last = T - int(np.searchsorted(lam[::-1], self.lambda_min_clipped))
        ts = spaced_solver(last, T, n, self.timestep_spacing, self.steps_offset)
        log_train = np.log(train)
        if self.use_karras_sigmas:
            sig = karras(train[0], train[-1], n)
            ts = sigma_to_t(sig, log_train).round().astype(np.int64)
        elif self.use_lu_lambdas:
            sig = np.exp(np.linspace(log_train[-1], log_train[0], n))
            ts = sigma_to_t(sig, log_train).round().astype(np.int64)
        else:
            if ts.min() < 0 or ts.max() >= T:
                raise ConfigError(f"{self.NAME}: {n} steps with {self.timestep_spacing} spacing and steps_offset "
                                  f"{self.steps_offset} give timesteps outside [0, {T - 1}]")
            sig = train[ts]
        final = 0.0 if self.final_sigmas_type == "zero" else train[0]
        return ts, np.concatenate([sig, [final]])

    def plan(self, diffusion: DiffusionConfig, steps: int | None = None) -> StepPlan:
        n = check_steps(steps, diffusion.num_timesteps)
        ts, sig = self.sigmas(diffusion, n)
        with np.errstate(divide="ignore"):
            alpha, sigma = alpha_sigma(sig)
            lam = np.log(alpha) - np.log(sigma)  # +inf at a final σ of 0
        x, z, m = Lin.of("x"), Lin.of("z"), [Lin.of("m0"), Lin.of("m1"), Lin.of("m2")]
        sde = self.algorithm_type == "sde-dpmsolver++"
        rows, history = [], 0
        for k in range(n):
            final = k == n - 1 and (self.euler_at_final or (self.lower_order_final and n < 15)
                                    or self.final_sigmas_type == "zero")
            second = k == n - 2 and self.lower_order_final and n < 15
            order = 1 if (self.solver_order == 1 or k < 1 or final) else \
                2 if (self.solver_order == 2 or k < 2 or second) else 3
            history = max(history, order - 1)
            rows.append(row(np.sqrt(sig[k] ** 2 + 1), sig[k], self._update(order, k, alpha, sigma, lam, x, m, z, sde)))
        return StepPlan(self.NAME, self.options(), ts, noise_ids_for(ts), np.array(rows), history=history)

    def _update(self, order, k, alpha, sigma, lam, x, m, z, sde) -> Lin:
        """diffusers' dpm_solver_first_order_update / multistep_dpm_solver_{second,third}_order_update."""
        a_t, s_t, s_s0 = alpha[k + 1], sigma[k + 1], sigma[k]
        h = lam[k + 1] - lam[k]
        e = np.exp(-h)  # 0 at a final σ of 0 (h = +inf)
        e2 = np.exp(-2.0 * h)
        ratio = s_t / s_s0
        noise = s_t * np.sqrt(1.0 - e2) * z if sde else Lin.zero()
        if order == 1:
            if sde:
                return (ratio * e) * x + (a_t * (1 - e2)) * m[0] + noise
            return ratio * x - (a_t * (e - 1.0)) * m[0]
        h0 = lam[k] - lam[k - 1]
        r0 = h0 / h
        if order == 2:
            D0, D1 = m[0], (1.0 / r0) * (m[0] - m[1])
            if sde:
                c1 = 0.5 * (a_t * (1 - e2)) if self.solver_type == "midpoint" else \
                    a_t * ((1.0 - e2) / (-2.0 * h) + 1.0)
                return (ratio * e) * x + (a_t * (1 - e2)) * D0 + c1 * D1 + noise
            c1 = -0.5 * (a_t * (e - 1.0)) if self.solver_type == "midpoint" else a_t * ((e - 1.0) / h + 1.0)
            return ratio * x - (a_t * (e - 1.0)) * D0 + c1 * D1
        h1 = lam[k - 1] - lam[k - 2]
        r1 = h1 / h
        D1_0, D1_1 = (1.0 / r0) * (m[0] - m[1]), (1.0 / r1) * (m[1] - m[2])
        D1 = D1_0 + (r0 / (r0 + r1)) * (D1_0 - D1_1)
        D2 = (1.0 / (r0 + r1)) * (D1_0 - D1_1)
        if sde:
            return ((ratio * e) * x + (a_t * (1.0 - e2)) * m[0] + (a_t * ((1.0 - e2) / (-2.0 * h) + 1.0)) * D1
                    + (a_t * ((1.0 - e2 - 2.0 * h) / (2.0 * h) ** 2 - 0.5)) * D2 + noise)
        return (ratio * x - (a_t * (e - 1.0)) * m[0] + (a_t * ((e - 1.0) / h + 1.0)) * D1
                - (a_t * ((e - 1.0 + h) / h ** 2 - 0.5)) * D2)
