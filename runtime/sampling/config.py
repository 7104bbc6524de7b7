"""Scheduler configs by name: ``SCHEDULERS`` (one line per scheduler), diffusers' ``scheduler_config.json`` read
as it is, and ``plan_for`` — the one way every caller turns (model card, scheduler, steps) into a StepPlan.

A diffusers config is read field by field: the forward-process fields must agree with the model card, the
scheduler's own fields map 1:1 onto ours, and every other field is accepted only at the value that makes it inert
(``thresholding: false``, ``prediction_type: "epsilon"``, …). Anything else is refused by name, never ignored and
never remapped (diffusers warns and drops unknown keys, and rewrites ``algorithm_type``/``solver_type``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Mapping

from ..checks import found
from ..errors import ArtifactError, ConfigError
from ..schedule import DiffusionConfig
from .plan import StepPlan
from .schedulers.base import SchedulerConfig
from .schedulers.ddim import DDIMConfig
from .schedulers.ddpm import DDPMConfig
from .schedulers.dpmsolver import DPMSolverConfig
from .schedulers.unipc import UniPCConfig

# diffusers' _class_name -> config class. Adding a scheduler: one module in schedulers/ and one line here.
SCHEDULERS: dict[str, type[SchedulerConfig]] = {
    c.NAME: c for c in (DDPMConfig, DDIMConfig, DPMSolverConfig, UniPCConfig)
}
# CLI names: the class's ALIAS, and presets that set options.
ALIASES: dict[str, tuple[type[SchedulerConfig], dict[str, Any]]] = {
    **{c.ALIAS: (c, {}) for c in SCHEDULERS.values()},
    "sde-dpmsolver++": (DPMSolverConfig, {"algorithm_type": "sde-dpmsolver++"}),
}
DEFAULT_SCHEDULER = "ddpm"

BETA_SCHEDULES = {"linear": "linear", "squaredcos_cap_v2": "cosine"}  # diffusers' name -> ours
# diffusers fields that change nothing at these values (a feature turned off); any other value is refused.
INERT: dict[str, tuple[Any, ...]] = {
    "prediction_type": ("epsilon",), "thresholding": (False,), "trained_betas": (None,),
    "rescale_betas_zero_snr": (False,), "use_exponential_sigmas": (False,), "use_beta_sigmas": (False,),
    "use_flow_sigmas": (False,), "use_dynamic_shifting": (False,), "variance_type": (None,), "predict_x0": (True,),
    "solver_p": (None,), "sigma_min": (None,), "sigma_max": (None,), "shift_terminal": (None,),
}
# fields that only matter when an inert field is switched on: any value is inert
DEPENDENT = ("dynamic_thresholding_ratio", "sample_max_value", "flow_shift", "time_shift_type")
FORWARD = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")
FORWARD_DEFAULTS = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear"}
# DDPMScheduler's own defaults where ours differ (ours: the card's variance and clipping, linspace respacing)
DIFFUSERS_DDPM_DEFAULTS = {"variance_type": "fixed_small", "clip_sample": True, "timestep_spacing": "leading"}
# DDPMScheduler's variance names: fixed_small_log is the same σ as fixed_small (exp(½·log β̃))
DDPM_VARIANCES = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small", "fixed_large": "fixed_large"}


def scheduler_names() -> list[str]:
    return sorted(ALIASES)


def scheduler_class(name: str) -> tuple[type[SchedulerConfig], dict[str, Any]]:
    """The config class and preset options of a CLI name ("ddim") or a diffusers class name ("DDIMScheduler")."""
    if name in ALIASES:
        return ALIASES[name]
    if name in SCHEDULERS:
        return SCHEDULERS[name], {}
    raise ConfigError(f"unknown scheduler {name!r}; schedulers: {', '.join(scheduler_names())} (or diffusers' class "
                      f"names {', '.join(sorted(SCHEDULERS))})")


def make_scheduler(name: str = DEFAULT_SCHEDULER, **options) -> SchedulerConfig:
    """A scheduler config from its name and options; an option it does not take is refused by name."""
    cls, preset = scheduler_class(name)
    opts = {**preset, **{k: v for k, v in options.items()}}
    unknown = sorted(set(opts) - set(cls.option_names()))
    if unknown:
        raise ConfigError(f"{cls.NAME} does not take {', '.join(unknown)}; its options: "
                          f"{', '.join(cls.option_names())}")
    return cls(**opts)


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """A scheduler_config.json (or a diffusers pipeline folder holding scheduler/scheduler_config.json)."""
    p = Path(path)
    if p.is_dir():
        for cand in (p / "scheduler" / "scheduler_config.json", p / "scheduler_config.json"):
            if cand.is_file():
                p = cand
                break
        else:
            raise ArtifactError(f"{path}: no scheduler_config.json in this folder or its scheduler/ folder")
    if not p.is_file():
        raise ArtifactError(f"{p}: scheduler config not found (a diffusers scheduler_config.json)")
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{p}: not valid JSON ({e}); the file is truncated or corrupt") from None
    if not isinstance(d, dict):
        raise ArtifactError(f"{p}: expected a JSON object, found {found(d)}")
    return d


def from_diffusers(cfg: Mapping[str, Any], diffusion: DiffusionConfig, where: str = "scheduler_config.json",
                   **overrides) -> SchedulerConfig:
    """Our config for a diffusers scheduler config dict (``_class_name`` and fields), checked against the model's
    forward process; ``overrides`` (CLI options) replace fields."""
    name = cfg.get("_class_name")
    if not isinstance(name, str) or name not in SCHEDULERS:
        raise ConfigError(f"{where}: _class_name {name!r} is not a scheduler ddpm-deploy implements; implemented: "
                          f"{', '.join(sorted(SCHEDULERS))}")
    cls = SCHEDULERS[name]
    ours = set(cls.option_names())
    opts: dict[str, Any] = {}
    # a field the file leaves out has diffusers' default (ours differ only for DDPM, and the forward process
    # defaults must still match the model)
    cfg = {**FORWARD_DEFAULTS, **(DIFFUSERS_DDPM_DEFAULTS if cls is DDPMConfig else {}), **cfg}
    for key, value in cfg.items():
        if key.startswith("_"):
            continue
        if key in FORWARD:
            _check_forward(key, value, diffusion, where)
        elif key in ours:
            if cls is DDPMConfig and key == "variance_type":
                if not isinstance(value, str) or value not in DDPM_VARIANCES:
                    raise ConfigError(f"{where}: variance_type {value!r} is not supported (learned variances need "
                                      f"the model's second output); expected one of {sorted(DDPM_VARIANCES)}")
                value = DDPM_VARIANCES[value]
            opts[key] = value
        elif key in INERT:
            if isinstance(value, (list, dict)) or value not in INERT[key] or (value is not None and type(value) is not type(INERT[key][0])):
                raise ConfigError(f"{where}: {key} = {json.dumps(value)} is not implemented by ddpm-deploy's {name}; "
                                  f"only {json.dumps(INERT[key][0])} (the feature off) is accepted")
        elif key not in DEPENDENT:
            raise ConfigError(f"{where}: field {key!r} of {name} is not implemented by ddpm-deploy (it would change "
                              f"the sampler); remove it or use diffusers")
    if opts.get("final_sigmas_type") == "sigma_min" and cls is DDPMConfig:
        raise ConfigError(f"{where}: final_sigmas_type is not a DDPMScheduler option")
    opts.update(overrides)
    try:
        return make_scheduler(name, **opts)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def _check_forward(key: str, value: Any, diffusion: DiffusionConfig, where: str) -> None:
    if key == "num_train_timesteps":
        want, ok = diffusion.num_timesteps, value == diffusion.num_timesteps
    elif key == "beta_schedule":
        want = {v: k for k, v in BETA_SCHEDULES.items()}[diffusion.schedule]
        ok = value == want
    else:
        want = getattr(diffusion, key)
        ok = diffusion.schedule != "linear" or (isinstance(value, (int, float)) and abs(value - want) <= 1e-12 * want)
    if not ok:
        raise ConfigError(f"{where}: {key} = {json.dumps(value)} does not match the model ({want!r}); a scheduler "
                          f"config must describe the model's own forward process")


def scheduler_config(scheduler: str | os.PathLike | Mapping | SchedulerConfig | None, diffusion: DiffusionConfig,
                     allow_files: bool = True, **overrides) -> SchedulerConfig:
    """Any way a user names a scheduler: None (DDPM), a name, a diffusers config file/folder (``allow_files``; a
    server's requests may not name files) or dict, or a config. ``overrides`` (e.g. eta=0.5, solver_order=3) are
    options the scheduler must take (None values are skipped)."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if isinstance(scheduler, SchedulerConfig):
        unknown = sorted(set(overrides) - set(scheduler.option_names()))
        if unknown:
            raise ConfigError(f"{scheduler.NAME} does not take {', '.join(unknown)}; its options: "
                              f"{', '.join(scheduler.option_names())}")
        return dataclasses.replace(scheduler, **overrides) if overrides else scheduler
    if isinstance(scheduler, Mapping):
        return from_diffusers(scheduler, diffusion, **overrides)
    if scheduler is None:
        return make_scheduler(DEFAULT_SCHEDULER, **overrides)
    s = str(scheduler)
    if s in ALIASES or s in SCHEDULERS or not allow_files:
        return make_scheduler(s, **overrides)
    if s.endswith(".json") or os.path.sep in s or Path(s).exists():
        return from_diffusers(read_config_file(s), diffusion, str(s), **overrides)
    return make_scheduler(s, **overrides)  # raises: unknown scheduler


def plan_for(diffusion: DiffusionConfig, scheduler=None, steps: int | None = None, allow_files: bool = True,
             **overrides) -> StepPlan:
    """The StepPlan for a model's forward process, a scheduler (see ``scheduler_config``) and a step count
    (None: T for DDPM, else ``DEFAULT_STEPS``)."""
    cfg = scheduler_config(scheduler, diffusion, allow_files, **overrides)
    if steps is None and not isinstance(cfg, DDPMConfig):
        steps = min(DEFAULT_STEPS, diffusion.num_timesteps)
    return cfg.plan(diffusion, steps)


DEFAULT_STEPS = 20  # fast schedulers without --steps (diffusers pipelines default to 50; the solvers need ~20)
