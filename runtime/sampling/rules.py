"""The step rule, in NumPy: one row of a plan's table per image, applied in float32 (``plan.COLUMNS``).

The order of the float32 operations is fixed, and a term whose coefficient is zero for every image of the batch
is skipped: DDPM's step is then exactly ((c1·x̂0 + c2·x) + σ·z), as it has been since the first release, so its
images are unchanged bit for bit. The device kernel (``device/kernels.py``) performs the same operations in the
same order with explicitly rounded float32 arithmetic.
"""

from __future__ import annotations

import numpy as np

from ..errors import SamplingError
from .plan import COL, MAX_HISTORY, XP_SYMBOLS

_NEXT_TERMS = ("eps", "m1", "m2", "m3", "xp", "z")  # after m0·m0 + x·x, in this order


def _col(coef: np.ndarray, name: str, ndim: int) -> np.ndarray:
    return coef[:, COL[name]].reshape(-1, *([1] * (ndim - 1)))


def linear_step(x: np.ndarray, eps: np.ndarray, coef: np.ndarray, hist: np.ndarray | None,
                xp: np.ndarray | None, z: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """One step for a batch: ``coef`` float32 [B, len(COLUMNS)] (each image's row), x and ε float32 [B, ...],
    ``hist`` float32 [MAX_HISTORY, B, ...] (m1, m2, m3) or None, ``xp`` [B, ...] or None, ``z`` [B, ...] or None
    where no image draws noise. Returns (x_next, m0, xp_next or None); the caller shifts the history."""
    nd = x.ndim
    m0 = _col(coef, "a", nd) * x - _col(coef, "b", nd) * eps  # eq. 15: x̂0 = √(1/ᾱ)·x − √(1/ᾱ − 1)·ε
    clip = coef[:, COL["clip"]]
    if np.isfinite(clip).any():
        c = clip.reshape(-1, *([1] * (nd - 1)))
        np.clip(m0, -c, c, out=m0)
    used = coef.any(axis=0)
    out = _col(coef, "m0", nd) * m0 + _col(coef, "x", nd) * x
    for name in _NEXT_TERMS:
        if not used[COL[name]]:
            continue
        out += _col(coef, name, nd) * _operand(name, eps, hist, xp, z)
    xp_next = None
    if xp is not None:
        xp_next = np.zeros_like(x)
        for name in XP_SYMBOLS:
            if used[COL[f"xp_{name}"]]:
                xp_next += _col(coef, f"xp_{name}", nd) * _operand(name, eps, hist, xp, z, x=x, m0=m0)
    return out, m0, xp_next


def _operand(name, eps, hist, xp, z, x=None, m0=None):
    if name == "eps":
        return eps
    if name == "z":
        if z is None:
            raise ValueError("noise z is required by this step")
        return z
    if name == "xp":
        return xp
    if name == "x":
        return x
    if name == "m0":
        return m0
    j = int(name[1])  # m1..m3
    if hist is None or j > MAX_HISTORY:
        raise ValueError(f"history {name} is required by this step")
    return hist[j - 1]


def nonfinite_error(what: str, t: int, k: int, n: int, indices: np.ndarray, bad: np.ndarray, where: str = "") -> \
        SamplingError:
    """The one message for a non-finite ε or step result, on the host or the GPU."""
    first = f"sample index {int(indices[bad[0]])} ({len(bad)} of {len(indices)} samples affected)" if len(bad) else \
        "a sample that recovered by the end"
    return SamplingError(f"non-finite {what} at step t={t} (loop step {k}/{n}){where} in {first}; check the model file "
                         f"and its precision (try the fp32 model)")
