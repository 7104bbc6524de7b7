"""Every scheduler against diffusers (the library our users would pick instead): diffusers' own golden loops from
its tests/schedulers/, and our plans vs diffusers' scheduler objects on the same ε (a deterministic function, the
trained micro run) with the same x_T and ``variance_noise``. Where diffusers is known to be wrong (DDIM's previous
timestep, huggingface/diffusers #9261), the difference is shown and our side is checked against the paper."""

from __future__ import annotations

import numpy as np
import pytest

from ddpm_deploy.runtime.sampling.config import plan_for
from ddpm_deploy.runtime.sampling.host import HostLoop
from ddpm_deploy.runtime.schedule import DiffusionConfig
from ddpm_deploy.runtime.tolerances import L1_SCHEDULER_FP32_RTOL

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
from ddpm_deploy.verify.diffusers_ref import PREVIOUS_TIMESTEP_BUG, diffusers_agrees, sample_with_scheduler  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- diffusers' golden loops (tests/schedulers/ of huggingface/diffusers) ------------------------------------------

def deterministic_sample() -> np.ndarray:
    """diffusers' SchedulerCommonTest.dummy_sample_deter: 0 … N−1 over N = 4·3·8·8 elements laid out
    (C, H, W, B), divided by N, moved to (B, C, H, W)."""
    n = 4 * 3 * 8 * 8
    return (np.arange(n, dtype=np.float64).reshape(3, 8, 8, 4) / n).transpose(3, 0, 1, 2).astype(np.float32)


class DummyModel:
    """diffusers' SchedulerCommonTest.dummy_model: ε = x · t / (t + 1)."""

    def eps(self, x, t):
        t = t.astype(np.float32)[:, None, None, None]
        return (x * t / (t + 1)).astype(np.float32)


def golden_loop(name: str, steps: int, cfg: DiffusionConfig = DiffusionConfig(), **options) -> np.ndarray:
    plan = plan_for(cfg, name, steps, **options)
    x = deterministic_sample()
    loop = HostLoop(DummyModel(), x.shape[1:], len(x))
    loop.admit(np.arange(len(x)), plan, 0, np.arange(len(x)), x_T=x)
    for _ in range(len(plan)):
        loop.step()
    return loop.take(np.arange(len(x))).astype(np.float64)


@pytest.mark.parametrize("test_name, name, options, cfg, want_sum, want_mean", [
    ("test_scheduler_ddim.py::test_full_loop_no_noise", "ddim", {}, DiffusionConfig(), 172.0067, 0.223967),
    ("test_scheduler_ddim.py::test_full_loop_with_set_alpha_to_one", "ddim", {"set_alpha_to_one": True},
     DiffusionConfig(beta_start=0.01), 149.8295, 0.1951),
    ("test_scheduler_ddim.py::test_full_loop_with_no_set_alpha_to_one", "ddim", {"set_alpha_to_one": False},
     DiffusionConfig(beta_start=0.01), 149.0784, 0.1941),
    ("test_scheduler_unipc.py::test_full_loop_no_noise", "unipc", {"final_sigmas_type": "sigma_min"},
     DiffusionConfig(), None, 0.2464),
    ("test_scheduler_unipc.py::test_full_loop_with_karras", "unipc",
     {"final_sigmas_type": "sigma_min", "use_karras_sigmas": True}, DiffusionConfig(), None, 0.2925),
    # the golden predates diffusers' final_sigmas_type default "zero"; diffusers 0.42.1 gives 0.3301 with
    # "sigma_min" (the default of that test's time) and 0.2409 with "zero", as ours does
    ("test_scheduler_dpm_multi.py::test_full_loop_no_noise", "dpmsolver++",
     {"lower_order_final": False, "final_sigmas_type": "sigma_min"}, DiffusionConfig(), None, 0.3301),
])
def test_diffusers_golden_loops(test_name, name, options, cfg, want_sum, want_mean):
    """10 steps of the dummy model from the deterministic sample: diffusers' asserted |x| sum (±1e-2) and mean
    (±1e-3), the numbers and tolerances of the diffusers test named."""
    x = golden_loop(name, 10, cfg, **options)

    if want_sum is not None:
        assert abs(np.abs(x).sum() - want_sum) < 1e-2, (test_name, np.abs(x).sum())
    assert abs(np.abs(x).mean() - want_mean) < 1e-3, (test_name, np.abs(x).mean())


# --- ours vs diffusers' scheduler objects, same ε and noise ---------------------------------------------------

class TanhModel:
    """A deterministic stand-in for a UNet whose ε depends on x and t."""

    def eps(self, x, t):
        return np.tanh(0.9 * x + t.astype(np.float32)[:, None, None, None] * 1e-3).astype(np.float32)


CONFIGS = [  # (scheduler, steps, options): every scheduler, spacing and order of the issue
    ("ddpm", 50, {"timestep_spacing": "leading"}),
    ("ddpm", 20, {}),
    ("ddpm", 25, {"variance_type": "fixed_large", "clip_sample": False}),
    ("ddim", 10, {}),
    ("ddim", 20, {"eta": 1.0}),
    ("ddim", 50, {"eta": 0.3, "timestep_spacing": "trailing"}),
    ("ddim", 10, {"steps_offset": 1, "set_alpha_to_one": False}),
    ("dpmsolver++", 10, {}),
    ("dpmsolver++", 20, {"solver_order": 3}),
    ("dpmsolver++", 15, {"solver_order": 1}),
    ("dpmsolver++", 12, {"solver_type": "heun", "lower_order_final": False}),
    ("dpmsolver++", 10, {"use_karras_sigmas": True}),
    ("dpmsolver++", 10, {"use_lu_lambdas": True}),
    ("dpmsolver++", 16, {"final_sigmas_type": "sigma_min", "timestep_spacing": "trailing"}),
    ("dpmsolver++", 10, {"timestep_spacing": "leading", "euler_at_final": True}),
    ("sde-dpmsolver++", 20, {}),
    ("sde-dpmsolver++", 15, {"solver_order": 3}),
    ("sde-dpmsolver++", 10, {"solver_type": "heun", "use_karras_sigmas": True}),
    ("unipc", 10, {}),
    ("unipc", 5, {"solver_order": 3}),
    ("unipc", 10, {"solver_type": "bh1", "final_sigmas_type": "sigma_min"}),
    ("unipc", 8, {"solver_order": 3, "solver_type": "bh1", "final_sigmas_type": "sigma_min"}),
    ("unipc", 12, {"use_karras_sigmas": True}),
    ("unipc", 10, {"disable_corrector": [0, 4], "timestep_spacing": "trailing"}),
]


def _ours(plan, model, shape=(2, 4, 4), seed=5, idx=(0, 3)):
    x, _ = HostLoop(model, shape, len(idx)).sample(plan, seed, list(idx))
    return x


@pytest.mark.parametrize("name, steps, options", CONFIGS, ids=[f"{n}-{s}-{o}" for n, s, o in CONFIGS])
def test_plan_matches_diffusers_scheduler(name, steps, options):
    cfg = DiffusionConfig()
    plan = plan_for(cfg, name, steps, **options)
    assert diffusers_agrees(plan, cfg.num_timesteps)[0]

    got = _ours(plan, TanhModel())
    want = sample_with_scheduler(TanhModel().eps, plan, cfg, (2, 4, 4), 5, [0, 3])  # raises if timesteps differ

    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= L1_SCHEDULER_FP32_RTOL * scale, (np.abs(got - want).max(), scale)
    if plan.stochastic:  # the noise matters: another seed's z gives another image
        other = sample_with_scheduler(TanhModel().eps, plan, cfg, (2, 4, 4), 6, [0, 3])
        assert np.abs(other - want).max() > 100 * L1_SCHEDULER_FP32_RTOL * scale


def ddim_paper(plan, model, x, timesteps, final_abar=1.0, clip=True):
    """DDIM (Song et al. 2021, eq. 12, η = 0) in float64, stepping to the next timestep of the list."""
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    x = x.astype(np.float64)
    for k, t in enumerate(timesteps):
        e = model.eps(x.astype(np.float32), np.full(len(x), t, np.int32)).astype(np.float64)
        a_t = abar[t]
        a_prev = abar[timesteps[k + 1]] if k + 1 < len(timesteps) else final_abar
        x0 = (x - np.sqrt(1 - a_t) * e) / np.sqrt(a_t)
        x0 = np.clip(x0, -1, 1) if clip else x0
        x = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * e
    return x


@pytest.mark.parametrize("spacing, steps", [("linspace", 20), ("trailing", 30)])
def test_ddim_previous_timestep_follows_the_list_where_diffusers_does_not(spacing, steps):
    """diffusers steps DDIM to t − T // N (#9261): for linspace spacing, and trailing with N ∤ T, that is not the
    next timestep it calls. Ours follows the list: equal to the paper's update in float64, and away from diffusers."""
    from ddpm_deploy.runtime import rng

    cfg = DiffusionConfig()
    plan = plan_for(cfg, "ddim", steps, timestep_spacing=spacing)
    agree, why = diffusers_agrees(plan, cfg.num_timesteps)
    assert not agree and why == PREVIOUS_TIMESTEP_BUG

    got = _ours(plan, TanhModel())
    x_T = rng.normals(5, [0, 3], rng.INITIAL_STEP, (2, 4, 4))
    paper = ddim_paper(plan, TanhModel(), x_T, plan.timesteps)
    theirs = sample_with_scheduler(TanhModel().eps, plan, cfg, (2, 4, 4), 5, [0, 3])

    scale = np.abs(paper).max()
    assert np.abs(got - paper).max() <= L1_SCHEDULER_FP32_RTOL * scale
    assert np.abs(theirs - paper).max() > 10 * L1_SCHEDULER_FP32_RTOL * scale  # diffusers' trajectory is another one


@pytest.mark.parametrize("name, steps, options", [("ddim", 10, {"eta": 0.5}), ("dpmsolver++", 15, {"solver_order": 3}),
                                                  ("sde-dpmsolver++", 10, {}), ("unipc", 10, {})])
def test_plan_matches_diffusers_on_the_trained_micro_model(micro_onnx, name, steps, options):
    """The same with ε from the trained micro run (ONNX Runtime), the model ddpm-run samples."""
    from ddpm_deploy.runtime.backends.ort import OrtRunner

    runner = OrtRunner(micro_onnx, threads=1)
    plan = plan_for(runner.card.diffusion, name, steps, **options)
    shape = runner.sample_shape

    got = _ours(plan, runner, shape, seed=2, idx=(0, 1, 2))
    want = sample_with_scheduler(runner.eps, plan, runner.card.diffusion, shape, 2, [0, 1, 2])

    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= L1_SCHEDULER_FP32_RTOL * scale
