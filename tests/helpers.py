"""Helpers shared by the tests: tiny seeded models trained by the tests themselves."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

# A micro UNet (8×8 digits) that trains in seconds; the same block structure as the presets.
MICRO_UNET = dict(image_size=8, in_channels=1, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                  dropout=0.0, norm_groups=8)


def train_run(run_dir: Path, steps: int = 30, unet: dict | None = None, image_size: int = 8, **train_kw):
    """Train a seeded model into run_dir with the library API; returns the TrainResult."""
    from ddpm_deploy.runtime.schedule import DiffusionConfig
    from ddpm_deploy.trainer.config import TrainConfig
    from ddpm_deploy.trainer.data import load_dataset
    from ddpm_deploy.trainer.train import Trainer
    from ddpm_deploy.trainer.unet import UNetConfig

    ucfg = UNetConfig(**(unet or MICRO_UNET))
    kw = dict(steps=steps, batch_size=16, lr=2e-3, warmup_steps=5, ema_decay=0.9, sample_every=0, save_every=10,
              log_every=5, seed=0)
    kw.update(train_kw)
    tcfg = TrainConfig(**kw)
    data = load_dataset("digits", image_size=ucfg.image_size, channels=ucfg.in_channels)
    return Trainer(run_dir, ucfg, tcfg, DiffusionConfig(), data.images, data.name, preset="test").run()


_BLOCK_TORCH = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
sys.meta_path.insert(0, Block())
"""


def run_without_torch(body: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``body`` in a fresh interpreter in which any import of torch raises ImportError."""
    code = _BLOCK_TORCH + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)


def ttur_fid(mu1, s1, mu2, s2, eps=1e-6) -> float:
    """FID by the TTUR / pytorch-fid formula (scipy.linalg.sqrtm of Σ1 Σ2, an offset if that fails, the real
    part): the independent reference our eigenvalue method is checked against."""
    import warnings

    import numpy as np
    import scipy.linalg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "matrix is singular" for rank-deficient Σ
        covmean = scipy.linalg.sqrtm(s1 @ s2)
        if not np.isfinite(covmean).all():
            off = np.eye(len(s1)) * eps
            covmean = scipy.linalg.sqrtm((s1 + off) @ (s2 + off))
    d = mu1 - mu2
    return float(d @ d + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))
