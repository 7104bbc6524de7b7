"""Run directories and checkpoints.

Layout (shared/DESIGN.md): ``model.json`` (ModelCard), ``weights.safetensors`` (``ema.*`` and ``raw.*``),
``state.safetensors`` (optimizer tensors + step; param groups as JSON metadata — no pickle anywhere), ``loss.jsonl``,
``loss.png``, ``samples/``, and ``checkpoints/step_NNNNNNNN/`` (the last K, each written as a temporary
directory then renamed, so a checkpoint is either whole or absent).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ddpm_deploy.runtime.config import ModelCard
from ddpm_deploy.runtime.errors import ArtifactError
from ddpm_deploy.runtime.fileio import atomic_write_bytes, atomic_write_text

from .unet import UNet, UNetConfig

WEIGHTS = "weights.safetensors"
STATE = "state.safetensors"
MODEL_JSON = "model.json"
CKPT_DIR = "checkpoints"


def _weights_bytes(raw: torch.nn.Module, ema: torch.nn.Module, step: int) -> bytes:
    tensors = {f"raw.{k}": v.detach().cpu().contiguous() for k, v in raw.state_dict().items()}
    tensors.update({f"ema.{k}": v.detach().cpu().contiguous() for k, v in ema.state_dict().items()})
    return st_save(tensors, metadata={"step": str(step), "format": "ddpm-deploy"})


def _state_bytes(optimizer: torch.optim.Optimizer, step: int) -> bytes:
    """Optimizer state as safetensors: tensors under ``state.<param>.<name>``, the rest as JSON metadata."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for name, v in st.items():
            if torch.is_tensor(v):
                tensors[f"state.{pid}.{name}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{name}"] = v
    meta = {"step": str(step), "param_groups": json.dumps(sd["param_groups"]), "scalars": json.dumps(scalars),
            "format": "ddpm-deploy-optimizer"}
    return st_save(tensors, metadata=meta)


def save_checkpoint(run_dir: Path, raw, ema, optimizer, step: int, keep: int) -> Path:
    """Write checkpoints/step_N atomically, refresh the top-level weights/state, prune to the last ``keep``."""
    run_dir = Path(run_dir)
    ckpts = run_dir / CKPT_DIR
    ckpts.mkdir(parents=True, exist_ok=True)
    wbytes, sbytes = _weights_bytes(raw, ema, step), _state_bytes(optimizer, step)
    final = ckpts / f"step_{step:08d}"
    tmp = Path(tempfile.mkdtemp(dir=ckpts, prefix=".tmp_step_"))
    try:
        (tmp / WEIGHTS).write_bytes(wbytes)
        (tmp / STATE).write_bytes(sbytes)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_bytes(run_dir / WEIGHTS, wbytes)
    atomic_write_bytes(run_dir / STATE, sbytes)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    d = Path(run_dir) / CKPT_DIR
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if p.is_dir() and p.name.startswith("step_"))


def load_weights(path: Path, which: str = "ema") -> tuple[dict[str, torch.Tensor], int]:
    """Load one set ('ema' or 'raw') of weights from a safetensors file; clear errors for bad files."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: weights file not found (expected {WEIGHTS} written by ddpm-train)")
    data = path.read_bytes()
    try:
        tensors = st_load(data)
    except (SafetensorError, ValueError, RuntimeError, OSError) as e:
        raise ArtifactError(
            f"{path}: not a readable safetensors file ({e}); it may be truncated or corrupt — "
            f"use an earlier checkpoint from {CKPT_DIR}/"
        ) from None
    prefix = f"{which}."
    sel = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    if not sel:
        raise ArtifactError(f"{path}: has no '{which}' weights (found prefixes {sorted({k.split('.')[0] for k in tensors})})")
    step = 0
    try:  # the metadata sits in the header of the bytes already read: 8-byte length, then JSON
        n = int.from_bytes(data[:8], "little")
        step = int(json.loads(data[8:8 + n]).get("__metadata__", {}).get("step", 0))
    except (ValueError, TypeError, AttributeError):  # metadata is informative only
        pass
    return sel, step


def load_state(path: Path) -> dict[str, Any]:
    """Read state.safetensors back into ``{"optimizer": state_dict, "step": int}``."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: optimizer state not found; cannot resume from this run")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if meta.get("format") != "ddpm-deploy-optimizer":
            raise ValueError(f"format {meta.get('format')!r} is not ddpm-deploy-optimizer")
        state: dict[int, dict[str, Any]] = {}
        for k, v in tensors.items():
            _, pid, name = k.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
        for k, v in json.loads(meta["scalars"]).items():
            pid, name = k.split(".", 1)
            state.setdefault(int(pid), {})[name] = v
        opt = {"state": state, "param_groups": json.loads(meta["param_groups"])}
        return {"optimizer": opt, "step": int(meta["step"])}
    except (SafetensorError, ValueError, KeyError, OSError, json.JSONDecodeError) as e:
        raise ArtifactError(
            f"{path}: optimizer state is truncated or corrupt ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            f"resume from an earlier checkpoint in {CKPT_DIR}/"
        ) from None


def load_model(run_dir: str | os.PathLike, which: str = "ema", weights: str | os.PathLike | None = None):
    """Build the UNet of a run dir and load its weights. Returns (model in eval mode, ModelCard, step)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ArtifactError(f"{run_dir}: run directory not found (train one with ddpm-train, or pass --out of a run)")
    card = ModelCard.load(run_dir / MODEL_JSON)
    arch = dict(card.architecture)
    if arch.get("type", "ddpm-unet") != "ddpm-unet":
        raise ArtifactError(f"{run_dir}: architecture type {arch.get('type')!r} is not a ddpm-deploy UNet")
    model = UNet(UNetConfig.from_dict(arch))
    sd, step = load_weights(Path(weights) if weights else run_dir / WEIGHTS, which)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ArtifactError(
            f"{run_dir}: weights do not match model.json's architecture "
            f"(missing {len(missing)}: {missing[:3]}, unexpected {len(unexpected)}: {unexpected[:3]})"
        )
    return model.eval(), card, step


def write_model_json(run_dir: Path, card: ModelCard) -> None:
    atomic_write_text(Path(run_dir) / MODEL_JSON, card.to_json() + "\n")
