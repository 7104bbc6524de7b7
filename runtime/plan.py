"""The TensorRT plan sidecar (``model.plan.json``): reading it, checking it against the plan, and where a plan runs.

A plan is only usable together with its sidecar (``contract.PlanSidecar``, written by
``ddpm_deploy.export.engine.build_engine``): the DDPM config, the TensorRT flavour and version that built the
plan, the batch profile and the SHA-256 of the plan bytes. The runtime refuses a plan whose sidecar is missing,
unreadable, of another schema, or whose recorded hash does not match the plan file.

Where plans run (``runs_on``, ``check_plan_compat``):

- ``tensorrt``: on GPUs of the compute capability it was built on (TensorRT engines are specific to the
  architecture unless built hardware-compatible, which we do not do).
- ``rtx`` (TensorRT for RTX): the library runs on compute capability 7.5, 8.6, 8.9, 12.0 and 12.1 only (its
  support matrix) — not on A100 (8.0), H100/H200 (9.0) or B200 (10.0). Plans built with the default targets run on 8.6,
  8.9 and 12.0; Turing (7.5) needs a plan built for it.

This module imports neither TensorRT nor torch: ``ddpm-run info`` uses it on any machine.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from .config import ModelCard
from .contract import PlanSidecar
from .errors import ArtifactError
from .fileio import sha256_file

SIDECAR_SUFFIX = ".json"  # model.plan -> model.plan.json
RTX_SUPPORTED_CC = ((7, 5), (8, 6), (8, 9), (12, 0), (12, 1))  # 12.1 (GB10) since TensorRT-RTX 1.5
RTX_DEFAULT_TARGET_CC = ((8, 6), (8, 9), (12, 0))
_REBUILD = PlanSidecar.REWRITE


def sidecar_path(plan_path: str | os.PathLike) -> Path:
    """The sidecar path of a plan: the plan path with ``.json`` appended."""
    return Path(str(plan_path) + SIDECAR_SUFFIX)


def read_plan_sidecar(plan_path: str | os.PathLike, verify_hash: bool = True) -> PlanSidecar:
    """The sidecar of ``plan_path`` after checking that it describes exactly this plan file."""
    plan = Path(plan_path)
    side = sidecar_path(plan)
    if not plan.is_file():
        raise ArtifactError(f"expected a TensorRT plan at {plan}, found no such file; {_REBUILD}")
    if not side.is_file():
        raise ArtifactError(
            f"expected the plan's sidecar {side} next to {plan.name}, found none: without it the plan's model, "
            f"TensorRT version and batch profile are unknown; {_REBUILD}"
        )
    sidecar = PlanSidecar.load(side)
    ModelCard.from_dict(sidecar.ddpm, where=f"{side} [ddpm]")
    recorded = sidecar.plan
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


def _cc_text(ccs) -> str:
    return ", ".join(f"{a}.{b}" for a, b in ccs)


def runs_on(sidecar: PlanSidecar) -> list[str]:
    """The compute capabilities ("8.6", …) this plan can run on; empty when unknown (a tensorrt plan built
    without a GPU in sight)."""
    if sidecar.trt.get("flavour") == "rtx":
        targets = sidecar.build.get("compute_capabilities")
        return [str(c) for c in targets] if targets else [f"{a}.{b}" for a, b in RTX_DEFAULT_TARGET_CC]
    cc = (sidecar.gpu or {}).get("compute_capability")
    return [str(cc)] if cc else []


def check_plan_compat(
    sidecar: PlanSidecar,
    trt_module_name: str,
    trt_version: str,
    gpu_cc: str | Sequence[int] | None = None,
) -> list[str]:
    """Reasons why this plan cannot run with the given TensorRT module/version on a GPU of compute capability
    ``gpu_cc`` ("8.6" or (8, 6); None = unknown, not checked). An empty list means no known obstacle."""
    reasons: list[str] = []
    trt = sidecar.trt
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
    version_compatible = bool(sidecar.build.get("version_compatible"))
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
    if cc is None:
        return reasons
    if flavour == "tensorrt":
        built_gpu = sidecar.gpu or {}
        built_cc = _cc_tuple(built_gpu.get("compute_capability"))
        if built_cc is not None and built_cc != cc:
            reasons.append(
                f"the plan was built on {built_gpu.get('name')} (compute capability {built_cc[0]}.{built_cc[1]}) "
                f"but this GPU has compute capability {cc[0]}.{cc[1]}; TensorRT engines are specific to the GPU "
                f"architecture: rebuild the plan on this GPU"
            )
    elif cc not in RTX_SUPPORTED_CC:
        reasons.append(
            f"TensorRT for RTX runs on compute capability {_cc_text(RTX_SUPPORTED_CC)} only, this GPU has "
            f"{cc[0]}.{cc[1]} (A100 is 8.0, H100/H200 9.0, B200 10.0: data-centre GPUs need the 'tensorrt' "
            f"flavour, or use ONNX Runtime CUDA: ddpm-run sample --onnx model.onnx --device cuda)"
        )
    else:
        targets = [_cc_tuple(c) for c in runs_on(sidecar)]
        if cc not in targets:
            reasons.append(
                f"this TensorRT-RTX plan was built for compute capability {_cc_text(targets)}, this GPU has "
                f"{cc[0]}.{cc[1]}; rebuild the plan for it"
            )
    return reasons
