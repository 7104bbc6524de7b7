"""The DDPM artifact config: what every artifact (run dir, ONNX, plan sidecar) carries about the model.

Saved as ``model.json`` in a run dir, as JSON under ``metadata_props[ddpm_deploy.config]`` in ONNX files,
and under ``"ddpm"`` in ``model.plan.json``. Schema-versioned; unknown versions are refused.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .contract import ONNX_METADATA_KEY  # noqa: F401  (the key the ModelCard is stored under in ONNX)
from .errors import ArtifactError, ConfigError
from .schedule import DiffusionConfig

SCHEMA = "ddpm-deploy/model"
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class DataSpec:
    channels: int
    image_size: int
    value_range: tuple[float, float] = (-1.0, 1.0)

    def to_dict(self) -> dict[str, Any]:
        return {"channels": self.channels, "image_size": self.image_size, "value_range": list(self.value_range)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DataSpec":
        return cls(int(d["channels"]), int(d["image_size"]), tuple(float(v) for v in d.get("value_range", (-1, 1))))


@dataclass(frozen=True)
class ModelCard:
    """Diffusion + data spec (what the runtime needs) and opaque architecture/training sections."""

    diffusion: DiffusionConfig
    data: DataSpec
    architecture: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    source: str = "ddpm-deploy"

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "source": self.source,
            "diffusion": self.diffusion.to_dict(),
            "data": self.data.to_dict(),
            "architecture": dict(self.architecture),
            "training": dict(self.training),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "config") -> "ModelCard":
        if d.get("schema") != SCHEMA:
            raise ArtifactError(f"{where}: expected schema {SCHEMA!r}, found {d.get('schema')!r}")
        if d.get("schema_version") != SCHEMA_VERSION:
            raise ArtifactError(
                f"{where}: schema_version {d.get('schema_version')!r} is not supported (this ddpm-deploy reads "
                f"version {SCHEMA_VERSION}); re-export the model with this version"
            )
        try:
            return cls(
                diffusion=DiffusionConfig.from_dict(d["diffusion"]),
                data=DataSpec.from_dict(d["data"]),
                architecture=d.get("architecture", {}),
                training=d.get("training", {}),
                source=d.get("source", "ddpm-deploy"),
            )
        except (KeyError, TypeError, ValueError, ConfigError) as e:
            raise ArtifactError(f"{where}: malformed DDPM config ({e})") from e

    @classmethod
    def from_json(cls, text: str, where: str = "config") -> "ModelCard":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ArtifactError(f"{where}: not valid JSON ({e})") from e
        return cls.from_dict(d, where)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ModelCard":
        p = Path(path)
        if not p.is_file():
            raise ArtifactError(f"{p}: model config not found (expected a model.json written by ddpm-train)")
        return cls.from_json(p.read_text(), str(p))
