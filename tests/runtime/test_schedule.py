"""Schedule tables (paper formulas in float64) and the NumPy step (golden values, respacing)."""

import numpy as np
import pytest

from ddpm_deploy.runtime.errors import ConfigError
from ddpm_deploy.runtime.schedule import DiffusionConfig, Schedule, respaced_timesteps
from ddpm_deploy.runtime.tolerances import (L0_FLOAT64_ATOL, L0_FLOAT64_RTOL, L0_RESPACED_CUMPROD_RTOL, L1_STEP_GOLDEN_ATOL,
                                            L1_STEP_GOLDEN_RTOL)


def test_linear_schedule_matches_paper_formulas_in_float64():
    s = Schedule(DiffusionConfig())
    beta = 1e-4 + (0.02 - 1e-4) * np.arange(1000) / 999
    abar = np.cumprod(1 - beta)
    assert s.betas.dtype == np.float64
    np.testing.assert_allclose(s.betas, beta, rtol=0, atol=L0_FLOAT64_ATOL)
    np.testing.assert_allclose(s.alphas_cumprod, abar, rtol=L0_FLOAT64_RTOL)
    # eq. 7 posterior variance and mean coefficients
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    np.testing.assert_allclose(s.posterior_variance, beta * (1 - abar_prev) / (1 - abar), rtol=L0_FLOAT64_RTOL)
    np.testing.assert_allclose(s.posterior_mean_coef1, beta * np.sqrt(abar_prev) / (1 - abar), rtol=L0_FLOAT64_RTOL)
    np.testing.assert_allclose(s.posterior_mean_coef2, (1 - abar_prev) * np.sqrt(1 - beta) / (1 - abar), rtol=L0_FLOAT64_RTOL)
    assert s.sigmas[0] == 0.0
    # known endpoint of the DDPM linear schedule: ᾱ_T ≈ 4.04e-5
    assert abar[-1] == pytest.approx(4.0358e-5, rel=1e-3)


def test_fixed_large_uses_beta_and_fixed_small_uses_posterior_variance():
    small = Schedule(DiffusionConfig(variance_type="fixed_small"))
    large = Schedule(DiffusionConfig(variance_type="fixed_large"))
    np.testing.assert_allclose(small.sigmas[1:] ** 2, small.posterior_variance[1:], rtol=L0_FLOAT64_RTOL)
    np.testing.assert_allclose(large.sigmas[1:] ** 2, large.betas[1:], rtol=L0_FLOAT64_RTOL)
    assert (large.sigmas[1:] > small.sigmas[1:]).all()


def test_cosine_schedule_is_clipped_and_monotone():
    s = Schedule(DiffusionConfig(schedule="cosine"))
    assert s.betas.max() <= 0.999
    assert (np.diff(s.alphas_cumprod) < 0).all()


def test_step_golden_values_with_arange_sample():
    # diffusers-style golden test: deterministic sample, dummy ε, fixed noise
    s = Schedule(DiffusionConfig())
    x = (np.arange(2 * 1 * 4 * 4, dtype=np.float32).reshape(2, 1, 4, 4) / 32.0 - 0.5)
    eps = 0.1 * x
    z = np.full_like(x, 0.5)
    out = s.step(x.copy(), eps, 999, z)
    # closed form for this input, computed independently in float64
    b, abar = s.betas[999], s.alphas_cumprod[999]
    abar_prev = s.alphas_cumprod[998]
    x0 = np.clip(np.sqrt(1 / abar) * x - np.sqrt(1 / abar - 1) * eps, -1, 1)
    mean = b * np.sqrt(abar_prev) / (1 - abar) * x0 + (1 - abar_prev) * np.sqrt(1 - b) / (1 - abar) * x
    want = mean + np.sqrt(b * (1 - abar_prev) / (1 - abar)) * 0.5
    np.testing.assert_allclose(out, want, rtol=L1_STEP_GOLDEN_RTOL, atol=L1_STEP_GOLDEN_ATOL)
    assert out.dtype == np.float32
    assert float(out.sum()) == pytest.approx(float(want.sum()), rel=L1_STEP_GOLDEN_RTOL)


def test_last_step_adds_no_noise():
    s = Schedule(DiffusionConfig())
    x = np.ones((1, 1, 2, 2), np.float32)
    a = s.step(x.copy(), np.zeros_like(x), 0, None)
    b = s.step(x.copy(), np.zeros_like(x), 0, np.full_like(x, 100.0))
    np.testing.assert_array_equal(a, b)


def test_clip_changes_result_only_when_x0_out_of_range():
    on = Schedule(DiffusionConfig(clip_denoised=True))
    off = Schedule(DiffusionConfig(clip_denoised=False))
    x = np.full((1, 1, 2, 2), 3.0, np.float32)
    eps = np.zeros_like(x)
    assert not np.allclose(on.step(x.copy(), eps, 500, eps), off.step(x.copy(), eps, 500, eps))
    small = np.full_like(x, 0.01)
    np.testing.assert_array_equal(on.step(small.copy(), eps, 10, eps), off.step(small.copy(), eps, 10, eps))


def test_respacing_keeps_both_ends_and_recomputes_beta_from_alphabar():
    s = Schedule(DiffusionConfig(), steps=50)
    assert len(s) == 50 and s.timesteps[0] == 0 and s.timesteps[-1] == 999
    base = Schedule(DiffusionConfig())
    np.testing.assert_allclose(s.alphas_cumprod, base.alphas_cumprod[s.timesteps], rtol=L0_FLOAT64_RTOL)
    np.testing.assert_allclose(np.cumprod(1 - s.betas), s.alphas_cumprod, rtol=L0_RESPACED_CUMPROD_RTOL)


def test_full_steps_equal_no_respacing():
    a, b = Schedule(DiffusionConfig(), steps=1000), Schedule(DiffusionConfig())
    for name in ("timesteps", "betas", "posterior_mean_coef1", "posterior_mean_coef2", "sigmas"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))


@pytest.mark.parametrize("steps", [0, 1, 1001])
def test_bad_steps_rejected(steps):
    with pytest.raises(ConfigError, match=f"^steps must be between 2 and 1000 .*found {steps}$"):
        respaced_timesteps(1000, steps)


@pytest.mark.parametrize("kw", [dict(schedule="quadratic"), dict(variance_type="learned"), dict(num_timesteps=1),
                                dict(beta_start=0.5, beta_end=0.1)])
def test_bad_config_rejected(kw):
    with pytest.raises(ConfigError):
        DiffusionConfig(**kw)


def test_config_round_trips_through_dict():
    c = DiffusionConfig(schedule="cosine", variance_type="fixed_large", clip_denoised=False, num_timesteps=500)
    assert DiffusionConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ConfigError, match="unknown"):
        DiffusionConfig.from_dict({**c.to_dict(), "bogus": 1})
