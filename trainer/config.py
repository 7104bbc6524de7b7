"""Training and UNet configuration (frozen dataclasses; CLI options map 1:1 to fields; saved in model.json).

Torch-free, so that ``ddpm-train --help`` and the option checks run on the base install. Every field is
type-checked: a config read from model.json names the file and the field (``model.json: architecture.ch must be a
positive integer, found "64"``), a ``--set`` override names the option.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ddpm_deploy.runtime.checks import KINDS, check_field  # noqa: F401  (check_field: also the CLI's)
from ddpm_deploy.runtime.checks import found as _found
from ddpm_deploy.runtime.errors import ConfigError

DEFAULT_LR = 2e-4
DEFAULT_GRAD_CLIP = 1.0
DEFAULT_EMA_DECAY = 0.9999


def check_section(d: Any, fields: dict[str, str], where: str, section: str, required: bool) -> dict[str, Any]:
    """Type-check a config section read from a file; messages name ``where: section.field``."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: {section} must be a JSON object, found {_found(d)}")
    if required:
        missing = [k for k in fields if k not in d]
        if missing:
            raise ConfigError(f"{where}: {section}.{missing[0]} is missing (expected {KINDS[fields[missing[0]]][1]}); "
                              f"the file was not written by this ddpm-deploy or was edited")
    for k, kind in fields.items():
        if k in d:
            try:
                check_field(k, d[k], kind)
            except ConfigError as e:
                raise ConfigError(f"{where}: {section}.{e}") from None
    return d


def from_section(cls, d: dict[str, Any], fields: dict[str, str], section: str, where: str | None,
                 unknown: tuple[str, set[str]] | None = None):
    """``cls`` from a file's ``section``: with ``where`` (the file) every field must be present and of its type, and
    messages name ``where: section.F``. Keys that are not fields are ignored, or with ``unknown`` = (what the keys
    are called, keys also allowed) refused."""
    if where is not None:
        d = check_section(d, fields, where, section, required=True)
    known = {f.name for f in dataclasses.fields(cls)}
    if unknown is not None and set(d) - known - unknown[1]:
        raise ConfigError(f"{where + ': ' if where else ''}unknown {unknown[0]} keys {sorted(set(d) - known - unknown[1])} "
                          f"in {section}; known: {sorted(known)}")
    try:
        return cls(**{k: v for k, v in d.items() if k in known})
    except ConfigError as e:
        if where is None:
            raise
        raise ConfigError(f"{where}: {section}.{e}") from None


UNET_FIELDS = {"image_size": "posint", "in_channels": "posint", "ch": "posint", "ch_mult": "posint_list",
               "num_res_blocks": "posint", "attn_resolutions": "posint_list0", "dropout": "unit_float",
               "norm_groups": "posint", "norm_eps": "pos_float"}
TRAIN_FIELDS = {"steps": "posint", "batch_size": "posint", "lr": "pos_float", "warmup_steps": "nonneg_int",
                "grad_clip": "nonneg_float", "ema_decay": "unit_float", "flip": "bool", "bf16": "bool", "seed": "int",
                "log_every": "posint", "sample_every": "nonneg_int", "sample_steps": "posint", "num_samples": "posint",
                "save_every": "posint", "keep": "posint"}


@dataclass(frozen=True)
class UNetConfig:
    image_size: int = 32
    in_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    norm_groups: int = 32
    norm_eps: float = 1e-6

    def __post_init__(self):
        for name, kind in UNET_FIELDS.items():
            object.__setattr__(self, name, check_field(name, getattr(self, name), kind))
        if self.image_size % (2 ** (len(self.ch_mult) - 1)):
            raise ConfigError(
                f"image_size {self.image_size} must be divisible by 2^(len(ch_mult)-1) = {2 ** (len(self.ch_mult) - 1)}"
            )
        for m in self.ch_mult:
            if (self.ch * m) % self.norm_groups:
                raise ConfigError(f"norm_groups {self.norm_groups} must divide the channels {self.ch * m} (ch × mult)")
        levels = self.resolutions
        for r in self.attn_resolutions:
            if r not in levels:
                raise ConfigError(f"attn_resolutions {list(self.attn_resolutions)}: {r} matches no level of the UNet "
                                  f"(image_size {self.image_size}, {len(self.ch_mult)} levels: resolutions "
                                  f"{', '.join(map(str, levels))})")

    @property
    def resolutions(self) -> list[int]:
        return [self.image_size // 2 ** i for i in range(len(self.ch_mult))]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["ch_mult"] = list(self.ch_mult)
        d["attn_resolutions"] = list(self.attn_resolutions)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str | None = None) -> "UNetConfig":
        """From model.json's ``architecture`` section (``from_section``); a key that is not a field is refused."""
        return from_section(cls, d, UNET_FIELDS, "architecture", where, unknown=("UNet config", {"type"}))


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 3000
    batch_size: int = 64  # global batch (split over DDP ranks)
    lr: float = DEFAULT_LR
    warmup_steps: int = 100
    grad_clip: float = DEFAULT_GRAD_CLIP
    ema_decay: float = DEFAULT_EMA_DECAY
    flip: bool = False
    bf16: bool = False
    seed: int = 0
    log_every: int = 10
    sample_every: int = 1000  # 0 disables intermediate sample grids
    sample_steps: int = 100  # respaced steps for the trainer's preview grids
    num_samples: int = 64
    save_every: int = 500
    keep: int = 3  # checkpoints kept in checkpoints/

    def __post_init__(self):
        for name, kind in TRAIN_FIELDS.items():  # ema_decay: a number in [0, 1)
            object.__setattr__(self, name, check_field(name, getattr(self, name), kind))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str | None = None) -> "TrainConfig":
        """From model.json's ``training`` section (``from_section``; other keys — dataset, preset, counts — are
        ignored)."""
        return from_section(cls, d, TRAIN_FIELDS, "training", where)


def parse_override(cfg_objs: dict[str, Any], item: str) -> tuple[str, str, Any]:
    """Parse 'field=value' against the dataclasses in cfg_objs; return (which, field, typed value)."""
    if "=" not in item:
        raise ConfigError(f"--set expects FIELD=VALUE, found {item!r}")
    key, raw = item.split("=", 1)
    key = key.strip().replace("-", "_")
    for which, obj in cfg_objs.items():
        fields = {f.name: f for f in dataclasses.fields(obj)}
        if key in fields:
            cur = getattr(obj, key)
            try:
                if isinstance(cur, bool):
                    if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
                        raise ValueError(raw)
                    val: Any = raw.lower() in ("1", "true", "yes")
                elif isinstance(cur, int):
                    val = int(raw)
                elif isinstance(cur, float):
                    val = float(raw)
                elif isinstance(cur, tuple):
                    val = tuple(int(v) for v in raw.replace(" ", "").strip("()[]").split(",") if v)
                else:
                    val = raw
            except ValueError:
                raise ConfigError(f"--set {key}: cannot parse {raw!r} as {type(cur).__name__}") from None
            return which, key, val
    known = sorted({f.name for obj in cfg_objs.values() for f in dataclasses.fields(obj)})
    raise ConfigError(f"--set: unknown field {key!r}; known fields: {', '.join(known)}")
