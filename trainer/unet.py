"""The DDPM UNet (Ho et al. 2020, appendix B; a port of the reference TensorFlow `diffusion_utils` model).

ResNet blocks with the timestep embedding added after the first conv, GroupNorm + SiLU, dropout,
single-head self-attention at chosen resolutions, strided-conv downsampling, nearest ×2 upsampling + conv,
zero-initialised output convs. The sinusoidal timestep embedding is computed in fp32 even under autocast.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import UNetConfig  # noqa: F401  (torch-free; defined with the other configs)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding as in the reference code: sin first, frequencies exp(-log(10000)·i/(half−1))."""
    half = dim // 2
    with torch.autocast(device_type=t.device.type, enabled=False):
        freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32) * (-math.log(10000.0) / (half - 1)))
        args = t.to(torch.float32)[:, None] * freqs[None, :]
        emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
        if dim % 2:
            emb = F.pad(emb, (0, 1))
    return emb


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, temb_ch: int, dropout: float, groups: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.temb_proj = nn.Linear(temb_ch, cout)
        self.norm2 = nn.GroupNorm(groups, cout, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(cout, cout, 3, padding=1))
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H·W positions."""

    def __init__(self, ch: int, groups: int, eps: float):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch, eps=eps)
        self.q = nn.Conv2d(ch, ch, 1)
        self.k = nn.Conv2d(ch, ch, 1)
        self.v = nn.Conv2d(ch, ch, 1)
        self.proj_out = _zero(nn.Conv2d(ch, ch, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        q = self.q(h).reshape(B, C, H * W).transpose(1, 2)  # [B, HW, C]
        k = self.k(h).reshape(B, C, H * W)  # [B, C, HW]
        v = self.v(h).reshape(B, C, H * W).transpose(1, 2)  # [B, HW, C]
        w = torch.softmax(torch.bmm(q, k) * (C ** -0.5), dim=-1)
        h = torch.bmm(w, v).transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """ε-prediction UNet: forward(x [B,C,H,W], t [B] int) -> ε [B,C,H,W]."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg
        ch, g, e = cfg.ch, cfg.norm_groups, cfg.norm_eps
        temb_ch = ch * 4
        self.temb = nn.Sequential(nn.Linear(ch, temb_ch), nn.SiLU(), nn.Linear(temb_ch, temb_ch))
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)

        self.down = nn.ModuleList()
        hs_ch = [ch]
        cur, res = ch, cfg.image_size
        for level, mult in enumerate(cfg.ch_mult):
            for _ in range(cfg.num_res_blocks):
                blk = nn.ModuleDict({"res": ResBlock(cur, ch * mult, temb_ch, cfg.dropout, g, e)})
                cur = ch * mult
                if res in cfg.attn_resolutions:
                    blk["attn"] = AttnBlock(cur, g, e)
                self.down.append(blk)
                hs_ch.append(cur)
            if level != len(cfg.ch_mult) - 1:
                self.down.append(nn.ModuleDict({"down": Downsample(cur)}))
                hs_ch.append(cur)
                res //= 2

        self.mid_res1 = ResBlock(cur, cur, temb_ch, cfg.dropout, g, e)
        self.mid_attn = AttnBlock(cur, g, e)
        self.mid_res2 = ResBlock(cur, cur, temb_ch, cfg.dropout, g, e)

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.ch_mult))):
            for _ in range(cfg.num_res_blocks + 1):
                blk = nn.ModuleDict({"res": ResBlock(cur + hs_ch.pop(), ch * mult, temb_ch, cfg.dropout, g, e)})
                cur = ch * mult
                if res in cfg.attn_resolutions:
                    blk["attn"] = AttnBlock(cur, g, e)
                self.up.append(blk)
            if level != 0:
                self.up.append(nn.ModuleDict({"up": Upsample(cur)}))
                res *= 2
        assert not hs_ch
        self.norm_out = nn.GroupNorm(g, cur, eps=e)
        self.conv_out = _zero(nn.Conv2d(cur, cfg.in_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = self.temb(timestep_embedding(t, self.config.ch))
        h = self.conv_in(x)
        hs = [h]
        for blk in self.down:
            if "down" in blk:
                h = blk["down"](h)
            else:
                h = blk["res"](h, temb)
                if "attn" in blk:
                    h = blk["attn"](h)
            hs.append(h)
        h = self.mid_res2(self.mid_attn(self.mid_res1(h, temb)), temb)
        for blk in self.up:
            if "up" in blk:
                h = blk["up"](h)
            else:
                h = blk["res"](torch.cat([h, hs.pop()], dim=1), temb)
                if "attn" in blk:
                    h = blk["attn"](h)
        return self.conv_out(F.silu(self.norm_out(h)))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
