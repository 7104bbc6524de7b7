"""L0 schedule: our float64 tables vs the paper's equations in float64, and vs diffusers' DDPMScheduler.

diffusers builds β in float32 by design (``torch.linspace(..., dtype=torch.float32)``; the cosine β are computed
in Python floats and then stored as float32), and re-derives β_t = 1 − ᾱ_t/ᾱ_{t−1} in float32 inside
``_get_variance``/``step``. We compare both ways: diffusers' own float32 tables at float32 tolerance (scaled by
the condition number where a quantity is computed by cancellation), and diffusers' formulas run on float64
tables at the float64 tolerance — the formulas agree to rounding, only the precision differs.
"""

import math

import numpy as np
import pytest
import torch

from ddpm_deploy.runtime.config import DataSpec, ModelCard
from ddpm_deploy.runtime.sampling.config import plan_for
from ddpm_deploy.runtime.sampling.plan import COL
from ddpm_deploy.runtime.schedule import DiffusionConfig, Schedule
from ddpm_deploy.runtime.tolerances import L0_DIFFUSERS_FLOAT32_RTOL, L0_FLOAT64_RTOL, assert_close
from ddpm_deploy.verify.parity import compare_rel, level0

T = 1000
DIFFUSERS_NAME = {"linear": "linear", "cosine": "squaredcos_cap_v2"}


def paper(schedule: str, steps: int | None = None) -> dict[str, np.ndarray]:
    """The equations, written out here in float64, independently of runtime.schedule.

    DDPM §4 (linear β 1e-4 → 0.02), eq. 4 (ᾱ_t = Π(1 − β_s)), eq. 7 (posterior mean coefficients and β̃_t);
    improved DDPM eq. 17 (cosine ᾱ, β capped at 0.999) and eq. 19 (respaced β from ᾱ of the kept steps).
    """
    if schedule == "linear":
        beta = np.array([1e-4 + (0.02 - 1e-4) * t / (T - 1) for t in range(T)])
    else:
        f = lambda t: math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        beta = np.array([min(1 - f(t + 1) / f(t), 0.999) for t in range(T)])
    abar_all = np.cumprod(1 - beta)
    ts = np.arange(T) if steps is None else np.unique(np.round(np.linspace(0, T - 1, steps)).astype(int))
    abar = abar_all[ts]
    prev = np.concatenate([[1.0], abar[:-1]])
    b = beta if steps is None else 1 - abar / prev
    return {"timesteps": ts, "betas": b, "alphas_cumprod": abar, "alphas_cumprod_prev": prev,
            "posterior_variance": b * (1 - prev) / (1 - abar),
            "posterior_mean_coef1": b * np.sqrt(prev) / (1 - abar),
            "posterior_mean_coef2": np.sqrt(1 - b) * (1 - prev) / (1 - abar),
            "sqrt_recip_alphas_cumprod": 1 / np.sqrt(abar), "sqrt_recipm1_alphas_cumprod": np.sqrt(1 / abar - 1)}


def ratio_cond(sched: Schedule, derived: bool) -> np.ndarray:
    """Condition number of quantities computed from β where β itself is 1 − ratio (cosine, respaced): 1/β."""
    return 1.0 / sched.betas if derived else np.ones(len(sched))


def var_cond(sched: Schedule) -> np.ndarray:
    """Condition number of β̃_t = β_t·(1 − ᾱ_{t−1})/(1 − ᾱ_t) when each factor is computed by cancellation
    (β_t = 1 − ᾱ_t/ᾱ_{t−1}, 1 − ᾱ with ᾱ ≈ 1): the sum of the factors' condition numbers, t ≥ 1."""
    a, p = sched.alphas_cumprod[1:], sched.alphas_cumprod_prev[1:]
    return 1.0 / sched.betas[1:] + p / (1.0 - p) + a / (1.0 - a)


def diffusers_scheduler(schedule: str, **kw):
    diffusers = pytest.importorskip("diffusers", reason="diffusers (a test dependency) is not installed")
    return diffusers.DDPMScheduler(num_train_timesteps=T, beta_schedule=DIFFUSERS_NAME[schedule], **kw)


# --- vs the paper, float64 ----------------------------------------------------------------------------------

@pytest.mark.parametrize("steps", [None, 50, 7])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_tables_match_the_paper_in_float64(schedule, steps):
    sched, ref = Schedule(DiffusionConfig(schedule=schedule), steps=steps), paper(schedule, steps)
    derived = schedule == "cosine" or steps is not None

    assert np.array_equal(sched.timesteps, ref["timesteps"])
    for name in ("alphas_cumprod", "alphas_cumprod_prev", "sqrt_recip_alphas_cumprod"):
        c = compare_rel(name, getattr(sched, name), ref[name], L0_FLOAT64_RTOL)
        assert c.passed, c.message()
    cond = ratio_cond(sched, derived)
    for name in ("betas", "posterior_variance", "posterior_mean_coef1", "posterior_mean_coef2",
                 "sqrt_recipm1_alphas_cumprod"):
        c = compare_rel(name, getattr(sched, name)[1:], ref[name][1:], L0_FLOAT64_RTOL, cond[1:])
        assert c.passed, c.message()
    assert sched.posterior_variance[0] == 0.0 and sched.posterior_mean_coef2[0] == 0.0  # ᾱ_prev = 1 at t = 0


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
def test_sigmas_are_the_paper_choices(variance_type):
    sched = Schedule(DiffusionConfig(variance_type=variance_type))
    ref = paper("linear")
    want = np.sqrt(ref["posterior_variance"] if variance_type == "fixed_small" else ref["betas"])
    want[0] = 0.0  # no noise at t = 0 (Algorithm 2, line 3)

    assert_close(f"σ ({variance_type})", sched.sigmas, want, L0_FLOAT64_RTOL)
    plan = plan_for(DiffusionConfig(variance_type=variance_type), "ddpm")  # σ_t is the z column, in call order
    assert np.array_equal(plan.table32[:, COL["z"]], sched.sigmas[::-1].astype(np.float32))


def test_golden_values():
    """Point values of the linear and cosine schedules (regression anchors, computed in float64)."""
    lin, cos = Schedule(DiffusionConfig()), Schedule(DiffusionConfig(schedule="cosine"))

    assert lin.alphas_cumprod[-1] == pytest.approx(4.035829765375676e-05, rel=1e-12)
    assert lin.alphas_cumprod[499] == pytest.approx(0.07858724288177824, rel=1e-12)
    assert lin.betas.sum() == pytest.approx(10.05, rel=1e-12)
    assert lin.posterior_variance[1] == pytest.approx(5.4531876613021935e-05, rel=1e-12)
    assert cos.alphas_cumprod[499] == pytest.approx(0.49384359044063775, rel=1e-12)
    assert cos.alphas_cumprod[-1] == pytest.approx(2.4287669070348542e-09, rel=1e-9)
    assert cos.betas[-1] == 0.999  # improved DDPM caps β at 0.999


# --- vs diffusers' DDPMScheduler ----------------------------------------------------------------------------

@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_diffusers_float32_tables_match_at_float32_tolerance(schedule):
    d = diffusers_scheduler(schedule)
    sched = Schedule(DiffusionConfig(schedule=schedule))
    assert d.betas.dtype == torch.float32 and d.alphas_cumprod.dtype == torch.float32  # by design

    c = compare_rel("β", d.betas.double().numpy(), sched.betas, L0_DIFFUSERS_FLOAT32_RTOL)
    assert c.passed, c.message()
    # ᾱ_t: float32 1 − β_s loses digits where β_s ≈ 1 (the cosine cap 0.999): condition max_{s≤t} β_s/(1−β_s)
    cond = np.maximum.accumulate(sched.betas / (1 - sched.betas))
    c = compare_rel("ᾱ", d.alphas_cumprod.double().numpy(), sched.alphas_cumprod, L0_DIFFUSERS_FLOAT32_RTOL, cond)
    assert c.passed, c.message()
    # β̃_t: diffusers re-derives β_t = 1 − ᾱ_t/ᾱ_{t−1} in float32 (condition number ≈ 1/β_t), and 1 − ᾱ_{t−1}
    var = np.array([float(d._get_variance(t)) for t in range(1, T)])
    c = compare_rel("β̃", var, sched.posterior_variance[1:], L0_DIFFUSERS_FLOAT32_RTOL, var_cond(sched))
    assert c.passed, c.message()


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_diffusers_formulas_in_float64_match_at_float64_tolerance(schedule):
    d = diffusers_scheduler(schedule)
    sched = Schedule(DiffusionConfig(schedule=schedule))
    if schedule == "linear":  # diffusers' recipe, run in float64
        d.betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    else:  # betas_for_alpha_bar computes in Python floats (float64) before its float32 cast: redo it in float64
        f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        d.betas = torch.tensor([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)], dtype=torch.float64)
    d.alphas = 1.0 - d.betas
    d.alphas_cumprod = torch.cumprod(d.alphas, 0)
    d.one = torch.tensor(1.0, dtype=torch.float64)
    cond = ratio_cond(sched, schedule == "cosine")

    c = compare_rel("β", d.betas.numpy(), sched.betas, L0_FLOAT64_RTOL, cond)
    assert c.passed, c.message()
    assert_close("ᾱ (relative)", d.alphas_cumprod.numpy() / sched.alphas_cumprod, np.ones(T), L0_FLOAT64_RTOL)
    var = np.array([float(d._get_variance(t)) for t in range(1, T)])
    # _get_variance re-derives β from the ᾱ ratio and 1 − ᾱ by cancellation, in float64 too
    c = compare_rel("β̃", var, sched.posterior_variance[1:], L0_FLOAT64_RTOL, var_cond(sched))
    assert c.passed, c.message()


def test_squaredcos_cap_v2_is_the_cosine_schedule():
    """diffusers' 'squaredcos_cap_v2' (Glide) is improved DDPM's cosine schedule, s = 0.008, β ≤ 0.999."""
    d = diffusers_scheduler("cosine")
    sched = Schedule(DiffusionConfig(schedule="cosine"))

    c = compare_rel("β cosine", d.betas.double().numpy(), sched.betas, L0_DIFFUSERS_FLOAT32_RTOL)
    assert c.passed, c.message()
    assert float(d.betas[-1]) == pytest.approx(0.999, rel=1e-7) and sched.betas[-1] == 0.999


@pytest.mark.parametrize("steps", [50, 7])
def test_respaced_tables_match_diffusers_custom_timesteps(steps):
    """diffusers' step with custom timesteps takes β from the ᾱ ratio of consecutive kept steps, as we do."""
    d = diffusers_scheduler("linear")
    sched = Schedule(DiffusionConfig(), steps=steps)
    d.set_timesteps(timesteps=[int(t) for t in sched.timesteps[::-1]])

    var = np.array([float(d._get_variance(int(t))) for t in sched.timesteps[1:]])
    c = compare_rel("respaced β̃", var, sched.posterior_variance[1:], L0_DIFFUSERS_FLOAT32_RTOL, var_cond(sched))
    assert c.passed, c.message()


@pytest.mark.parametrize("steps", [50, 10])
def test_respacing_is_diffusers_linspace_spacing_not_its_default(steps):
    """Our kept steps are diffusers' timestep_spacing='linspace' (both ends kept); DDPMPipeline's default
    'leading' spacing drops T−1 and keeps 0, T/K, 2T/K, … — a documented difference when comparing respaced runs."""
    lin = diffusers_scheduler("linear", timestep_spacing="linspace")
    lead = diffusers_scheduler("linear")
    lin.set_timesteps(steps)
    lead.set_timesteps(steps)
    ours = Schedule(DiffusionConfig(), steps=steps).timesteps

    assert np.array_equal(lin.timesteps.numpy()[::-1], ours)
    assert lead.timesteps.numpy().max() < T - 1 and T - 1 in ours


def test_level0_of_ddpm_run_parity_passes_and_catches_a_config_mismatch():
    card = ModelCard(DiffusionConfig(variance_type="fixed_large"), DataSpec(1, 8))
    other = DiffusionConfig(beta_end=0.03).to_dict()

    ok = level0(card, None, {"ONNX a.onnx": card.diffusion.to_dict()})
    bad = level0(card, None, {"ONNX b.onnx": other})

    assert all(r.status in ("pass", "skipped") for r in ok)
    meta = [r for r in bad if r.backend == "artifact metadata"][0]
    assert meta.status == "fail" and "beta_end" in meta.reason and "variance_type" in meta.reason
