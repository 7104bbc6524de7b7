"""The TensorRT plan sidecar (``model.plan.json``): reading it, checking it against the plan, and compatibility.

A plan is only usable together with its sidecar, written by ``ddpm_deploy.export.engine.build_engine``: the
sidecar carries the DDPM config, the TensorRT flavour and version that built the plan, the batch profile and
the SHA-256 of the plan bytes. The runtime refuses a plan whose sidecar is missing, unreadable, of another
schema, or whose recorded hash does not match the plan file.

This module imports neither TensorRT nor torch: ``ddpm-run info`` uses it on any machine.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

from .config import ModelCard
from .errors import ArtifactError

PLAN_SCHEMA = "ddpm-deploy/plan"
PLAN_SCHEMA_VERSION = 1
SIDECAR_SUFFIX = ".json"  # model.plan -> model.plan.json
FLAVOURS = ("tensorrt", "rtx")
# TensorRT-RTX plans built with the default targets run on compute capability 8.0 and later; Turing (7.5)
# needs an engine built for it explicitly (TensorRT-RTX docs, "CPU-Only AOT and TensorRT-RTX Engines").
RTX_MIN_DEFAULT_CC = (8, 0)

_REBUILD = "rebuild the plan and its sidecar together with `ddpm-export --engine`"
_REQUIRED_KEYS = ("ddpm", "trt", "precision", "profile", "inputs", "outputs", "onnx", "plan", "build")


def sidecar_path(plan_path: str | os.PathLike) -> Path:
    """The sidecar path of a plan: the plan path with ``.json`` appended."""
    return Path(str(plan_path) + SIDECAR_SUFFIX)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_plan_sidecar(plan_path: str | os.PathLike, verify_hash: bool = True) -> dict[str, Any]:
    """Return the sidecar of ``plan_path`` after checking that it describes exactly this plan file."""
    plan = Path(plan_path)
    side = sidecar_path(plan)
    if not plan.is_file():
        raise ArtifactError(f"expected a TensorRT plan at {plan}, found no such file; {_REBUILD}")
    if not side.is_file():
        raise ArtifactError(
            f"expected the plan's sidecar {side} next to {plan.name}, found none: without it the plan's model, "
            f"TensorRT version and batch profile are unknown; {_REBUILD}"
        )
    try:
        sidecar = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{side}: expected a JSON plan sidecar, found an unreadable file ({e}); {_REBUILD}") from e
    if not isinstance(sidecar, dict) or sidecar.get("schema") != PLAN_SCHEMA:
        found = sidecar.get("schema") if isinstance(sidecar, dict) else type(sidecar).__name__
        raise ArtifactError(f"{side}: expected schema {PLAN_SCHEMA!r}, found {found!r}; {_REBUILD}")
    if sidecar.get("schema_version") != PLAN_SCHEMA_VERSION:
        raise ArtifactError(
            f"{side}: expected schema_version {PLAN_SCHEMA_VERSION}, found {sidecar.get('schema_version')!r}; "
            f"{_REBUILD} using this ddpm-deploy"
        )
    missing = [k for k in _REQUIRED_KEYS if k not in sidecar]
    if missing:
        raise ArtifactError(f"{side}: expected keys {list(_REQUIRED_KEYS)}, missing {missing}; {_REBUILD}")
    ModelCard.from_dict(sidecar["ddpm"], where=f"{side} [ddpm]")
    recorded = sidecar["plan"]
    if not isinstance(recorded, dict) or "sha256" not in recorded or "bytes" not in recorded:
        raise ArtifactError(f"{side}: expected plan.sha256 and plan.bytes, found {recorded!r}; {_REBUILD}")
    if verify_hash:
        size = plan.stat().st_size
        digest = sha256_file(plan) if size == recorded["bytes"] else None
        if digest != recorded["sha256"]:
            found = f"sha256 {digest}" if digest else f"{size} bytes"
            raise ArtifactError(
                f"{plan}: the sidecar records sha256 {recorded['sha256']} ({recorded['bytes']} bytes), the plan file "
                f"has {found}: the plan was replaced or modified after it was built; {_REBUILD}"
            )
    return sidecar


def flavour_of_module(module_name: str) -> str:
    """'tensorrt' for the ``tensorrt`` module, 'rtx' for ``tensorrt_rtx`` / ``tensorrt_rtx_bindings``."""
    root = module_name.split(".")[0]
    if root.startswith("tensorrt_rtx"):
        return "rtx"
    if root == "tensorrt":
        return "tensorrt"
    raise ValueError(f"not a TensorRT module: {module_name!r}")


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for p in str(version).split("."):
        digits = "".join(ch for ch in p if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def _cc_tuple(cc: str | Sequence[int] | None) -> tuple[int, int] | None:
    if cc is None:
        return None
    if isinstance(cc, str):
        major, _, minor = cc.partition(".")
        return int(major), int(minor or 0)
    major, minor = cc
    return int(major), int(minor)


def check_plan_compat(
    sidecar: dict[str, Any],
    trt_module_name: str,
    trt_version: str,
    gpu_cc: str | Sequence[int] | None = None,
) -> list[str]:
    """Reasons why this plan cannot run with the given TensorRT module/version on a GPU of compute capability
    ``gpu_cc`` ("8.6" or (8, 6); None = unknown, not checked). An empty list means no known obstacle."""
    reasons: list[str] = []
    trt = sidecar.get("trt", {})
    built_flavour, built_version = trt.get("flavour"), str(trt.get("version"))
    try:
        flavour = flavour_of_module(trt_module_name)
    except ValueError:
        flavour = trt_module_name
    if built_flavour != flavour:
        reasons.append(
            f"the plan was built by {built_flavour!r} ({trt.get('module')} {built_version}) but the runtime has "
            f"{flavour!r} ({trt_module_name} {trt_version}); plans of one flavour do not load in the other: rebuild "
            f"it with the {flavour!r} flavour"
        )
        return reasons  # versions and GPUs of different products are not comparable
    version_compatible = bool(sidecar.get("build", {}).get("version_compatible"))
    if not version_compatible and built_version != str(trt_version):
        reasons.append(
            f"the plan was built with {trt.get('module')} {built_version} but the runtime has {trt_version}, and "
            f"it was not built version-compatible; rebuild it with {trt_version} (or build it version-compatible)"
        )
    elif version_compatible and _version_tuple(trt_version) < _version_tuple(built_version):
        reasons.append(
            f"the version-compatible plan was built with {built_version}, which is newer than the runtime's "
            f"{trt_version}; version compatibility only runs on the same or a newer TensorRT: upgrade or rebuild"
        )
    cc = _cc_tuple(gpu_cc)
    if cc is not None:
        if flavour == "tensorrt":
            built_gpu = sidecar.get("gpu") or {}
            built_cc = _cc_tuple(built_gpu.get("compute_capability"))
            if built_cc is not None and built_cc != cc:
                reasons.append(
                    f"the plan was built on {built_gpu.get('name')} (compute capability {built_cc[0]}.{built_cc[1]}) "
                    f"but this GPU has compute capability {cc[0]}.{cc[1]}; TensorRT engines are specific to the GPU "
                    f"architecture: rebuild the plan on this GPU"
                )
        elif cc < RTX_MIN_DEFAULT_CC:
            reasons.append(
                f"TensorRT-RTX plans built for the default targets need compute capability "
                f"{RTX_MIN_DEFAULT_CC[0]}.{RTX_MIN_DEFAULT_CC[1]} or newer, this GPU has {cc[0]}.{cc[1]}"
            )
    return reasons
