"""Timestep lists and noise levels, as small pure functions (k-diffusion's ``get_sigmas_*`` style), with
diffusers' spacing names and formulas (``set_timesteps`` of its DDIM, DPM-Solver and UniPC schedulers).

Every list is the ε-call order: descending original timesteps, int64.
"""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError

SPACINGS = ("linspace", "leading", "trailing")


def spaced(T: int, n: int, spacing: str, steps_offset: int = 0) -> np.ndarray:
    """DDIM's (and DDPM's) spacings of ``n`` timesteps over [0, T − 1] (diffusers DDIMScheduler.set_timesteps).

    ``linspace`` is also the respacing of improved DDPM (Nichol & Dhariwal 2021 §4), both ends kept."""
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, n).round()[::-1]
    elif spacing == "leading":
        ts = (np.arange(0, n) * (T // n)).round()[::-1] + steps_offset
    elif spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / n)) - 1
    else:
        raise ConfigError(f"timestep_spacing must be one of {list(SPACINGS)}, found {spacing!r}")
    return np.ascontiguousarray(ts, dtype=np.int64)


def spaced_solver(last: int, T: int, n: int, spacing: str, steps_offset: int = 0) -> np.ndarray:
    """The multistep solvers' spacings (diffusers DPMSolverMultistepScheduler / UniPCMultistepScheduler
    .set_timesteps): ``n + 1`` points with the last dropped; ``last`` is T less the λ-clipped tail."""
    if spacing == "linspace":
        ts = np.linspace(0, last - 1, n + 1).round()[::-1][:-1]
    elif spacing == "leading":
        ts = (np.arange(0, n + 1) * (last // (n + 1))).round()[::-1][:-1] + steps_offset
    elif spacing == "trailing":
        ts = np.arange(last, 0, -T / n).round() - 1
    else:
        raise ConfigError(f"timestep_spacing must be one of {list(SPACINGS)}, found {spacing!r}")
    return np.ascontiguousarray(ts, dtype=np.int64)


def karras(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022 (eq. 5) noise levels, descending (k-diffusion get_sigmas_karras, without the 0)."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def lu_lambdas(lambda_min: float, lambda_max: float, n: int) -> np.ndarray:
    """Lu et al. 2022 (DPM-Solver): λ uniform in log-SNR, descending noise (diffusers _convert_to_lu)."""
    return lambda_max + np.linspace(0, 1, n) * (lambda_min - lambda_max)


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional timestep of each σ by interpolation in log σ (diffusers _sigma_to_t, k-diffusion sigma_to_t)."""
    sigma = np.asarray(sigma, dtype=np.float64)
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high = low + 1
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[high]), 0, 1)
    return ((1 - w) * low + w * high).reshape(sigma.shape)
