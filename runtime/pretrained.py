"""What ``Sampler.from_pretrained(PATH)`` opens: one entry for every artifact a user may hold.

| PATH | opened as |
|---|---|
| a ``.plan`` / ``.engine`` file | ``Sampler.from_engine`` (TensorRT, the GPU device loop) |
| a ``.onnx`` / ``.xml`` file | ``Sampler.from_onnx`` (ours, or an ONNX with diffusers' I/O names and a scheduler_config.json beside it) |
| a ddpm-train run dir (``model.json``) | ``Sampler.from_run`` (``RUN/export/model.onnx``) |
| an export dir (``model.onnx``) | its ``model.onnx`` |
| a diffusers folder (``DDPMPipeline.save_pretrained``, or a flat ``UNet2DModel`` folder as google/ddpm-cifar10-32) | exported to ONNX once, into a cache, by ``ddpm-export --from-diffusers`` in a child process (the only step that needs torch and diffusers); later calls open the cached ONNX with the base install |

The cache key is the SHA-256 of the UNet's config, weights and the scheduler config, so an edited folder is
exported again and an unchanged one never is. The cache entry is written by the output policy (a temporary folder
renamed into place whole), so an interrupted conversion leaves nothing that a later call would trust.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

from .diffusers_config import SCHEDULER_CONFIG, UNET_CONFIG
from .errors import ArtifactError, MissingDependencyError

UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"
RUN_CARD, EXPORT_ONNX = "model.json", "model.onnx"
CACHE_ENV = "DDPM_DIFFUSERS_CACHE"


def cache_root() -> Path:
    """$DDPM_DIFFUSERS_CACHE, else ~/.cache/ddpm-deploy/diffusers-onnx ($XDG_CACHE_HOME respected)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ddpm-deploy" / "diffusers-onnx"


def diffusers_files(folder: Path) -> list[Path] | None:
    """The UNet config, weights and scheduler config of a diffusers folder (pipeline or flat layout), or None if
    ``folder`` is not one."""
    for unet, scheds in ((folder / "unet", (folder / "scheduler" / SCHEDULER_CONFIG, folder / SCHEDULER_CONFIG)),
                         (folder, (folder / SCHEDULER_CONFIG, folder.parent / SCHEDULER_CONFIG,
                                   folder.parent / "scheduler" / SCHEDULER_CONFIG))):
        if (unet / UNET_CONFIG).is_file() and (unet / UNET_WEIGHTS).is_file():
            sched = next((s for s in scheds if s.is_file()), None)
            return [unet / UNET_CONFIG, unet / UNET_WEIGHTS] + ([sched] if sched else [])
    return None


def _digest(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:32]


def diffusers_onnx(folder: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """The ONNX of a diffusers folder: from the cache, or exported there first (``ddpm-export --from-diffusers`` in
    a child process; needs 'ddpm-deploy[diffusers]' that once)."""
    from .outputs import Outputs

    folder = Path(folder)
    files = diffusers_files(folder)
    if files is None:
        raise ArtifactError(f"{folder}: not a diffusers folder (expected unet/{UNET_CONFIG} + unet/{UNET_WEIGHTS}, or "
                            f"{UNET_CONFIG} + {UNET_WEIGHTS})")
    if len(files) < 3:
        raise ArtifactError(f"{folder}: expected the model's {SCHEDULER_CONFIG} (scheduler/ or beside the UNet); "
                            f"without it the DDPM schedule is unknown")
    entry = Path(cache_dir) if cache_dir is not None else cache_root()
    entry = entry / _digest(files)
    onnx = entry / EXPORT_ONNX
    if onnx.is_file():
        return onnx
    with Outputs("Sampler.from_pretrained (diffusers → ONNX cache)", [entry], overwrite=True, folders=[entry],
                 hint=f"remove {entry}") as w:
        tmp = w.stage(entry)
        cmd = [sys.executable, "-m", "ddpm_deploy.export.cli", "--from-diffusers", str(folder), "--out", str(tmp)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            err = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
            line = err[-1][len("error:"):].strip() if err else (r.stderr.strip().splitlines() or ["(no output)"])[-1]
            missing = re.search(r"needs the Python package '([^']+)'.*?(pip install .*)$", line)
            if missing:
                raise MissingDependencyError(missing.group(1), f"Converting the diffusers folder {folder} to ONNX "
                                             f"(once, into {entry.parent}; later calls need neither torch nor "
                                             f"diffusers)", missing.group(2))
            raise ArtifactError(f"{folder}: exporting the diffusers UNet to ONNX failed: {line}")
    return onnx


def resolve(path: str | os.PathLike) -> tuple[str, Path]:
    """(kind, path) of what ``from_pretrained`` opens: kind 'plan', 'onnx', 'run' or 'diffusers'."""
    p = Path(path)
    suffix = p.suffix.lower()
    if p.is_file() or suffix in (".plan", ".engine", ".onnx", ".xml"):
        if suffix in (".plan", ".engine"):
            return "plan", p
        if suffix in (".onnx", ".xml"):
            return "onnx", p
        raise ArtifactError(f"{p}: expected a model file (.onnx, .xml, .plan, .engine) or a folder")
    if not p.is_dir():
        raise ArtifactError(f"{p}: no such file or folder (expected a ddpm-train run, an export folder, an ONNX, a "
                            f"plan or a diffusers pipeline folder)")
    if (p / RUN_CARD).is_file():
        return "run", p
    if (p / EXPORT_ONNX).is_file():
        return "onnx", p / EXPORT_ONNX
    if diffusers_files(p) is not None:
        return "diffusers", p
    raise ArtifactError(f"{p}: found no model: expected {RUN_CARD} (a ddpm-train run), {EXPORT_ONNX} (an export "
                        f"folder), or a diffusers folder (model_index.json with unet/ and scheduler/, or "
                        f"{UNET_CONFIG} + {UNET_WEIGHTS})")
