"""PyTorch sampler: the trainer's preview grids and the L3 trajectory reference, for any step plan.

Same plan tables (runtime.sampling: one row of named coefficient columns per step) and the same counter-based
noise (runtime.rng) as the runtime, so sample i with seed s matches the runtime's sample i up to floating-point
differences of the model. The step is ``runtime.sampling.rules.linear_step`` in torch, columns read by name.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from ddpm_deploy.runtime import rng
from ddpm_deploy.runtime.sampling.plan import COL, MAX_HISTORY, XP_SYMBOLS, StepPlan


@torch.no_grad()
def sample_torch(
    model: torch.nn.Module,
    plan: StepPlan,
    shape: Sequence[int],
    seed: int,
    indices: Sequence[int],
    callback: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Run the whole plan for the given sample indices; returns float32 x_0 [B, *shape] (unclipped)."""
    idx = np.asarray(indices, dtype=np.int64)
    shape = tuple(int(s) for s in shape)
    device = next(model.parameters()).device
    x = torch.from_numpy(rng.normals(seed, idx, rng.INITIAL_STEP, shape)).to(device)
    hist = [torch.zeros_like(x) for _ in range(MAX_HISTORY)]
    xp = torch.zeros_like(x)
    table = plan.table32
    n = len(plan)
    for k in range(n):
        row = table[k]
        c = lambda name: float(row[COL[name]])  # noqa: E731
        t = torch.full((len(idx),), int(plan.timesteps[k]), dtype=torch.int32, device=device)
        eps = model(x, t).float()
        m0 = c("a") * x - c("b") * eps
        if np.isfinite(c("clip")):
            m0 = m0.clamp(-c("clip"), c("clip"))
        operands = {"x": x, "eps": eps, "m0": m0, "m1": hist[0], "m2": hist[1], "m3": hist[2], "xp": xp}
        out = c("m0") * m0 + c("x") * x
        for name in ("eps", "m1", "m2", "m3", "xp"):
            if c(name):
                out = out + c(name) * operands[name]
        if c("z"):
            z = torch.from_numpy(rng.normals(seed, idx, int(plan.noise_ids[k]), shape)).to(device)
            out = out + c("z") * z
        if plan.uses_xp:
            xp = sum((c(f"xp_{s}") * operands[s] for s in XP_SYMBOLS if c(f"xp_{s}")), torch.zeros_like(x))
        hist = [m0, hist[0], hist[1]]
        x = out
        if callback is not None:
            callback(k + 1, n)
    return x.cpu().numpy()
