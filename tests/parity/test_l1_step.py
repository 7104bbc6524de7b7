"""L1 step: one ancestral step with injected noise vs diffusers' ``DDPMScheduler.step``.

Injection: diffusers 0.42's DDPMScheduler.step has no ``variance_noise=`` argument (DDIMScheduler.step has one),
so ``export.diffusers.step_with_noise`` swaps the module's ``randn_tensor`` for the call (and would use the
argument where a diffusers version has it). Both ways of L0 apply: diffusers' formulas on float64 tables agree
within L1_STEP_ATOL; diffusers' own float32 step re-derives β_t = 1 − ᾱ_t/ᾱ_{t−1} in float32, which costs ~3
digits at small t, hence L1_DIFFUSERS_FLOAT32_ATOL. Differences are per unit of the step's magnitude (see
``export.parity.step_scale``): a·x_t and b·ε nearly cancel in x̂0 where ᾱ_t is tiny.

Documented behaviour at the ends of the chain:
- t = 0: diffusers takes ᾱ_prev = 1 and adds no noise (``if t > 0``), so x_{−1} = x̂0 (clipped if enabled) — we
  do the same (c1 = 1, c2 = 0, σ_0 = 0).
- fixed_large at t = 1: diffusers uses σ² = β_1 (as ``1 − ᾱ_1/ᾱ_0``), as we do. Ho et al.'s reference code
  stores β̃_1 in the fixed_large log-variance table at index 0 (for the decoder likelihood), which only matters
  at t = 0, where the noise is masked: sampling is unaffected.
- fixed_small: diffusers clamps β̃_t at 1e-20 before its log (only β̃_0 = 0 is affected, never sampled);
  fixed_small_log is the same σ computed as exp(½·log β̃_t).
"""

import numpy as np
import pytest
import torch

from ddpm_deploy.runtime.schedule import DiffusionConfig, Schedule
from ddpm_deploy.runtime.tolerances import L1_DIFFUSERS_FLOAT32_ATOL, L1_STEP_ATOL, assert_close
from ddpm_deploy.verify.diffusers_ref import step_with_noise
from ddpm_deploy.verify.parity import level1, step_scale

diffusers = pytest.importorskip("diffusers", reason="diffusers (a test dependency) is not installed")

T = 1000
TIMES = [T - 1, T // 2, 10, 1, 0]
SHAPE = (3, 3, 8, 8)


def scheduler(cfg: DiffusionConfig, float64_tables: bool = False, **kw):
    d = diffusers.DDPMScheduler(num_train_timesteps=T, beta_schedule={"linear": "linear", "cosine": "squaredcos_cap_v2"}[
        cfg.schedule], variance_type=kw.pop("variance_type", cfg.variance_type), clip_sample=cfg.clip_denoised, **kw)
    if float64_tables:  # diffusers' formulas, our float64 β
        d.betas = torch.from_numpy(Schedule(cfg).base_betas)
        d.alphas = 1.0 - d.betas
        d.alphas_cumprod = torch.cumprod(d.alphas, 0)
        d.one = torch.tensor(1.0, dtype=torch.float64)
    return d


def inputs(seed: int):
    g = np.random.default_rng(seed)
    return tuple(g.standard_normal(SHAPE).astype(np.float32) for _ in range(3))  # x_t, ε, z


def diffusers_step(d, x, e, t, z):
    dt = d.betas.dtype
    return step_with_noise(d, torch.from_numpy(e).to(dt), t, torch.from_numpy(x).to(dt), torch.from_numpy(z).to(dt)).double().numpy()


@pytest.mark.parametrize("t", TIMES)
@pytest.mark.parametrize("clip", [True, False], ids=["clip", "noclip"])
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_step_matches_diffusers_both_ways(schedule, variance_type, clip, t):
    cfg = DiffusionConfig(schedule=schedule, variance_type=variance_type, clip_denoised=clip)
    sched = Schedule(cfg)
    x, e, z = inputs(t)
    s = step_scale(sched, x, e, t)

    ours = sched.step(x.copy(), e, t, z)

    assert_close(f"step t={t} vs diffusers on float64 tables (Δ / step scale)", ours / s,
                 diffusers_step(scheduler(cfg, float64_tables=True), x, e, t, z) / s, L1_STEP_ATOL)
    assert_close(f"step t={t} vs diffusers float32 (Δ / step scale)", ours / s,
                 diffusers_step(scheduler(cfg), x, e, t, z) / s, L1_DIFFUSERS_FLOAT32_ATOL)


@pytest.mark.parametrize("clip", [True, False], ids=["clip", "noclip"])
def test_t0_returns_x0_without_noise_in_both(clip):
    cfg = DiffusionConfig(clip_denoised=clip)
    sched, d = Schedule(cfg), scheduler(cfg, float64_tables=True)
    x, e, z = inputs(0)
    x0 = (x.astype(np.float64) - np.sqrt(1 - sched.alphas_cumprod[0]) * e) / np.sqrt(sched.alphas_cumprod[0])
    x0 = np.clip(x0, -1, 1) if clip else x0

    ours = sched.step(x.copy(), e, 0, None)
    theirs_z, theirs_0 = diffusers_step(d, x, e, 0, z), diffusers_step(d, x, e, 0, np.zeros_like(z))

    assert np.array_equal(theirs_z, theirs_0)  # diffusers ignores the noise at t = 0
    assert sched.sigmas[0] == 0.0 and sched.posterior_mean_coef2[0] == 0.0
    assert_close("t=0: ours vs x̂0", ours, x0, L1_STEP_ATOL)
    assert_close("t=0: diffusers vs x̂0", theirs_0, x0, L1_STEP_ATOL)


def test_fixed_large_variance_at_t1_is_beta1_in_both():
    cfg = DiffusionConfig(variance_type="fixed_large")
    sched = Schedule(cfg)

    v64 = float(scheduler(cfg, float64_tables=True)._get_variance(1))
    v32 = float(scheduler(cfg)._get_variance(1))

    assert sched.sigmas[1] ** 2 == pytest.approx(sched.betas[1], rel=1e-15)
    assert v64 == pytest.approx(sched.betas[1], rel=1e-12)
    # float32: 1 − ᾱ_1/ᾱ_0 with ᾱ ≈ 1 − 1e-4 keeps ~4 significant digits (documented, L1 tolerance above)
    assert v32 == pytest.approx(sched.betas[1], rel=1e-3) and v32 != pytest.approx(sched.betas[1], rel=1e-6)


def test_injected_noise_is_what_diffusers_adds():
    cfg = DiffusionConfig(variance_type="fixed_large")
    d = scheduler(cfg, float64_tables=True)
    x, e, z = inputs(3)
    t = 400

    diff = diffusers_step(d, x, e, t, z) - diffusers_step(d, x, e, t, np.zeros_like(z))

    assert_close("diffusers step(z) − step(0) = σ_t·z", diff, Schedule(cfg).sigmas[t] * z.astype(np.float64),
                 L1_STEP_ATOL)


@pytest.mark.parametrize("t", [T - 1, 300, 1])
def test_fixed_small_log_is_fixed_small(t):
    cfg = DiffusionConfig(variance_type="fixed_small", clip_denoised=False)
    x, e, z = inputs(t)

    log_var = diffusers_step(scheduler(cfg, float64_tables=True, variance_type="fixed_small_log"), x, e, t, z)
    plain = diffusers_step(scheduler(cfg, float64_tables=True), x, e, t, z)

    assert_close(f"fixed_small_log vs fixed_small t={t}", log_var, plain, L1_STEP_ATOL)


@pytest.mark.parametrize("steps", [50, 7])
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
def test_respaced_step_matches_diffusers_custom_timesteps(variance_type, steps):
    cfg = DiffusionConfig(variance_type=variance_type, clip_denoised=False)
    sched = Schedule(cfg, steps=steps)
    d = scheduler(cfg, float64_tables=True)
    d.set_timesteps(timesteps=[int(t) for t in sched.timesteps[::-1]])

    for i in (len(sched) - 1, len(sched) // 2, 1, 0):
        x, e, z = inputs(i)
        s = step_scale(sched, x, e, i)
        ours = sched.step(x.copy(), e, i, z)
        assert_close(f"respaced K={steps} i={i}", ours / s, diffusers_step(d, x, e, int(sched.timesteps[i]), z) / s,
                     L1_STEP_ATOL)


def test_golden_step():
    """A deterministic input (diffusers' scheduler tests style): arange sample, ε = 0.1·x, z = ones, t = 500."""
    sched = Schedule(DiffusionConfig())
    x = (np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE) / np.prod(SHAPE) * 2 - 1).astype(np.float32)

    out = sched.step(x.copy(), 0.1 * x, 500, np.ones_like(x))

    assert float(out.sum(dtype=np.float64)) == pytest.approx(56.7505, abs=1e-3)
    assert float(out[0, 0, 0, 0]) == pytest.approx(-0.896906, abs=1e-5)


@pytest.mark.parametrize("steps", [None, 20])
def test_level1_of_ddpm_run_parity_passes(steps):
    results = level1(DiffusionConfig(variance_type="fixed_large"), steps)

    assert [r.status for r in results] == ["pass", "pass", "pass"]
    assert all(c.max_abs <= c.tol for r in results for c in r.checks)
