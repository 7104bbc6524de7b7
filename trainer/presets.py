"""Model + training presets. Any field can be overridden from the CLI (`ddpm-train --set field=value`)."""

from __future__ import annotations

from dataclasses import dataclass

from ddpm_deploy.runtime.errors import ConfigError

from .config import TrainConfig, UNetConfig


@dataclass(frozen=True)
class Preset:
    name: str
    unet: UNetConfig
    train: TrainConfig
    dataset: str
    description: str


PRESETS: dict[str, Preset] = {
    # The paper's CIFAR-10 model: 35.7 M parameters.
    "ddpm-cifar10": Preset(
        name="ddpm-cifar10",
        unet=UNetConfig(image_size=32, in_channels=3, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2,
                        attn_resolutions=(16,), dropout=0.1),
        train=TrainConfig(batch_size=128, lr=2e-4, warmup_steps=5000, ema_decay=0.9999, flip=True, steps=800_000,
                          sample_every=10_000, save_every=5_000),
        dataset="cifar10:data/cifar-10-batches-py",
        description="DDPM CIFAR-10 UNet of Ho et al. 2020 (ch 128, mult 1,2,2,2, attention at 16x16, 35.7 M params)",
    ),
    # Trains in minutes on 2 CPU cores; the Quick-start demo model.
    "tiny": Preset(
        name="tiny",
        unet=UNetConfig(image_size=16, in_channels=1, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1,
                        attn_resolutions=(8,), dropout=0.0, norm_groups=8),
        train=TrainConfig(batch_size=64, lr=1e-3, warmup_steps=100, ema_decay=0.995, flip=False, steps=1500,
                          sample_every=500, save_every=500),
        dataset="digits",
        description="1.1 M-param UNet for 16x16 grayscale (the built-in digits); minutes on a 2-core CPU",
    ),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(sorted(PRESETS))}") from None
