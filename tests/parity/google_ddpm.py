"""The google/ddpm-cifar10-32 configuration and a writer of its on-disk layout (random seeded weights)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

# google/ddpm-cifar10-32, config.json (UNet2DModel) as published on the Hugging Face hub (the snapshot that
# diffusers' loaders resolve; block_out_channels 128/256/256/256, attention at 16×16, 35.7 M parameters).
GOOGLE_DDPM_CIFAR10_32_UNET = {
    "_class_name": "UNet2DModel",
    "act_fn": "silu",
    "attention_head_dim": None,
    "block_out_channels": [128, 256, 256, 256],
    "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "in_channels": 3,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-06,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 32,
    "time_embedding_type": "positional",
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}
# Its scheduler_config.json (root of the repo, beside config.json).
GOOGLE_DDPM_CIFAR10_32_SCHEDULER = {
    "_class_name": "DDPMScheduler",
    "_diffusers_version": "0.1.0",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "clip_sample": True,
    "num_train_timesteps": 1000,
    "trained_betas": None,
    "variance_type": "fixed_large",
}
# The same block structure at a fraction of the width, for the 1000-step trajectory (0.15 M parameters).
TINY_WIDTH = {"block_out_channels": [8, 16, 16, 16], "norm_num_groups": 4}


def save_google_layout(root: Path, unet_overrides: dict | None = None, scheduler_overrides: dict | None = None,
                       seed: int = 0) -> Path:
    """A seeded, randomly initialised UNet2DModel saved as google/ddpm-cifar10-32 is laid out (flat)."""
    diffusers = pytest.importorskip("diffusers")
    cfg = {k: v for k, v in {**GOOGLE_DDPM_CIFAR10_32_UNET, **(unet_overrides or {})}.items() if not k.startswith("_")}
    torch.manual_seed(seed)
    unet = diffusers.UNet2DModel(**cfg).eval()
    unet.save_pretrained(str(root), safe_serialization=True)
    sched = {**GOOGLE_DDPM_CIFAR10_32_SCHEDULER, **(scheduler_overrides or {})}
    (root / "scheduler_config.json").write_text(json.dumps(sched, indent=2))
    (root / "model_index.json").write_text(json.dumps(
        {"_class_name": "DDPMPipeline", "scheduler": ["diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DModel"]}))
    return root


class _Named(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep):
        return self.unet(sample, timestep).sample


def export_diffusers_named(unet, path: Path, t_example: torch.Tensor, t_axes: dict) -> Path:
    """A UNet2DModel exported to ONNX as other tools (optimum, diffusers' ONNX scripts) write it: inputs ``sample``,
    ``timestep`` (``t_example``'s dtype and rank; ``t_axes``: its dynamic axes), output ``out_sample``, dynamic batch."""
    import warnings

    c, s = unet.config.in_channels, unet.config.sample_size
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Named(unet.eval()), (torch.randn(2, c, s, s), t_example), str(path), dynamo=False,
                          opset_version=17, input_names=["sample", "timestep"], output_names=["out_sample"],
                          dynamic_axes={"sample": {0: "batch"}, "out_sample": {0: "batch"}, **t_axes})
    return path
