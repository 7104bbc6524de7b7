"""Run directories and checkpoints.

Layout (shared/DESIGN.md): ``model.json`` (ModelCard), ``weights.safetensors`` (``ema.*`` and ``raw.*``),
``state.safetensors`` (optimizer tensors + step; param groups as JSON metadata — no pickle anywhere), ``loss.jsonl``,
``loss.png``, ``samples/``, and ``checkpoints/step_NNNNNNNN/`` (the last K, each written as a temporary
directory then renamed, so a checkpoint is either whole or absent).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ddpm_deploy.runtime.config import ModelCard
from ddpm_deploy.runtime.errors import ArtifactError, ConfigError
from ddpm_deploy.runtime.fileio import atomic_write_bytes, atomic_write_text

from .config import UNetConfig
from .unet import UNet

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


class CheckpointWriteError(OSError):
    """A fault of the machine while writing a run; the message names the file and says what was kept."""


def save_checkpoint(run_dir: Path, raw, ema, optimizer, step: int, keep: int) -> Path:
    """Write checkpoints/step_N atomically, refresh the top-level weights/state, prune to the last ``keep``.

    A fault of the machine (full disk, I/O error) is re-raised as an OSError that names the file and says what
    was kept: the previous checkpoints are untouched, so the run can be resumed from the last of them."""
    run_dir = Path(run_dir)
    ckpts = run_dir / CKPT_DIR
    wbytes, sbytes = _weights_bytes(raw, ema, step), _state_bytes(optimizer, step)
    final = ckpts / f"step_{step:08d}"
    target, whole = ckpts, False
    try:
        ckpts.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=ckpts, prefix=".tmp_step_"))
        try:
            for name, data in ((WEIGHTS, wbytes), (STATE, sbytes)):
                target = final / name
                (tmp / name).write_bytes(data)
            target = final
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        whole = True  # checkpoints/step_N is complete; only the top-level copies remain
        for name, data in ((WEIGHTS, wbytes), (STATE, sbytes)):
            target = run_dir / name
            atomic_write_bytes(target, data)
    except OSError as e:
        raise CheckpointWriteError(e.errno, f"{e.strerror or e} while writing checkpoint step_{step:08d}; "
                                   f"{kept_message(run_dir, -1 if whole else step)}",
                      str(e.filename or target)) from None
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def kept_message(run_dir: Path, failed_step: int) -> str:
    """What a failed checkpoint write left: the checkpoints before it, and how to resume."""
    whole = [p for p in list_checkpoints(run_dir) if _step_of(p) != failed_step]
    if not whole:
        return f"no checkpoint of {run_dir} was written yet, so the run cannot be resumed"
    return (f"checkpoint {whole[-1].name} kept; the run can be resumed with ddpm-train --resume --out {run_dir}")


def _step_of(path: Path) -> int:
    m = re.fullmatch(r"step_(\d+)", Path(path).name)
    return int(m.group(1)) if m else -1


def clean_temp_files(run_dir: Path) -> list[Path]:
    """Remove what a killed write left in the run dir and checkpoints/ (``.*.tmp`` files of atomic writes,
    ``.tmp_step_*`` directories of checkpoint writes); returns what was removed."""
    removed = []
    for d in (Path(run_dir), Path(run_dir) / CKPT_DIR):
        if not d.is_dir():
            continue
        for p in sorted(d.iterdir()):
            if p.name.startswith(".") and (p.name.endswith(".tmp") or p.name.startswith(".tmp_step_")):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def list_checkpoints(run_dir: Path) -> list[Path]:
    d = Path(run_dir) / CKPT_DIR
    if not d.is_dir():
        return []
    return sorted((p for p in d.iterdir() if p.is_dir() and _step_of(p) >= 0), key=_step_of)


def find_checkpoint(run_dir: Path, spec: str | os.PathLike | None, flag: str = "--resume-from") -> Path:
    """The checkpoint to resume from: the last one, or ``spec`` (``checkpoints/step_N``, ``step_N`` or ``N``);
    errors name ``flag``."""
    found = list_checkpoints(run_dir)
    if spec is None:
        if not found:
            raise ArtifactError(f"--resume: {run_dir} has no {CKPT_DIR}/step_* to resume from")
        return found[-1]
    s = str(spec)
    p = Path(s)
    cand = p if p.is_absolute() else Path(run_dir) / p
    if not cand.is_dir():
        m = re.fullmatch(r"(?:.*/)?(?:step_)?(\d+)/?", s)
        cand = Path(run_dir) / CKPT_DIR / f"step_{int(m.group(1)):08d}" if m else cand
    if not cand.is_dir() or _step_of(cand) < 0:
        have = ", ".join(f"{CKPT_DIR}/{c.name}" for c in found) or "none"
        raise ArtifactError(f"{flag} {spec}: no such checkpoint in {run_dir} (checkpoints: {have})")
    if cand.resolve().parent != (Path(run_dir) / CKPT_DIR).resolve():
        raise ConfigError(f"{flag} {spec}: not a checkpoint of {run_dir} (expected {run_dir}/{CKPT_DIR}/step_N)"
                          + (": a run resumes only from its own checkpoints; to continue another run, resume that run"
                             if flag == "--resume-from" else ""))
    return cand


ABANDONED_DIR = "abandoned"


def set_aside_newer(run_dir: Path, step: int) -> list[Path]:
    """After resuming from an older checkpoint: move the checkpoints newer than ``step`` (the branch being abandoned)
    to ``abandoned/from-step_N-<time>/`` so that neither a later --resume nor pruning mixes them with the new work.
    Nothing is deleted. Returns the new paths."""
    import time

    newer = [c for c in list_checkpoints(run_dir) if _step_of(c) > step]
    if not newer:
        return []
    dest = Path(run_dir) / ABANDONED_DIR / f"from-step_{step:08d}-{time.strftime('%Y%m%d-%H%M%S')}"
    dest.mkdir(parents=True, exist_ok=True)
    moved = []
    for c in newer:
        target = dest / c.name
        os.replace(c, target)
        moved.append(target)
    return moved


def load_weights(path: Path, which: str = "ema") -> tuple[dict[str, torch.Tensor], int]:
    """Load one set ('ema' or 'raw') of weights from a safetensors file; clear errors for bad files."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: weights file not found (expected {WEIGHTS} written by ddpm-train)")
    data = path.read_bytes()
    try:
        tensors = st_load(data)
        if not tensors:
            raise ValueError("it holds no tensors")
    except (SafetensorError, ValueError, RuntimeError, OSError) as e:
        why = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise ArtifactError(
            f"{path}: not a readable safetensors file ({why}); "
            f"it may be truncated or corrupt — use an earlier checkpoint from {CKPT_DIR}/ "
            f"(ddpm-train --resume-from {CKPT_DIR}/step_N)"
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


def load_card(run_dir: Path) -> tuple[ModelCard, UNetConfig]:
    """model.json of a run, checked before it is trusted: the schema, every architecture field's type and value,
    and that the data section agrees with the architecture. Messages name the file and the field."""
    path = Path(run_dir) / MODEL_JSON
    card = ModelCard.load(path)
    arch = dict(card.architecture)
    if arch.get("type", "ddpm-unet") != "ddpm-unet":
        raise ArtifactError(f"{path}: architecture type {arch.get('type')!r} is not a ddpm-deploy UNet (expected "
                            f"'ddpm-unet'; a diffusers model is exported with ddpm-export --from-diffusers DIR)")
    try:
        ucfg = UNetConfig.from_dict(arch, where=str(path))
    except ConfigError as e:
        raise ArtifactError(str(e)) from None
    for field, mine in (("channels", "in_channels"), ("image_size", "image_size")):
        if getattr(card.data, field) != getattr(ucfg, mine):
            raise ArtifactError(f"{path}: data.{field} {getattr(card.data, field)} does not match architecture."
                                f"{mine} {getattr(ucfg, mine)}; the file was edited or is corrupt")
    return card, ucfg


def _infer(sd: dict[str, torch.Tensor], image_size: int) -> dict[str, Any]:
    """What a UNet state dict says about its config (the fields its tensors determine)."""
    got: dict[str, Any] = {}
    w = sd.get("conv_in.weight")
    if w is not None and w.ndim == 4:
        got["ch"], got["in_channels"] = int(w.shape[0]), int(w.shape[1])
    blocks: dict[int, set[str]] = {}
    for k in sd:
        m = re.match(r"down\.(\d+)\.(\w+)\.", k)
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(m.group(2))
    if blocks and "ch" in got:
        levels, cur = [[]], None
        for i in sorted(blocks):
            if "down" in blocks[i]:
                levels.append([])
            else:
                levels[-1].append(i)
        got["num_res_blocks"] = len(levels[0])
        mult = []
        for lv in levels:
            cur = sd.get(f"down.{lv[-1]}.res.conv1.weight") if lv else None
            mult.append(int(cur.shape[0]) // got["ch"] if cur is not None else None)
        got["ch_mult"] = mult
        got["attn_resolutions"] = [image_size // 2 ** li for li, lv in enumerate(levels)
                                   if any("attn" in blocks[i] for i in lv)]
    return got


def check_weights(model: torch.nn.Module, sd: dict[str, torch.Tensor], weights: Path, card_path: Path,
                  ucfg: UNetConfig) -> None:
    """ArtifactError naming the first tensor that does not fit model.json's architecture, and the field behind it."""
    want = model.state_dict()
    first = None
    for k, v in want.items():
        if k not in sd:
            first = f"tensor {k!r} is missing"
            break
        if tuple(sd[k].shape) != tuple(v.shape):
            first = f"tensor {k!r} has shape {list(sd[k].shape)}, the architecture needs {list(v.shape)}"
            break
    if first is None:
        extra = [k for k in sd if k not in want]
        if not extra:
            return
        first = f"tensor {extra[0]!r} is not part of the architecture ({len(extra)} extra)"
    inferred = _infer(sd, ucfg.image_size)
    behind = ""
    for f in ("in_channels", "ch", "num_res_blocks", "ch_mult", "attn_resolutions"):
        if f in inferred:
            mine = list(getattr(ucfg, f)) if isinstance(getattr(ucfg, f), tuple) else getattr(ucfg, f)
            if inferred[f] != mine:
                behind = f"; the weights have {f} = {inferred[f]}, {card_path.name} says architecture.{f} = {mine}"
                break
    if not behind:
        behind = f"; check {card_path.name}'s architecture section against the run that wrote the weights"
    raise ArtifactError(f"{weights}: weights do not match {card_path}: {first}{behind}")


def load_model(run_dir: str | os.PathLike, which: str = "ema", weights: str | os.PathLike | None = None):
    """Build the UNet of a run dir and load its weights. Returns (model in eval mode, ModelCard, step)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ArtifactError(f"{run_dir}: run directory not found (train one with ddpm-train, or pass --out of a run)")
    card, ucfg = load_card(run_dir)
    model = UNet(ucfg)
    wpath = Path(weights) if weights else run_dir / WEIGHTS
    sd, step = load_weights(wpath, which)
    check_weights(model, sd, wpath, run_dir / MODEL_JSON, ucfg)
    model.load_state_dict(sd)
    return model.eval(), card, step


def write_model_json(run_dir: Path, card: ModelCard) -> None:
    atomic_write_text(Path(run_dir) / MODEL_JSON, card.to_json() + "\n")
