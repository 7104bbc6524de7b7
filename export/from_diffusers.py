"""diffusers ``UNet2DModel`` directories → our ONNX contract (ε-prediction DDPM models only).

Two layouts on disk, both handled (no hub download: the user points at files):

- **flat** (google/ddpm-cifar10-32): ``DIR/config.json`` (UNet2DModel), ``DIR/diffusion_pytorch_model.safetensors``
  and ``DIR/scheduler_config.json`` side by side (also accepted one level up, ``DIR/../scheduler_config.json``);
- **pipeline** (``DDPMPipeline.save_pretrained``): ``ROOT/unet/{config.json, diffusion_pytorch_model.safetensors}``
  and ``ROOT/scheduler/scheduler_config.json``; either ROOT or ROOT/unet may be given.

The scheduler config is mapped onto our ``DiffusionConfig``; what the runtime cannot sample (learned variance,
v- or x0-prediction, thresholding, trained or scaled β, zero-terminal-SNR rescaling) is refused with a message
that names the key. The diffusers reference sampler (``DDPMScheduler.step`` with our noise) is in
``ddpm_deploy.verify.diffusers_ref``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ddpm_deploy.runtime.config import DataSpec, ModelCard
from ddpm_deploy.runtime.diffusers_config import (  # noqa: F401  (the scheduler side, torch-free, re-exported)
    BETA_SCHEDULES,
    SCHEDULER_CLASSES,
    SCHEDULER_CONFIG,
    SCHEDULER_DEFAULTS,
    SCHEDULER_TYPES,
    VARIANCE_TYPES,
    _read_json,
    check_types,
    scheduler_to_diffusion,
)
from ddpm_deploy.runtime.errors import ArtifactError, ConfigError, lazy_import
from ddpm_deploy.runtime.schedule import DiffusionConfig

log = logging.getLogger(__name__)

UNET_CONFIG = "config.json"
UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"
SOURCE = "diffusers"
ARCH_TYPE = "diffusers.UNet2DModel"
INSTALL = "pip install 'ddpm-deploy[diffusers]'"

UNET_TYPES = {"sample_size": "size", "in_channels": "posint", "out_channels": "posint", "layers_per_block": "posint",
              "block_out_channels": "posint_list", "down_block_types": "strs", "up_block_types": "strs",
              "norm_num_groups": "int?", "norm_eps": "num", "attention_head_dim": "int?", "act_fn": "str",
              "time_embedding_type": "str", "flip_sin_to_cos": "bool", "freq_shift": "int",
              "center_input_sample": "bool", "dropout": "num", "add_attention": "bool", "mid_block_scale_factor": "num",
              "downsample_padding": "int", "resnet_time_scale_shift": "str", "class_embed_type": "str?",
              "num_class_embeds": "int?", "_class_name": "str"}


@dataclass(frozen=True)
class DiffusersLayout:
    """Where the UNet and its scheduler config were found."""

    unet_dir: Path
    scheduler_config: Path
    layout: str  # "flat" or "pipeline"


def find_layout(path: str | Path) -> DiffusersLayout:
    """Locate the UNet directory and scheduler_config.json of a flat or pipeline diffusers directory."""
    p = Path(path)
    if not p.is_dir():
        raise ArtifactError(f"{p}: expected a diffusers model directory, found no such directory")
    if (p / UNET_CONFIG).is_file():
        unet_dir = p
        candidates = [p / SCHEDULER_CONFIG, p.parent / SCHEDULER_CONFIG, p.parent / "scheduler" / SCHEDULER_CONFIG]
        layout = "flat" if candidates[0].is_file() else "pipeline"
    elif (p / "unet" / UNET_CONFIG).is_file():
        unet_dir = p / "unet"
        candidates = [p / "scheduler" / SCHEDULER_CONFIG, p / SCHEDULER_CONFIG]
        layout = "pipeline"
    else:
        raise ArtifactError(
            f"{p}: expected a diffusers UNet2DModel directory ({UNET_CONFIG} + {UNET_WEIGHTS}, as in "
            f"google/ddpm-cifar10-32) or a pipeline directory with unet/{UNET_CONFIG}; found neither. Point "
            f"--from-diffusers at the folder that holds {UNET_CONFIG}"
        )
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise ArtifactError(
            f"{unet_dir}: expected {SCHEDULER_CONFIG} beside the UNet or one level up, looked at "
            f"{[str(c) for c in candidates]}; without it the diffusion schedule (T, β range, variance type, "
            f"clipping) is unknown. Copy the model's {SCHEDULER_CONFIG} next to {UNET_CONFIG}"
        )
    return DiffusersLayout(unet_dir, found, layout)


def unet_card(unet_cfg: dict[str, Any], diffusion: DiffusionConfig, scheduler_cfg: dict[str, Any],
              where: str = UNET_CONFIG) -> ModelCard:
    """The ModelCard of a diffusers UNet2DModel (source 'diffusers')."""
    check_types(unet_cfg, UNET_TYPES, where)
    cls = unet_cfg.get("_class_name", "UNet2DModel")
    if cls != "UNet2DModel":
        raise ConfigError(f"{where}: expected _class_name 'UNet2DModel', found {cls!r} (only unconditional "
                          f"pixel-space UNets can be exported)")
    cin, cout = unet_cfg.get("in_channels", 3), unet_cfg.get("out_channels", 3)
    if cin != cout:
        raise ConfigError(f"{where}: in_channels {cin} != out_channels {cout}; a model that predicts ε and a "
                          f"variance (out = 2·in) is not supported, the runtime needs ε only")
    if unet_cfg.get("class_embed_type") is not None or unet_cfg.get("num_class_embeds") is not None:
        raise ConfigError(f"{where}: class-conditional UNets (class_embed_type / num_class_embeds) are not "
                          f"supported; the ONNX contract has inputs x and t only")
    size = unet_cfg.get("sample_size")
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise ConfigError(f"{where}: expected a square sample_size, found {size}")
        size = size[0]
    if not isinstance(size, int) or size <= 0:
        raise ConfigError(f"{where}: expected an integer sample_size, found {size!r}")
    arch = {"type": ARCH_TYPE, "unet_config": {k: v for k, v in unet_cfg.items() if not k.startswith("_")},
            "scheduler_config": scheduler_cfg}
    return ModelCard(diffusion=diffusion, data=DataSpec(int(cin), int(size)), architecture=arch, source=SOURCE)


class DiffusersEps(torch.nn.Module):
    """(x, t) → ε: a UNet2DModel with the ``.sample`` of its output unwrapped."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t).sample


def load_diffusers(path: str | Path) -> tuple[DiffusersEps, ModelCard, DiffusersLayout]:
    """Load the UNet (safetensors, from disk only) and build its ModelCard. Returns (ε-model in eval mode, card, layout)."""
    diffusers = lazy_import("diffusers", "Loading diffusers models", INSTALL)
    lay = find_layout(path)
    unet_cfg = _read_json(lay.unet_dir / UNET_CONFIG, "UNet config")
    sched_cfg = _read_json(lay.scheduler_config, "scheduler config")
    card = unet_card(unet_cfg, scheduler_to_diffusion(sched_cfg, str(lay.scheduler_config)), sched_cfg,
                     str(lay.unet_dir / UNET_CONFIG))
    weights = lay.unet_dir / UNET_WEIGHTS
    if not weights.is_file():
        others = sorted(p.name for p in lay.unet_dir.glob("diffusion_pytorch_model*"))
        raise ArtifactError(
            f"{lay.unet_dir}: expected {UNET_WEIGHTS}, found {others or 'no weights file'}; pickled .bin weights "
            f"are not loaded: convert them once with UNet2DModel.from_pretrained(DIR).save_pretrained(DIR) "
            f"(writes safetensors)"
        )
    try:
        unet, info = diffusers.UNet2DModel.from_pretrained(
            str(lay.unet_dir), use_safetensors=True, local_files_only=True, output_loading_info=True,
            low_cpu_mem_usage=False)
    except Exception as e:  # diffusers raises OSError/ValueError/EnvironmentError/safetensors errors
        raise ArtifactError(f"{lay.unet_dir}: diffusers could not load the UNet ({str(e).splitlines()[0][:300]})") from None
    bad = {k: info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(k)}
    if bad:
        raise ArtifactError(f"{weights}: weights do not match {UNET_CONFIG} ({ {k: v[:3] for k, v in bad.items()} })")
    return DiffusersEps(unet.float().eval()).eval(), card, lay


def export_diffusers(src: str | Path, out_dir: str | Path, echo=lambda s: None) -> tuple[Path, dict]:
    """Export a diffusers UNet2DModel directory to out_dir/model.onnx and verify it against diffusers in PyTorch."""
    from .onnx_export import export_verified

    model, card, lay = load_diffusers(src)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    echo(f"exporting the diffusers UNet in {lay.unet_dir} ({lay.layout} layout, scheduler {lay.scheduler_config})")
    onnx_path, report = export_verified(model, card, out_dir, "diffusers (PyTorch)", {
        "source": SOURCE, "unet_dir": str(lay.unet_dir), "scheduler_config": str(lay.scheduler_config),
        "layout": lay.layout, "diffusion": card.diffusion.to_dict()}, echo)
    return onnx_path, report
