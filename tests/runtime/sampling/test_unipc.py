"""UniPC's step plan vs diffusers' UniPCMultistepScheduler, step by step on a dummy ε-model.

diffusers builds ᾱ in float32 and stores its σ table as float32 (``set_timesteps``: ``.astype(np.float32)``), so
its coefficients carry float32 rounding whatever the sample's dtype. We compare both ways, as the L0 schedule
parity does: diffusers' formulas run on float64 tables (its ᾱ replaced by ours, its float32 cast made float64
while ``set_timesteps`` runs) at a float64 tolerance, and diffusers as shipped at a float32-table tolerance.
Our side is the plan's table applied row by row with ``rules.linear_step`` in float64.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from unittest import mock

import numpy as np
import pytest

from ddpm_deploy.runtime.errors import ConfigError
from ddpm_deploy.runtime.sampling.plan import COL, MAX_HISTORY
from ddpm_deploy.runtime.sampling.rules import linear_step
from ddpm_deploy.runtime.sampling.schedulers.base import alphas_cumprod
from ddpm_deploy.runtime.sampling.schedulers.unipc import UniPCConfig
from ddpm_deploy.runtime.schedule import DiffusionConfig

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers", reason="diffusers (a test dependency) is not installed")
unipc_module = pytest.importorskip("diffusers.schedulers.scheduling_unipc_multistep")

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              # diffusers' np.array(tensor) under NumPy 2 (torch's __array__ has no copy keyword)
              pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]

DIFF = DiffusionConfig()  # linear β 1e-4 → 0.02, T = 1000
SHAPE = (2, 3, 4, 4)
FLOAT64_RTOL = 1e-12  # diffusers' formulas on float64 tables (measured: at most 7e-15 over CASES, 5 to 50 steps)
# diffusers as shipped, float32 ᾱ and σ (measured: 3e-8 to 3e-7; up to 3e-5 where the last steps reach σ_min or
# small Karras σ in few steps: σ_min = √((1 − ᾱ_0)/ᾱ_0) has a relative error of ~3e-4 from ᾱ_0 in float32)
FLOAT32_TABLE_RTOL = 1e-4


def eps_model(x, t):
    """A smooth nonlinear ε (NumPy or torch, float64): tanh(0.9·x + 1e-3·t)."""
    return (torch if isinstance(x, torch.Tensor) else np).tanh(0.9 * x + 1e-3 * float(t))


def x_T() -> np.ndarray:
    return np.random.default_rng(0).standard_normal(SHAPE)


class _Float64Numpy:
    """numpy, with float32 meaning float64: diffusers' ``set_timesteps`` then keeps its σ table in float64."""

    float32 = np.float64

    def __getattr__(self, name):
        return getattr(np, name)


@contextmanager
def _float64_tables():
    with mock.patch.object(unipc_module, "np", _Float64Numpy()):
        yield


def diffusers_scheduler(cfg: UniPCConfig, steps: int, float64: bool):
    opts = cfg.options()
    s = diffusers.UniPCMultistepScheduler(num_train_timesteps=DIFF.num_timesteps, beta_start=DIFF.beta_start,
                                          beta_end=DIFF.beta_end, beta_schedule="linear", prediction_type="epsilon",
                                          predict_x0=True, **opts)
    if float64:
        s.alphas_cumprod = torch.from_numpy(alphas_cumprod(DIFF))
        with _float64_tables():
            s.set_timesteps(steps)
        assert s.sigmas.dtype == torch.float64
    else:
        s.set_timesteps(steps)
    return s


def run_diffusers(cfg: UniPCConfig, steps: int, float64: bool = True) -> tuple[np.ndarray, np.ndarray, bool]:
    """(timesteps, trajectory, whether the last step was NaN in diffusers and replaced by its limit). The trajectory
    is [K, 2, ...]: after each step, the next sample and ``last_sample`` (the corrected sample of the step)."""
    s = diffusers_scheduler(cfg, steps, float64)
    x = torch.from_numpy(x_T())
    patched, traj = False, []
    for k, t in enumerate(s.timesteps):
        out = s.step(eps_model(x, int(t)), t, x).prev_sample
        if k == len(s.timesteps) - 1 and not torch.isfinite(out).all():
            out, patched = _limit_of_last_step(cfg, s), True
        x = out
        traj.append(np.stack([x.numpy(), s.last_sample.numpy()]))
    return s.timesteps.numpy(), np.array(traj), patched


def _limit_of_last_step(cfg: UniPCConfig, s):
    """The value of a last step that diffusers computes as NaN, where the limit is finite:

    * bh1 to σ = 0 (order 1): B(h) = −h = −∞ times a residual of 0 (an int): the step is x̂0 (as bh2 gives);
    * Karras σ with σ_last = σ_min: a zero-length step (h = 0), whose ρ system is 0/0 at order 3: the step is the
      identity on the (corrected) sample it starts from, diffusers' ``last_sample`` (as it gives at order ≤ 2)."""
    if cfg.solver_type == "bh1" and cfg.final_sigmas_type == "zero":
        return s.model_outputs[-1]
    assert cfg.use_karras_sigmas and cfg.final_sigmas_type == "sigma_min" and s.this_order == 3, "unexpected NaN"
    return s.last_sample


def run_plan(plan) -> np.ndarray:
    """The host loop: one table row per step for every image, float64, history shift after each step. Returns the
    trajectory as ``run_diffusers``: [K, 2, ...], x_next and xp_next after each step."""
    x = x_T()
    B = x.shape[0]
    coef = plan.table.astype(np.float64)
    hist = np.zeros((MAX_HISTORY, *x.shape))
    xp = np.zeros_like(x)
    traj = []
    for k, t in enumerate(plan.timesteps):
        rows = np.repeat(coef[k][None], B, axis=0)
        x, m0, xp = linear_step(x, eps_model(x, int(t)), rows, hist, xp, None)
        hist = np.stack([m0, hist[0], hist[1]])
        traj.append(np.stack([x, xp]))
    return np.array(traj)


def rel(got: np.ndarray, want: np.ndarray) -> float:
    """The largest error relative to the largest magnitude, of each step's sample and corrected sample."""
    axes = tuple(range(2, want.ndim))
    return float(np.max(np.max(np.abs(got - want), axis=axes) / np.max(np.abs(want), axis=axes)))


CASES = [
    *[dict(solver_order=o, solver_type=bh) for o in (1, 2, 3) for bh in ("bh1", "bh2")],
    dict(solver_order=2, lower_order_final=False, final_sigmas_type="sigma_min"),
    dict(solver_order=3, lower_order_final=False, final_sigmas_type="sigma_min", solver_type="bh1"),
    dict(solver_order=3, lower_order_final=False, final_sigmas_type="sigma_min"),
    dict(solver_order=3, timestep_spacing="leading"),
    dict(solver_order=2, timestep_spacing="leading", steps_offset=1, solver_type="bh1"),
    dict(solver_order=3, timestep_spacing="trailing"),
    dict(solver_order=3, use_karras_sigmas=True),
    dict(solver_order=2, use_karras_sigmas=True, final_sigmas_type="sigma_min", solver_type="bh1"),
    dict(solver_order=3, use_karras_sigmas=True, final_sigmas_type="sigma_min", lower_order_final=False),
    dict(solver_order=2, final_sigmas_type="sigma_min"),
    dict(solver_order=3, final_sigmas_type="sigma_min", solver_type="bh1"),
    dict(solver_order=3, use_karras_sigmas=True, final_sigmas_type="sigma_min"),
    dict(solver_order=3, disable_corrector=[0]),
    dict(solver_order=3, disable_corrector=[2], solver_type="bh1"),
    dict(solver_order=2, disable_corrector=(2, 0)),
]


def _id(c: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in c.items())


@pytest.mark.parametrize("steps", [5, 10, 20])
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_matches_diffusers_float64(case, steps):
    cfg = UniPCConfig(**case)
    plan = cfg.plan(DIFF, steps)
    ts, want, _ = run_diffusers(cfg, steps, float64=True)
    assert np.array_equal(plan.timesteps, ts)
    got = run_plan(plan)
    assert np.isfinite(got).all()
    assert rel(got, want) < FLOAT64_RTOL, rel(got, want)


@pytest.mark.parametrize("steps", [5, 20])
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_matches_diffusers_as_shipped(case, steps):
    """diffusers' own float32 ᾱ and σ: the same timesteps, the trajectory within float32-table rounding."""
    cfg = UniPCConfig(**case)
    plan = cfg.plan(DIFF, steps)
    ts, want, _ = run_diffusers(cfg, steps, float64=False)
    assert np.array_equal(plan.timesteps, ts)
    assert rel(run_plan(plan), want) < FLOAT32_TABLE_RTOL, rel(run_plan(plan), want)


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("steps", [1, 3, 7, 25, 100, 999])
def test_timesteps_match_diffusers(spacing, steps):
    for offset in (0, 1) if spacing == "leading" else (0,):
        cfg = UniPCConfig(timestep_spacing=spacing, steps_offset=offset)
        want = diffusers_scheduler(cfg, steps, float64=False).timesteps.numpy()
        if want.max() > DIFF.num_timesteps - 1:  # leading, 999 steps, offset 1: t = 1000 (diffusers clamps its σ)
            with pytest.raises(ConfigError, match="outside"):
                cfg.plan(DIFF, steps)
        else:
            assert np.array_equal(cfg.plan(DIFF, steps).timesteps, want)


def test_karras_timesteps_match_diffusers():
    """Karras: t = round(sigma_to_t(σ)) over log σ of the training schedule. Equal to diffusers' on float64 tables;
    on its float32 ᾱ, a t that falls within rounding of k + ½ may round the other way (seen: 1 of 100 steps)."""
    for steps in (1, 3, 10, 100, 200, 999):
        cfg = UniPCConfig(use_karras_sigmas=True)
        ours = cfg.plan(DIFF, steps).timesteps
        assert np.array_equal(ours, diffusers_scheduler(cfg, steps, float64=True).timesteps.numpy()), steps
        shipped = diffusers_scheduler(cfg, steps, float64=False).timesteps.numpy()
        assert np.abs(ours - shipped).max() <= 1 and np.count_nonzero(ours != shipped) <= max(1, steps // 100), steps


def test_bh1_to_sigma_zero_gives_the_last_x0():
    """diffusers' bh1 last step to σ = 0 is NaN (∞·0, diffusers 0.42); ours is its limit x̂0, bh2's last step."""
    cfg = UniPCConfig(solver_type="bh1")
    _, want, _ = run_diffusers(cfg, 6)
    plan = cfg.plan(DIFF, 6)
    last = plan.table[-1]
    x_next = dict(zip(("x", "eps", "m0", "m1", "m2", "m3", "xp", "z"), last[COL["x"]:COL["z"] + 1]))
    assert x_next == {"x": 0, "eps": 0, "m0": 1, "m1": 0, "m2": 0, "m3": 0, "xp": 0, "z": 0}
    assert np.array_equal(last[COL["x"]:COL["z"] + 1], UniPCConfig().plan(DIFF, 6).table[-1, COL["x"]:COL["z"] + 1])
    assert rel(run_plan(plan), want) < FLOAT64_RTOL


@pytest.mark.parametrize("order", [2, 3])
def test_order_above_one_to_sigma_zero_is_refused(order):
    """lower_order_final=False, σ_last = 0: diffusers' order ≥ 2 last step divides by r_k = 0 (inf/NaN at order 2,
    a singular solve at order 3); we refuse the combination, except with one step (order 1 by warm-up)."""
    cfg = UniPCConfig(solver_order=order, lower_order_final=False)
    with pytest.raises(ConfigError, match="lower_order_final"):
        cfg.plan(DIFF, 5)
    assert len(cfg.plan(DIFF, 1)) == 1
    s = diffusers_scheduler(cfg, 5, float64=True)
    x = torch.from_numpy(x_T())
    try:
        for t in s.timesteps:
            x = s.step(eps_model(x, int(t)), t, x).prev_sample
    except RuntimeError:  # torch.linalg.solve: singular
        assert order == 3
    else:
        assert not torch.isfinite(x).all()


def test_plan_shape():
    p = UniPCConfig(solver_order=3).plan(DIFF, 10)
    assert p.uses_xp and p.history == 3 and not p.stochastic
    assert (p.table[:, COL["z"]] == 0).all() and (p.table[:, COL["eps"]] == 0).all()
    assert np.array_equal(p.noise_ids, p.timesteps.astype(np.uint32))
    assert UniPCConfig(solver_order=2).plan(DIFF, 10).history == 2
    assert UniPCConfig(solver_order=1).plan(DIFF, 10).history == 1
    assert UniPCConfig(solver_order=3, disable_corrector=list(range(10))).plan(DIFF, 10).history == 2
    assert UniPCConfig().plan(DIFF, 1).history == 0
    karras = UniPCConfig(use_karras_sigmas=True).plan(DIFF, 200)  # rounded Karras timesteps repeat near t = 0
    assert len(np.unique(karras.timesteps)) < 200 and len(np.unique(karras.noise_ids)) == 200


def test_options():
    cfg = UniPCConfig(disable_corrector=[3, 0, 3])
    assert cfg.disable_corrector == (0, 3) and hash(cfg) == hash(UniPCConfig(disable_corrector=(0, 3)))
    opts = cfg.options()
    assert opts["disable_corrector"] == [0, 3] and json.loads(json.dumps(opts)) == opts
    assert UniPCConfig(**opts) == cfg
    assert set(opts) == {"solver_order", "solver_type", "lower_order_final", "disable_corrector", "use_karras_sigmas",
                         "timestep_spacing", "steps_offset", "final_sigmas_type"}
    d = UniPCConfig()
    assert (d.solver_order, d.solver_type, d.lower_order_final, d.disable_corrector, d.use_karras_sigmas,
            d.timestep_spacing, d.steps_offset, d.final_sigmas_type) == \
        (2, "bh2", True, (), False, "linspace", 0, "zero")


@pytest.mark.parametrize("field,value", [
    ("solver_order", 4), ("solver_order", 0), ("solver_order", 2.0), ("solver_order", True),
    ("solver_type", "bh3"), ("solver_type", 1), ("lower_order_final", 1), ("disable_corrector", [-1]),
    ("disable_corrector", [True]), ("disable_corrector", "0"), ("disable_corrector", 3), ("disable_corrector", [1.0]),
    ("use_karras_sigmas", "yes"), ("timestep_spacing", "uniform"), ("steps_offset", -1),
    ("final_sigmas_type", "sigma_max"),
])
def test_bad_option_names_the_field(field, value):
    with pytest.raises(ConfigError, match=f"UniPCMultistepScheduler.{field}"):
        UniPCConfig(**{field: value})


def test_bad_steps_are_refused():
    with pytest.raises(ConfigError, match="repeated"):
        UniPCConfig().plan(DIFF, 1000)  # linspace over 1001 points of [0, 999] repeats timesteps
    with pytest.raises(ConfigError, match="outside"):
        UniPCConfig(timestep_spacing="leading", steps_offset=600).plan(DIFF, 10)
    with pytest.raises(ConfigError, match="steps must be between"):
        UniPCConfig().plan(DIFF, 0)
