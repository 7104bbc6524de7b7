"""Conformance of every scheduler in ``SCHEDULERS`` (as test_contract.py is for RUNNERS): plans are well formed,
options are diffusers' names and are refused by name when unknown, configs read diffusers' scheduler_config.json
as is, and ``describe()`` round-trips through run.json."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from ddpm_deploy.runtime.contract import RunInfo
from ddpm_deploy.runtime.errors import ConfigError
from ddpm_deploy.runtime.sampling.config import (ALIASES, SCHEDULERS, from_diffusers, make_scheduler, plan_for,
                                                 scheduler_config)
from ddpm_deploy.runtime.sampling.plan import COL, COLUMNS, MAX_HISTORY, StepPlan
from ddpm_deploy.runtime.schedule import DiffusionConfig

CFG = DiffusionConfig()
NAMES = sorted(SCHEDULERS)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("steps", [1, 2, 10, 50])
def test_every_plan_is_well_formed(name, steps):
    if name == "DDPMScheduler" and steps < 2:
        with pytest.raises(ConfigError, match="steps must be between 2 and 1000"):
            plan_for(CFG, name, steps)
        return
    plan = plan_for(CFG, name, steps)

    assert isinstance(plan, StepPlan) and len(plan) == steps and plan.scheduler == name
    assert plan.table.shape == (steps, len(COLUMNS)) and plan.table32.dtype == np.float32
    assert np.all(np.diff(plan.timesteps) < 0) and 0 <= plan.timesteps.min() and plan.timesteps.max() < 1000
    assert 0 <= plan.history <= MAX_HISTORY
    assert np.all(plan.table[:, COL["a"]] >= 1.0) and np.all(plan.table[:, COL["b"]] >= 0.0)  # √(1/ᾱ), √(1/ᾱ − 1)
    ids = plan.noise_ids[plan.table[:, COL["z"]] != 0]
    assert len(np.unique(ids)) == len(ids)  # a fresh z at every noisy step


@pytest.mark.parametrize("name", NAMES)
def test_options_are_diffusers_names_and_unknown_ones_are_refused(name):
    import inspect

    diffusers = pytest.importorskip("diffusers")
    cls = SCHEDULERS[name]
    theirs = set(inspect.signature(getattr(diffusers, name).__init__).parameters) | {"eta"}
    assert set(cls.option_names()) <= theirs  # every option is one of diffusers' (DDIM's eta: a step() argument)

    with pytest.raises(ConfigError, match=rf"{name} does not take bogus_option"):
        make_scheduler(name, bogus_option=1)


@pytest.mark.parametrize("name", NAMES)
def test_diffusers_defaults_where_ours_follow_them(name):
    import inspect

    diffusers = pytest.importorskip("diffusers")
    params = inspect.signature(getattr(diffusers, name).__init__).parameters
    ours = SCHEDULERS[name]()
    for f in dataclasses.fields(ours):
        if f.name in params and not (name == "DDPMScheduler" and f.name in ("variance_type", "clip_sample",
                                                                           "timestep_spacing")):
            want = params[f.name].default
            got = getattr(ours, f.name)
            assert (list(got) if isinstance(got, tuple) else got) == want, (name, f.name, got, want)


@pytest.mark.parametrize("name", NAMES)
def test_a_saved_diffusers_config_is_read_as_is(name, tmp_path):
    """diffusers writes every field of its config; we read the file as it is, and refuse what we do not
    implement by name (here: thresholding switched on)."""
    diffusers = pytest.importorskip("diffusers")
    sched = getattr(diffusers, name)()
    sched.save_config(tmp_path)
    cfg = json.loads((tmp_path / "scheduler_config.json").read_text())

    ours = scheduler_config(str(tmp_path / "scheduler_config.json"), CFG)
    assert type(ours) is SCHEDULERS[name]
    with pytest.raises(ConfigError, match=r"thresholding = true is not implemented"):
        from_diffusers({**cfg, "thresholding": True}, CFG)
    with pytest.raises(ConfigError, match=r"field 'made_up' of .* is not implemented"):
        from_diffusers({**cfg, "made_up": 1}, CFG)
    with pytest.raises(ConfigError, match=r"num_train_timesteps = 500 does not match the model"):
        from_diffusers({**cfg, "num_train_timesteps": 500}, CFG)


def test_no_silent_remapping_of_options():
    """diffusers rewrites algorithm_type "deis" → "dpmsolver++" and solver_type "bh2" → "midpoint" for DPM-Solver;
    we refuse both by name."""
    with pytest.raises(ConfigError, match="algorithm_type must be one of"):
        make_scheduler("dpmsolver++", algorithm_type="deis")
    with pytest.raises(ConfigError, match="solver_type must be one of"):
        make_scheduler("dpmsolver++", solver_type="bh2")
    with pytest.raises(ConfigError, match="_class_name 'EulerDiscreteScheduler' is not a scheduler"):
        from_diffusers({"_class_name": "EulerDiscreteScheduler"}, CFG)


@pytest.mark.parametrize("alias", sorted(ALIASES))
def test_describe_round_trips_through_run_json(alias, tmp_path):
    plan = plan_for(CFG, alias, 10)
    info = RunInfo(seed=0, num=1, batch=1, start_index=0, steps=len(plan), num_timesteps=1000, backend="b", runner="r",
                   loop="host", precision="fp32", model="m", diffusion=CFG.to_dict(), total_seconds=0.0,
                   images_per_second=0.0, timings={}, scheduler=plan.describe())
    back = RunInfo.load(info.save(tmp_path / "run.json"))

    assert back.scheduler == json.loads(json.dumps(plan.describe()))
    again = plan_for(CFG, back.scheduler["scheduler"], back.scheduler["steps"], **back.scheduler["options"])
    assert again.key == plan.key  # the record is enough to rebuild the plan


def test_the_card_gives_ddpm_its_variance_and_clipping():
    card_large = DiffusionConfig(variance_type="fixed_large", clip_denoised=False)
    plan = plan_for(card_large, "ddpm", 10)
    assert plan.options["variance_type"] == "fixed_large" and plan.options["clip_sample"] is False
    assert not np.isfinite(plan.table[:, COL["clip"]]).any()
    assert plan_for(card_large, "ddpm", 10, clip_sample=True).options["clip_sample"] is True


@pytest.mark.parametrize("name, bad, message", [
    ("ddim", {"eta": 1.5}, r"eta must be in \[0.0, 1.0\]"),
    ("ddim", {"eta": "0.5"}, "eta must be a finite number"),
    ("dpmsolver++", {"solver_order": 4}, "solver_order must be one of"),
    ("dpmsolver++", {"use_karras_sigmas": True, "use_lu_lambdas": True}, "exclude each other"),
    ("unipc", {"solver_type": "bh3"}, "solver_type must be one of"),
    ("ddpm", {"variance_type": "learned"}, "variance_type must be one of"),
])
def test_bad_option_values_name_the_field(name, bad, message):
    with pytest.raises(ConfigError, match=message):
        plan_for(CFG, name, 10, **bad)
