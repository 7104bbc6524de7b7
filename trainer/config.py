"""Training configuration (one frozen dataclass; CLI options map 1:1 to fields; saved in model.json)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ddpm_deploy.runtime.errors import ConfigError

DEFAULT_LR = 2e-4
DEFAULT_GRAD_CLIP = 1.0
DEFAULT_EMA_DECAY = 0.9999


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
        positive = ("steps", "batch_size", "log_every", "save_every", "keep", "num_samples", "sample_steps")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, found {getattr(self, name)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay must be in [0, 1), found {self.ema_decay}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, found {self.lr}")
        if self.warmup_steps < 0 or self.sample_every < 0 or self.grad_clip < 0:
            raise ConfigError("warmup_steps, sample_every and grad_clip must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


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
