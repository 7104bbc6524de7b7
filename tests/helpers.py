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


class Bound:
    """A device loop and one plan: ``sample(seed, indices)`` (tests that sample one plan at a time)."""

    def __init__(self, loop, plan):
        self.loop, self.plan = loop, plan

    def sample(self, seed, indices):
        return self.loop.sample(self.plan, seed, indices)

    def __getattr__(self, name):
        return getattr(self.loop, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.loop.close()


STEP_PLANS = [  # every scheduler family and option that changes the rule's columns
    ("ddpm", None, {"variance_type": "fixed_small", "clip_sample": True}),
    ("ddpm", 50, {"variance_type": "fixed_large", "clip_sample": False}),
    ("ddim", 20, {"eta": 0.5}),
    ("dpmsolver++", 10, {"solver_order": 3}),
    ("sde-dpmsolver++", 10, {}),
    ("unipc", 10, {"solver_order": 3}),
    ("unipc", 8, {"solver_type": "bh1"}),
]


def check_step_kernel(gpu, name, steps, options, shape=(3, 8, 8)):
    """The fused step kernel vs ``rules.linear_step`` at several rows of a scheduler's plan, with a batch whose two
    images stand at different rows and seeds (per-image state), history and UniPC's corrected sample included. On
    the host stand-in (tests/runtime/test_device.py) and on a GPU (test_device_gpu.py)."""
    import numpy as np

    from ddpm_deploy.runtime import rng
    from ddpm_deploy.runtime.device import kernels
    from ddpm_deploy.runtime.device.loop import DeviceLoop
    from ddpm_deploy.runtime.sampling.config import plan_for
    from ddpm_deploy.runtime.schedule import DiffusionConfig
    from ddpm_deploy.runtime.tolerances import L4_STEP_RTOL, assert_close
    from ddpm_deploy.runtime.sampling.plan import COL, MAX_HISTORY
    from ddpm_deploy.runtime.sampling.rules import linear_step
    from hostsim import LinearEpsBackend

    plan = plan_for(DiffusionConfig(), name, steps, **options)
    idx, seeds = np.array([4, 9]), [7, 8]
    g = np.random.default_rng(0)
    x, eps = (g.normal(size=(2, *shape)).astype(np.float32) * 3 for _ in range(2))
    hist = g.normal(size=(MAX_HISTORY, 2, *shape)).astype(np.float32)
    xp = g.normal(size=(2, *shape)).astype(np.float32)
    K = len(plan)
    with DeviceLoop(LinearEpsBackend(gpu, shape), shape, 2, gpu) as s:
        s.admit([0, 1], plan, 0, idx)  # uploads the plan table
        s.keys.upload(np.asarray([rng.key_from_seed(v) for v in seeds], np.uint32).reshape(-1), gpu.stream)
        H, use_xp = plan.history, int(plan.uses_xp)
        for rows in ([0, K - 1], [1, K // 2], [K - 2, 2], [K - 1, 0]):
            rows = np.clip(rows, 0, K - 1)
            s.x.upload(x.reshape(-1), gpu.stream)
            s.eps.upload(eps.reshape(-1), gpu.stream)
            if H:  # the loop holds history and xp buffers only once a plan needs them
                s.hist.upload(np.ascontiguousarray(hist.transpose(1, 0, 2, 3, 4)).reshape(-1), gpu.stream)
            if use_xp:
                s.xp.upload(xp.reshape(-1), gpu.stream)
            s.row.upload(rows.astype(np.int32), gpu.stream)
            s.state.upload(np.array([0, 0, kernels.NO_BAD_STEP, 0], np.int32), gpu.stream)
            s.module.launch("ddpm_step", s._grid(2), (kernels.THREADS, 1, 1),
                            (s.x.address, s.eps.address, s.hist.address, s.xp.address, s.table.address,
                             s.row.address, s.noise_ids.address, s.idx.address, s.keys.address, s.k.address,
                             s.state.address, s.n, s.nblocks, 2, H, use_xp), gpu.stream)
            got = s.x.download(np.empty(2 * s.n, np.float32), gpu.stream).reshape(2, *shape)
            got_h = s.hist.download(np.empty(2 * MAX_HISTORY * s.n, np.float32), gpu.stream) if H else None
            got_xp = s.xp.download(np.empty(2 * s.n, np.float32), gpu.stream).reshape(2, *shape) if use_xp else None

            coef = plan.table32[rows]
            z = np.stack([rng.normals(seeds[b], [int(idx[b])], int(plan.noise_ids[rows[b]]), shape)[0] for b in range(2)])
            need = coef[:, COL["z"]] != 0
            want, m0, want_xp = linear_step(x, eps, coef, hist, xp if use_xp else None, z * need[:, None, None, None])

            assert_close(f"{name} rows {rows.tolist()}: x", got, want, L4_STEP_RTOL * np.abs(want).max())
            if H:
                got_h = got_h.reshape(2, MAX_HISTORY, *shape)
                assert_close("x̂0 history m1 ← m0", got_h[:, 0], m0, L4_STEP_RTOL * np.abs(m0).max())
                if H > 1:
                    np.testing.assert_array_equal(got_h[:, 1], hist[0])  # m2 ← m1: moved, not recomputed
            if use_xp:
                assert_close("UniPC's corrected sample", got_xp, want_xp, L4_STEP_RTOL * np.abs(want_xp).max())
