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
from .checks import found as _found
from .checks import is_int, is_number
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
    def from_dict(cls, d: dict[str, Any], where: str = "config") -> "DataSpec":
        if not isinstance(d, dict):
            raise ArtifactError(f"{where}: data must be a JSON object, found {_found(d)}")
        for k in ("channels", "image_size"):
            if k not in d:
                raise ArtifactError(f"{where}: data.{k} is missing (expected a positive integer)")
            v = d[k]
            if not (is_int(v) and v >= 1):
                raise ArtifactError(f"{where}: data.{k} must be a positive integer, found {_found(v)}")
        vr = d.get("value_range", (-1, 1))
        if not (isinstance(vr, (list, tuple)) and len(vr) == 2
                and all(is_number(v, finite=False) for v in vr) and vr[0] < vr[1]):
            raise ArtifactError(f"{where}: data.value_range must be [low, high] numbers, found {_found(vr)}")
        return cls(d["channels"], d["image_size"], (float(vr[0]), float(vr[1])))


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
        if not isinstance(d, dict):
            raise ArtifactError(f"{where}: expected a JSON object with schema {SCHEMA!r}, found {type(d).__name__}")
        if d.get("schema") != SCHEMA:
            raise ArtifactError(f"{where}: expected schema {SCHEMA!r}, found {d.get('schema')!r}")
        if d.get("schema_version") != SCHEMA_VERSION:
            raise ArtifactError(
                f"{where}: schema_version {d.get('schema_version')!r} is not supported (this ddpm-deploy reads "
                f"version {SCHEMA_VERSION}); re-export the model with this version"
            )
        for section, required in (("diffusion", True), ("data", True), ("architecture", False), ("training", False)):
            if section not in d and required:
                raise ArtifactError(f"{where}: the {section} section is missing")
            if section in d and not isinstance(d[section], dict):
                raise ArtifactError(f"{where}: {section} must be a JSON object, found {_found(d[section])}")
        try:
            return cls(
                diffusion=DiffusionConfig.from_dict(d["diffusion"], where),
                data=DataSpec.from_dict(d["data"], where),
                architecture=d.get("architecture", {}),
                training=d.get("training", {}),
                source=d.get("source", "ddpm-deploy"),
            )
        except ConfigError as e:
            raise ArtifactError(str(e) if str(e).startswith(f"{where}: ") else f"{where}: {e}") from None
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"{where}: malformed DDPM config ({type(e).__name__}: {e})") from None

    @classmethod
    def from_json(cls, text: str, where: str = "config") -> "ModelCard":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ArtifactError(f"{where}: not valid JSON ({e}); the file is truncated or corrupt") from None
        return cls.from_dict(d, where)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ModelCard":
        p = Path(path)
        if not p.is_file():
            raise ArtifactError(f"{p}: model config not found (expected a model.json written by ddpm-train)")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ArtifactError(f"{p}: not a JSON text file ({e.reason} at byte {e.start}); the file is corrupt") from None
        return cls.from_json(text, str(p))
