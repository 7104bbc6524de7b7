"""Our UNet → a diffusers ``DDPMPipeline`` folder (the inverse of ``from_diffusers.py``).

The folder is what ``DDPMPipeline.save_pretrained`` writes: ``model_index.json``, ``unet/config.json`` +
``unet/diffusion_pytorch_model.safetensors`` (a ``UNet2DModel``) and ``scheduler/scheduler_config.json``. Our UNet
is a port of the reference TensorFlow model, the layout diffusers' own DDPM conversion
(``scripts/convert_ddpm_original_checkpoint_to_diffusers.py``) reads, so the mapping is one of names plus three
choices of the config that make diffusers compute what we compute:

- sinusoidal embedding: sin first, frequencies exp(−log(10000)·i/(half − 1)) = ``flip_sin_to_cos=False``,
  ``freq_shift=1`` (google/ddpm-cifar10-32's values);
- strided-conv downsampling: ours pads 1 on every side (PyTorch's ``padding=1``), which is diffusers'
  ``downsample_padding=1``; ``0`` would pad right/bottom only (TF "SAME"), a different function;
- attention: one head over all channels (``attention_head_dim=None``: diffusers then uses the block's channels),
  our 1×1-conv q/k/v/proj_out as the Linear ``to_q/to_k/to_v/to_out.0`` (the kernel's 1×1 squeezed).

What has no ``UNet2DModel`` equivalent (another architecture type, a weight the mapping does not place, data outside
[−1, 1] that ``DDPMPipeline`` could not turn into images, a scheduler ``DDPMPipeline`` cannot step) is refused with
the field or key named; nothing is approximated. Needs torch, safetensors and diffusers (export time only).
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

from ddpm_deploy.runtime.config import ModelCard
from ddpm_deploy.runtime.errors import ConfigError, lazy_import
from ddpm_deploy.runtime.outputs import Outputs

from .from_diffusers import BETA_SCHEDULES, INSTALL, SCHEDULER_CONFIG, UNET_CONFIG, UNET_WEIGHTS

log = logging.getLogger(__name__)

MODEL_INDEX = "model_index.json"
UNET_DIR, SCHEDULER_DIR = "unet", "scheduler"
OUR_ARCH = "ddpm-unet"
# our sub-module names → diffusers' (ResnetBlock2D, and Attention with _from_deprecated_attn_block's Linear layout)
RES_NAMES = {"norm1": "norm1", "conv1": "conv1", "temb_proj": "time_emb_proj", "norm2": "norm2", "conv2": "conv2",
             "nin_shortcut": "conv_shortcut"}
ATTN_NAMES = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def targets(out: str | os.PathLike) -> list[Path]:
    """Every file ``--diffusers-out DIR`` writes."""
    out = Path(out)
    return [out / MODEL_INDEX, out / UNET_DIR / UNET_CONFIG, out / UNET_DIR / UNET_WEIGHTS,
            out / SCHEDULER_DIR / SCHEDULER_CONFIG]


def unet2d_config(card: ModelCard, where: str = "model.json") -> dict[str, Any]:
    """The ``UNet2DModel`` config of our UNet (the card's architecture); ConfigError naming the field that has no
    equivalent."""
    from ddpm_deploy.trainer.config import UNetConfig

    arch = dict(card.architecture)
    kind = arch.pop("type", OUR_ARCH)
    if kind != OUR_ARCH:
        raise ConfigError(f"{where}: architecture.type {kind!r} has no UNet2DModel mapping here (expected "
                          f"{OUR_ARCH!r}, a ddpm-train UNet); a diffusers model is already a diffusers folder")
    if tuple(card.data.value_range) != (-1.0, 1.0):
        raise ConfigError(f"{where}: data.value_range {list(card.data.value_range)} has no DDPMPipeline equivalent: "
                          f"the pipeline maps samples from [-1, 1] to images; expected [-1, 1]")
    u = UNetConfig.from_dict(arch, where)
    down, res = [], u.image_size
    for _ in u.ch_mult:
        down.append("AttnDownBlock2D" if res in u.attn_resolutions else "DownBlock2D")
        res //= 2
    return {
        "sample_size": u.image_size, "in_channels": u.in_channels, "out_channels": u.in_channels,
        "center_input_sample": False, "time_embedding_type": "positional", "flip_sin_to_cos": False, "freq_shift": 1,
        "down_block_types": down, "mid_block_type": "UNetMidBlock2D",
        "up_block_types": ["AttnUpBlock2D" if d == "AttnDownBlock2D" else "UpBlock2D" for d in reversed(down)],
        "block_out_channels": [u.ch * m for m in u.ch_mult], "layers_per_block": u.num_res_blocks,
        "mid_block_scale_factor": 1, "downsample_padding": 1, "downsample_type": "conv", "upsample_type": "conv",
        "dropout": u.dropout, "act_fn": "silu", "attention_head_dim": None, "norm_num_groups": u.norm_groups,
        "attn_norm_num_groups": None, "norm_eps": u.norm_eps, "resnet_time_scale_shift": "default",
        "add_attention": True, "class_embed_type": None, "num_class_embeds": None,
    }


def prefix_map(card: ModelCard) -> dict[str, tuple[str, dict[str, str]]]:
    """Our module prefix → (diffusers' prefix, sub-module names), walking the blocks as ``trainer.unet.UNet`` builds
    them (down: res[+attn] × num_res_blocks then a downsample per level but the last; up: reversed levels,
    num_res_blocks + 1 each, then an upsample but at level 0)."""
    from ddpm_deploy.trainer.config import UNetConfig

    u = UNetConfig.from_dict({k: v for k, v in card.architecture.items() if k != "type"})
    plain = {"weight": "weight"}
    m = {"temb.0": ("time_embedding.linear_1", plain), "temb.2": ("time_embedding.linear_2", plain),
         "conv_in": ("conv_in", plain), "norm_out": ("conv_norm_out", plain), "conv_out": ("conv_out", plain),
         "mid_res1": ("mid_block.resnets.0", RES_NAMES), "mid_attn": ("mid_block.attentions.0", ATTN_NAMES),
         "mid_res2": ("mid_block.resnets.1", RES_NAMES)}
    levels, i = len(u.ch_mult), 0
    for level in range(levels):
        for j in range(u.num_res_blocks):
            m[f"down.{i}.res"] = (f"down_blocks.{level}.resnets.{j}", RES_NAMES)
            m[f"down.{i}.attn"] = (f"down_blocks.{level}.attentions.{j}", ATTN_NAMES)
            i += 1
        if level != levels - 1:
            m[f"down.{i}.down.conv"] = (f"down_blocks.{level}.downsamplers.0.conv", plain)
            i += 1
    i = 0
    for block, level in enumerate(reversed(range(levels))):
        for j in range(u.num_res_blocks + 1):
            m[f"up.{i}.res"] = (f"up_blocks.{block}.resnets.{j}", RES_NAMES)
            m[f"up.{i}.attn"] = (f"up_blocks.{block}.attentions.{j}", ATTN_NAMES)
            i += 1
        if level != 0:
            m[f"up.{i}.up.conv"] = (f"up_blocks.{block}.upsamplers.0.conv", plain)
            i += 1
    return m


def map_weights(state: dict, card: ModelCard) -> dict:
    """Our state dict → UNet2DModel's (tensors shared, attention kernels squeezed to Linear weights); ConfigError
    naming a weight the mapping does not place."""
    m = prefix_map(card)
    out = {}
    for key, tensor in state.items():
        head, _, param = key.rpartition(".")
        mod, _, sub = head.rpartition(".")
        if head in m and m[head][1] is not RES_NAMES and m[head][1] is not ATTN_NAMES:
            out[f"{m[head][0]}.{param}"] = tensor
            continue
        if mod not in m or sub not in m[mod][1] or param not in ("weight", "bias"):
            raise ConfigError(f"weight {key!r} has no UNet2DModel equivalent (not a tensor of ddpm-train's UNet)")
        prefix, names = m[mod]
        if names is ATTN_NAMES and sub != "norm" and param == "weight":
            if tuple(tensor.shape[2:]) != (1, 1):
                raise ConfigError(f"weight {key!r} of shape {list(tensor.shape)} has no UNet2DModel equivalent "
                                  f"(attention projections are 1×1)")
            tensor = tensor[:, :, 0, 0]
        out[f"{prefix}.{names[sub]}.{param}"] = tensor
    return out


def build_unet(state: dict, card: ModelCard, where: str = "model.json"):
    """A diffusers UNet2DModel (eval mode) holding our weights; refuses a mismatch by key."""
    diffusers = lazy_import("diffusers", "ddpm-export --diffusers-out", INSTALL)
    import torch

    cfg = unet2d_config(card, where)
    unet = diffusers.UNet2DModel(**cfg).eval()
    mapped = map_weights(state, card)
    want = unet.state_dict()
    missing, extra = sorted(set(want) - set(mapped)), sorted(set(mapped) - set(want))
    if missing or extra:
        raise ConfigError(f"the mapped weights do not make a UNet2DModel: missing {missing[:3]}, unexpected "
                          f"{extra[:3]}")
    for k, v in want.items():
        if tuple(v.shape) != tuple(mapped[k].shape):
            raise ConfigError(f"weight {k!r}: UNet2DModel needs {list(v.shape)}, the mapping gives "
                              f"{list(mapped[k].shape)}")
    with torch.no_grad():
        unet.load_state_dict({k: v.detach().float().contiguous() for k, v in mapped.items()}, strict=True)
    return unet


def scheduler_config(card: ModelCard, scheduler=None) -> dict[str, Any]:
    """The diffusers scheduler config to write: the run's DDPM schedule (variance type and clipping of the card), or
    the scheduler the user names (a name, a scheduler_config.json, a config), on the card's forward process.
    ConfigError for a scheduler DDPMPipeline cannot step."""
    diffusers = lazy_import("diffusers", "ddpm-export --diffusers-out", INSTALL)
    from ddpm_deploy.runtime.sampling.config import scheduler_config as ours
    from ddpm_deploy.runtime.sampling.schedulers.ddpm import DDPMConfig

    d = card.diffusion
    cfg = ours(scheduler, d)
    if isinstance(cfg, DDPMConfig):
        cfg = cfg.resolved(d)
        if scheduler is None:  # diffusers' respacing (its DDPMPipeline's default), not our linspace
            cfg = type(cfg)(**{**cfg.options(), "timestep_spacing": "leading"})
    opts = {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.options().items()}
    if opts.get("lambda_min_clipped", 0) is None:
        opts["lambda_min_clipped"] = -float("inf")
    forward = {"num_train_timesteps": d.num_timesteps, "beta_schedule": {v: k for k, v in BETA_SCHEDULES.items()}[d.schedule]}
    if d.schedule == "linear":
        forward.update(beta_start=d.beta_start, beta_end=d.beta_end)
    cls = getattr(diffusers, cfg.NAME)
    if "generator" not in inspect.signature(cls.step).parameters:
        raise ConfigError(f"scheduler {cfg.NAME} has no DDPMPipeline equivalent: DDPMPipeline calls "
                          f"scheduler.step(..., generator=...), which {cfg.NAME}.step does not take; name ddpm, ddim "
                          f"or dpmsolver++")
    init, step = inspect.signature(cls.__init__).parameters, inspect.signature(cls.step).parameters
    for key in [k for k in opts if k not in init]:
        if key in step and step[key].default == opts[key]:  # e.g. DDIM's eta = 0: what DDPMPipeline's step uses
            del opts[key]
        else:
            raise ConfigError(f"scheduler option {key} = {opts[key]!r} has no DDPMPipeline equivalent: it is an "
                              f"argument of {cfg.NAME}.step, which DDPMPipeline calls with its default "
                              f"({step[key].default!r})" if key in step else
                              f"scheduler option {key} has no {cfg.NAME} config field in this diffusers")
    return json.loads(cls(**forward, prediction_type="epsilon", **opts).to_json_string())


def write_pipeline(state: dict, card: ModelCard, out: str | os.PathLike, scheduler=None, overwrite: bool = False,
                   where: str = "model.json", echo: Callable[[str], None] = lambda s: None) -> list[Path]:
    """Write the DDPMPipeline folder ``out`` from our state dict (the output policy: claimed first, written whole or
    not at all). Returns the files written."""
    diffusers = lazy_import("diffusers", "ddpm-export --diffusers-out", INSTALL)
    safetensors_torch = lazy_import("safetensors.torch", "ddpm-export --diffusers-out", INSTALL)
    out = Path(out)
    paths = targets(out)
    with Outputs("ddpm-export --diffusers-out", paths, overwrite, hint="choose another --diffusers-out") as w:
        unet = build_unet(state, card, where)
        sched = scheduler_config(card, scheduler)
        index = {"_class_name": "DDPMPipeline", "_diffusers_version": diffusers.__version__,
                 "scheduler": ["diffusers", sched["_class_name"]], "unet": ["diffusers", "UNet2DModel"]}
        w.stage(paths[0]).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        w.stage(paths[1]).write_text(unet.to_json_string(), encoding="utf-8")
        safetensors_torch.save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(w.stage(paths[2])),
                                    metadata={"format": "pt"})
        w.stage(paths[3]).write_text(json.dumps(sched, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    echo(f"wrote diffusers DDPMPipeline folder {out} (UNet2DModel, {sum(v.numel() for v in state.values()):,} "
         f"parameters; {sched['_class_name']}); load it with DDPMPipeline.from_pretrained({str(out)!r})")
    return paths
