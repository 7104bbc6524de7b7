"""The DDPM UNet: parameter count of the paper's CIFAR-10 model, shapes, zero-init, fp32 embedding."""

import math

import pytest
import torch

from ddpm_deploy.runtime.errors import ConfigError
from ddpm_deploy.trainer.presets import PRESETS, get_preset
from ddpm_deploy.trainer.unet import UNet, UNetConfig, count_parameters, timestep_embedding


def test_cifar10_preset_has_paper_parameter_count():
    m = UNet(PRESETS["ddpm-cifar10"].unet)
    assert count_parameters(m) == pytest.approx(35.7e6, abs=0.1e6)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_forward_shape(name):
    cfg = PRESETS[name].unet
    m = UNet(cfg).eval()
    x = torch.randn(2, cfg.in_channels, cfg.image_size, cfg.image_size)
    assert m(x, torch.tensor([0, 999])).shape == x.shape


def test_output_conv_zero_initialised_so_untrained_eps_is_zero():
    cfg = UNetConfig(**{**PRESETS["tiny"].unet.to_dict(), "ch_mult": (1, 2, 2), "attn_resolutions": (8,)})
    m = UNet(cfg)
    x = torch.randn(1, 1, 16, 16)
    assert torch.count_nonzero(m(x, torch.tensor([5]))) == 0


def test_timestep_embedding_matches_reference_formula_sin_first():
    t = torch.tensor([0, 1, 999])
    e = timestep_embedding(t, 8)
    half = 4
    freqs = [math.exp(-math.log(10000) * i / (half - 1)) for i in range(half)]
    for r, tv in enumerate([0, 1, 999]):
        want = [math.sin(tv * f) for f in freqs] + [math.cos(tv * f) for f in freqs]
        assert e[r].tolist() == pytest.approx(want, abs=1e-4)


def test_timestep_embedding_stays_fp32_under_autocast():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        e = timestep_embedding(torch.tensor([999]), 32)
    assert e.dtype == torch.float32


def test_config_round_trip_and_validation():
    cfg = PRESETS["ddpm-cifar10"].unet
    assert UNetConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="divisible"):
        UNetConfig(image_size=30)
    with pytest.raises(ConfigError, match="unknown"):
        UNetConfig.from_dict({"bogus": 1})
    with pytest.raises(ConfigError, match="available"):
        get_preset("nope")
