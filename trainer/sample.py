"""PyTorch ancestral sampler: the trainer's preview grids and the L3 trajectory reference.

Same schedule tables (runtime.schedule) and the same counter-based noise (runtime.rng) as the runtime, so
sample i with seed s matches the runtime's sample i up to floating-point differences of the model.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from ddpm_deploy.runtime import rng
from ddpm_deploy.runtime.schedule import Schedule


@torch.no_grad()
def sample_torch(
    model: torch.nn.Module,
    schedule: Schedule,
    shape: Sequence[int],
    seed: int,
    indices: Sequence[int],
    callback: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Run the full loop for the given sample indices; returns float32 x_0 [B, *shape] (unclipped)."""
    idx = np.asarray(indices, dtype=np.int64)
    device = next(model.parameters()).device
    x = torch.from_numpy(rng.normals(seed, idx, rng.INITIAL_STEP, tuple(shape))).to(device)
    table = torch.from_numpy(schedule.table32).to(device)
    n = len(schedule)
    for k, i in enumerate(range(n - 1, -1, -1)):
        t_val = int(schedule.timesteps[i])
        t = torch.full((len(idx),), t_val, dtype=torch.int32, device=device)
        eps = model(x, t).float()
        a, b, c1, c2, sigma = table[i]
        x0 = a * x - b * eps
        if schedule.config.clip_denoised:
            x0 = x0.clamp(-1.0, 1.0)
        x = c1 * x0 + c2 * x
        if i > 0:
            z = torch.from_numpy(rng.normals(seed, idx, t_val, tuple(shape))).to(device)
            x = x + sigma * z
        if callback is not None:
            callback(k + 1, n)
    return x.cpu().numpy()
