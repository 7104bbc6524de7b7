"""diffusers on the runtime side, torch-free: a DDPMScheduler ``scheduler_config.json`` read as our
``DiffusionConfig``, and the I/O names of ONNX files exported by other tools from a diffusers ``UNet2DModel``.

**Scheduler configs.** What the runtime cannot sample (learned variance, v- or x0-prediction, thresholding, trained
or scaled β, zero-terminal-SNR rescaling) is refused with a message that names the key (``export/from_diffusers.py``
builds on it for ``ddpm-export --from-diffusers``).

**diffusers-named ONNX** (optimum and diffusers' own ONNX scripts name a UNet's I/O so): inputs ``sample`` float32
[B, C, H, W] and ``timestep`` (int64 or float32; [B], [1] or a scalar), output ``out_sample``. Such a file runs
without re-export: ``DiffusersIo`` maps our contract's ``x``/``t``/``eps`` onto those names and casts t, and the
DDPM schedule comes from the ``scheduler_config.json`` beside it (``card_beside``), since such a file carries no
ddpm-deploy metadata. ``ddpm-run info`` prints what was mapped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .checks import KINDS, check_field, is_number
from .checks import is_int as _is_int
from .config import DataSpec, ModelCard
from .errors import ArtifactError, ConfigError
from .schedule import DiffusionConfig

SCHEDULER_CONFIG = "scheduler_config.json"
UNET_CONFIG = "config.json"
# DDPMScheduler's own defaults, applied to keys a config leaves out (as DDPMScheduler.from_config does).
SCHEDULER_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
    "trained_betas": None, "variance_type": "fixed_small", "clip_sample": True, "prediction_type": "epsilon",
    "thresholding": False, "clip_sample_range": 1.0, "rescale_betas_zero_snr": False,
}
SCHEDULER_CLASSES = ("DDPMScheduler", "GaussianDDPMScheduler")  # the latter: 2022 configs (key "timesteps")
BETA_SCHEDULES = {"linear": "linear", "squaredcos_cap_v2": "cosine"}
# fixed_small_log is the same σ as fixed_small (diffusers computes it as exp(½·log β̃_t)).
VARIANCE_TYPES = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small", "fixed_large": "fixed_large"}


def _is_num(v: Any) -> bool:
    return is_number(v, finite=False)


_T = {  # the shared kinds, and those diffusers configs add (for the keys ddpm-deploy reads or diffusers builds from)
    **KINDS,
    "num": (_is_num, "a number"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "str?": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "int?": (lambda v: v is None or _is_int(v), "an integer or null"),
    "strs": (lambda v: isinstance(v, (list, tuple)) and len(v) > 0 and all(isinstance(x, str) for x in v),
             "a non-empty list of strings"),
    "size": (lambda v: (_is_int(v) and v >= 1) or (isinstance(v, (list, tuple)) and all(_is_int(x) for x in v)),
             "a positive integer or [H, W]"),
    "betas?": (lambda v: v is None or (isinstance(v, (list, tuple)) and all(_is_num(x) for x in v)),
               "null or a list of numbers"),
}
SCHEDULER_TYPES = {"num_train_timesteps": "posint", "timesteps": "posint", "beta_start": "num", "beta_end": "num",
                   "beta_schedule": "str", "trained_betas": "betas?", "variance_type": "str", "clip_sample": "bool",
                   "prediction_type": "str", "thresholding": "bool", "clip_sample_range": "num",
                   "rescale_betas_zero_snr": "bool", "_class_name": "str"}

def check_types(cfg: dict[str, Any], types: dict[str, str], where: str) -> None:
    """ConfigError naming the first key of the wrong type (diffusers would fail later with a traceback, or take
    a string for a number silently)."""
    for k, kind in types.items():
        if k in cfg:
            try:
                check_field(k, cfg[k], kind, _T)
            except ConfigError as e:
                raise ConfigError(f"{where}: {e}") from None



def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path}: expected a JSON {what}, found an unreadable file ({e})") from None
    if not isinstance(d, dict):
        raise ArtifactError(f"{path}: expected a JSON object ({what}), found {type(d).__name__}")
    return d



def scheduler_to_diffusion(cfg: dict[str, Any], where: str = SCHEDULER_CONFIG) -> DiffusionConfig:
    """Map a DDPMScheduler config onto our DiffusionConfig; refuse what the runtime cannot reproduce.

    A config of another scheduler ddpm-deploy implements (DDIM, DPM-Solver++, UniPC: what ``ddpm-export
    --diffusers-scheduler`` writes) gives the forward process; the DDPM sampler's variance type and clipping that
    it does not state take DDPMScheduler's defaults, as ``DDPMScheduler.from_config(that config)`` does in
    diffusers (its own ``variance_type`` must be null: a learned variance is refused)."""
    from .sampling.config import SCHEDULERS

    cls = cfg.get("_class_name", "DDPMScheduler")
    if cls not in SCHEDULER_CLASSES and cls not in SCHEDULERS:
        raise ConfigError(
            f"{where}: expected a DDPMScheduler config (or one of {sorted(set(SCHEDULERS) - {'DDPMScheduler'})}, "
            f"read as DDPMScheduler.from_config reads it), found _class_name {cls!r}"
        )
    if cls not in SCHEDULER_CLASSES:
        if cfg.get("variance_type") is not None:
            raise ConfigError(f"{where}: variance_type = {cfg['variance_type']!r} is not supported (learned variances "
                              f"need the model's second output); expected null")
        cfg = {k: v for k, v in cfg.items() if k != "variance_type"}
    check_types(cfg, SCHEDULER_TYPES, where)
    c = dict(SCHEDULER_DEFAULTS)
    c.update({k: v for k, v in cfg.items() if not k.startswith("_")})
    if "timesteps" in cfg and "num_train_timesteps" not in cfg:
        c["num_train_timesteps"] = cfg["timesteps"]

    def refuse(key: str, found: Any, expected: str, what: str):
        raise ConfigError(f"{where}: {key} = {found!r} is not supported ({what}); expected {expected}")

    if c["prediction_type"] != "epsilon":
        refuse("prediction_type", c["prediction_type"], "'epsilon'",
               "the runtime samples ε-prediction models only; v- and x0-prediction need another step")
    if c["variance_type"] not in VARIANCE_TYPES:
        refuse("variance_type", c["variance_type"], f"one of {sorted(VARIANCE_TYPES)}",
               "learned variances need the model's second output; fixed_large_log is Glide's log-variance")
    if c["trained_betas"] is not None:
        refuse("trained_betas", "[...]", "null", "an explicit β table is not a schedule ddpm-deploy can describe")
    if c["beta_schedule"] not in BETA_SCHEDULES:
        refuse("beta_schedule", c["beta_schedule"], f"one of {sorted(BETA_SCHEDULES)}",
               "only the DDPM linear and the improved-DDPM cosine schedules are implemented")
    if c["thresholding"]:
        refuse("thresholding", True, "false", "dynamic thresholding of x̂0 is not implemented")
    if c["rescale_betas_zero_snr"]:
        refuse("rescale_betas_zero_snr", True, "false", "zero-terminal-SNR rescaling is not implemented")
    if c["clip_sample"] and float(c["clip_sample_range"]) != 1.0:
        refuse("clip_sample_range", c["clip_sample_range"], "1.0", "x̂0 is clipped to [-1, 1]")
    kw: dict[str, Any] = dict(
        schedule=BETA_SCHEDULES[c["beta_schedule"]], num_timesteps=int(c["num_train_timesteps"]),
        variance_type=VARIANCE_TYPES[c["variance_type"]], clip_denoised=bool(c["clip_sample"]),
    )
    if kw["schedule"] == "linear":  # the cosine schedule ignores β_start/β_end (diffusers does too)
        kw.update(beta_start=float(c["beta_start"]), beta_end=float(c["beta_end"]))
    try:
        return DiffusionConfig(**kw)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None



# --- ONNX files with diffusers' I/O names -----------------------------------------------------------------------

DIFFUSERS_X, DIFFUSERS_T, DIFFUSERS_EPS = "sample", "timestep", "out_sample"
T_TYPES = {"tensor(int64)": np.int64, "tensor(float)": np.float32, "tensor(int32)": np.int32}
SOURCE = "diffusers-onnx"


@dataclass(frozen=True)
class DiffusersIo:
    """How our contract's (x, t) → eps is fed to a diffusers-named ONNX: names, t's dtype and whether t is one value
    for the whole batch ([1] or a scalar) or one per image ([B])."""

    t_type: str  # ONNX Runtime's type string of ``timestep``
    t_shape: tuple  # its shape as ONNX Runtime reports it
    scheduler_config: str  # the file the schedule came from

    @property
    def t_dtype(self):
        return T_TYPES[self.t_type]

    @property
    def per_image(self) -> bool:
        """t of shape [B] (else [1] or a scalar: one timestep per call)."""
        return len(self.t_shape) == 1 and self.t_shape[0] != 1

    def feeds(self, x: np.ndarray, t: np.ndarray) -> list[tuple[np.ndarray, dict[str, np.ndarray]]]:
        """The runs that make ε for (x, t): one run when t is per image or the batch shares one t; else one run per
        distinct t (a one-timestep model fed a batch whose images stand at different steps). Returns (rows, feeds)."""
        t = np.asarray(t)
        if self.per_image:
            return [(np.arange(len(t)), {DIFFUSERS_X: x, DIFFUSERS_T: t.astype(self.t_dtype)})]
        shape = () if len(self.t_shape) == 0 else (1,)
        runs = []
        for value in np.unique(t):
            rows = np.flatnonzero(t == value)
            xs = x if len(rows) == len(t) else np.ascontiguousarray(x[rows])
            runs.append((rows, {DIFFUSERS_X: xs, DIFFUSERS_T: np.full(shape, value, dtype=self.t_dtype)}))
        return runs

    def describe(self) -> str:
        dims = "[B]" if self.per_image else ("a scalar" if len(self.t_shape) == 0 else "[1]") + ", one run per timestep"
        return (f"diffusers I/O names mapped: x → {DIFFUSERS_X}, t (int32) → {DIFFUSERS_T} "
                f"({np.dtype(self.t_dtype).name}, {dims}), {DIFFUSERS_EPS} → eps; DDPM schedule from "
                f"{self.scheduler_config}")


def is_diffusers_io(inputs: dict[str, Any], outputs: list[str]) -> bool:
    return set(inputs) == {DIFFUSERS_X, DIFFUSERS_T} and list(outputs) == [DIFFUSERS_EPS]


def scheduler_config_beside(model: str | Path) -> Path:
    """The scheduler_config.json that describes a diffusers-named ONNX: beside it, one level up, or in the
    pipeline layout's ``scheduler/`` folder (ROOT/unet/model.onnx → ROOT/scheduler/)."""
    d = Path(model).parent
    candidates = [d / SCHEDULER_CONFIG, d / "scheduler" / SCHEDULER_CONFIG, d.parent / SCHEDULER_CONFIG,
                  d.parent / "scheduler" / SCHEDULER_CONFIG]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise ArtifactError(
            f"{model}: an ONNX with diffusers' I/O names ({DIFFUSERS_X}, {DIFFUSERS_T} → {DIFFUSERS_EPS}) carries no "
            f"DDPM schedule; expected the model's {SCHEDULER_CONFIG} beside it, looked at "
            f"{[str(c) for c in candidates]}. Copy the DDPMScheduler config there")
    return found


def card_beside(model: str | Path, sample_shape: tuple) -> tuple[ModelCard, DiffusionConfig, Path]:
    """The ModelCard of a diffusers-named ONNX: the schedule from the scheduler_config.json beside it, channels and
    size from the model's input (or from a UNet ``config.json`` beside it where the input leaves them dynamic)."""
    path = scheduler_config_beside(model)
    cfg = _read_json(path, "scheduler config")
    diffusion = scheduler_to_diffusion(cfg, str(path))
    c, h, w = sample_shape
    unet_cfg = Path(model).parent / UNET_CONFIG
    if (c is None or h is None) and unet_cfg.is_file():
        u = _read_json(unet_cfg, "UNet config")
        size = u.get("sample_size")
        size = size[0] if isinstance(size, (list, tuple)) and size else size
        c, h, w = c or u.get("in_channels"), h or size, w or size
    if not (_is_int(c) and _is_int(h) and h == w):
        raise ArtifactError(f"{model}: input {DIFFUSERS_X} has shape [B, {c}, {h}, {w}]; expected static, square "
                            f"[B, C, S, S], or a UNet {UNET_CONFIG} beside it (in_channels, sample_size)")
    card = ModelCard(diffusion=diffusion, data=DataSpec(int(c), int(h)),
                     architecture={"type": SOURCE, "scheduler_config": cfg}, source=SOURCE)
    return card, diffusion, path
