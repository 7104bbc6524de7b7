"""Seeded random-weights models of the presets: what benchmarks, the GPU check and tests use when speed or an
exact comparison matters and training does not. One definition, so every "random ddpm-cifar10" is the same."""

from __future__ import annotations

import os
from pathlib import Path


def random_unet(cfg, seed: int = 0):
    """Our UNet of ``cfg`` (a UNetConfig) in eval mode with seeded weights; the zero-initialised output convs get
    N(0, 0.02) weights too, so ε is not trivially 0."""
    import torch

    from ddpm_deploy.trainer.unet import UNet

    torch.manual_seed(seed)
    model = UNet(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    return model


def random_preset_model(preset: str, seed: int = 0):
    """``(UNet in eval mode, UNetConfig)`` of ``preset`` with seeded weights (``random_unet``)."""
    from ddpm_deploy.trainer.presets import get_preset

    cfg = get_preset(preset).unet
    return random_unet(cfg, seed), cfg


def unet_card(cfg, dataset: str | None = None):
    """The ModelCard our exporter writes for a random-weights UNet of ``cfg`` (default diffusion config)."""
    from ddpm_deploy.runtime.config import DataSpec, ModelCard
    from ddpm_deploy.runtime.schedule import DiffusionConfig

    return ModelCard(DiffusionConfig(), DataSpec(cfg.in_channels, cfg.image_size),
                     architecture={"type": "ddpm-unet", **cfg.to_dict()},
                     training={"dataset": dataset} if dataset else {})


def preset_card(preset: str, dataset: str | None = None):
    from ddpm_deploy.trainer.presets import get_preset

    return unet_card(get_preset(preset).unet, dataset)


def random_unet_onnx(cfg, path: str | os.PathLike, seed: int = 0, dataset: str | None = None):
    """Export ``random_unet(cfg, seed)`` to ``path`` with our exporter; returns ``(path, card)``. An existing file
    is reused (the same seed gives the same model). Needs torch and onnx only (no training data)."""
    from ddpm_deploy.export.onnx_export import export_torch, finalize, save_onnx

    path = Path(path)
    card = unet_card(cfg, dataset)
    if not path.exists():
        save_onnx(finalize(export_torch(random_unet(cfg, seed), cfg.in_channels, cfg.image_size), card), path)
    return path, card


def random_preset_onnx(preset: str, path: str | os.PathLike, seed: int = 0, dataset: str | None = None):
    """``random_unet_onnx`` of a preset's UNet; returns ``(path, card)``."""
    from ddpm_deploy.trainer.presets import get_preset

    return random_unet_onnx(get_preset(preset).unet, path, seed, dataset)
