"""Fréchet Inception Distance and Kernel Inception Distance from Inception features, and the cached statistics.

NumPy only (no torch, no SciPy): the features come from ``runtime.inception`` (ONNX Runtime).

- **FID** (Heusel et al. 2017): ``|μ1 − μ2|² + tr Σ1 + tr Σ2 − 2 tr (Σ1 Σ2)^½``. The trace of the square root is
  the sum of the square roots of the eigenvalues of Σ1 Σ2, which equal those of the *symmetric* PSD matrix
  ``A Σ2 A`` with ``A = Σ1^½`` (XY and YX have the same eigenvalues). So two ``eigh`` calls in float64 replace
  ``scipy.linalg.sqrtm`` of a non-symmetric product (whose complex round-off the TTUR code has to discard). With
  the features of side 1 at hand and fewer images than dimensions, the same eigenvalues come from an n × n matrix
  (see ``frechet_distance``): milliseconds instead of seconds for a few hundred samples.
  Safeguards: both matrices are symmetrised, and eigenvalues below the numerical-rank tolerance
  ``n · eps · λ_max`` (NumPy's ``matrix_rank`` rule) are set to 0, so rank-deficient Σ (fewer images than 2048
  features) give no spurious ``√(round-off)`` terms. Checked against torchmetrics' ``_compute_fid`` and the
  TTUR/pytorch-fid ``sqrtm`` formula in ``tests/runtime/test_fid.py``.
- **KID** (Bińkowski et al. 2018): the unbiased MMD² with the cubic polynomial kernel
  ``k(x, y) = (x·y / d + 1)³``, averaged over random subsets (the estimator of clean-fid, torch-fidelity and
  torchmetrics). Unbiased at any sample size, so it is the number to compare between small sets.
- **Stats file** (``ddpm-run fid-stats``): μ, Σ (float64), the count, the extractor's identity and, for KID, a
  seeded subset of at most ``KID_REFERENCE_MAX`` reference features. A live reference goes through the same
  :class:`FeatureStats`, so a cached reference gives exactly the number a live one gives.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .contract import FidStatsHeader
from .errors import ArtifactError, ConfigError
from .fileio import atomic_write_bytes

FEATURE_DIM = 2048
# KID defaults (clean-fid / torch-fidelity / StyleGAN's metrics): 100 subsets of at most 1,000 images per side.
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
# Reference features kept in a stats file for KID (float32, 8 KiB each: 2,000 → 16 MB).
KID_REFERENCE_MAX = 2000
KID_SEED = 0
STATS_KEYS = ("header", "mu", "sigma", "kid_features")


# --- the distances --------------------------------------------------------------------------------------------

def _rank_clip(w: np.ndarray, n: int) -> np.ndarray:
    """Eigenvalues of a symmetric PSD matrix, those under the numerical-rank tolerance (n · eps · λ_max) set to 0."""
    tol = float(np.abs(w).max(initial=0.0)) * n * np.finfo(np.float64).eps
    return np.where(w > tol, w, 0.0)


def frechet_distance(mu1, sigma1, mu2, sigma2, features1=None) -> float:
    """FID between two Gaussians N(μ1, Σ1), N(μ2, Σ2) (float64; see the module docstring for the method).

    ``features1``: the features [n, d] that μ1 and Σ1 were computed from, if at hand. With n ≤ d (a few hundred
    samples against 2048 features) the eigenvalues come from the n × n matrix X Σ2 Xᵀ / (n − 1), X the centred
    features: Σ1 Σ2 = Xᵀ (X Σ2) / (n − 1) has the same non-zero eigenvalues, found in O(n d²) instead of O(d³)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ConfigError(f"FID needs μ [d] and Σ [d, d] of one d on both sides, found μ {mu1.shape}, {mu2.shape} "
                          f"and Σ {s1.shape}, {s2.shape}")
    if not all(np.isfinite(a).all() for a in (mu1, mu2, s1, s2)):
        raise ConfigError("FID statistics contain NaN or Inf (a NaN feature or image?)")
    if features1 is not None and 2 <= len(features1) <= d:
        x = np.asarray(features1, np.float64) - mu1
        m = x @ s2 @ x.T / (len(x) - 1)                    # eig(X Σ2 Xᵀ / (n−1)) = eig(Σ1 Σ2) \ {0}
    else:
        w1, v1 = np.linalg.eigh((s1 + s1.T) / 2.0)
        a = (v1 * np.sqrt(_rank_clip(w1, d))) @ v1.T       # Σ1^½
        m = a @ s2 @ a                                     # eig(Σ1^½ Σ2 Σ1^½) = eig(Σ1 Σ2)
    w = _rank_clip(np.linalg.eigvalsh((m + m.T) / 2.0), len(m))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.sqrt(w).sum())


def mmd2_poly(x: np.ndarray, y: np.ndarray, paired: bool = False) -> float:
    """Unbiased MMD² of two feature sets [m, d] and [n, d] with k(a, b) = (a·b / d + 1)³ (float64).

    ``paired``: row i of x and row i of y belong together (the same seed through two precisions), so k(x_i, y_i)
    is left out of the cross term as k(x_i, x_i) is left out of the within terms; otherwise those near-copies make
    the estimate negative."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    m, n, d = x.shape[0], y.shape[0], x.shape[1]
    if m < 2 or n < 2:
        raise ConfigError(f"KID needs at least 2 images per side, found {m} and {n}")
    if paired and m != n:
        raise ConfigError(f"paired KID needs as many images on both sides, found {m} and {n}")
    kxx = (x @ x.T / d + 1.0) ** 3
    kyy = (y @ y.T / d + 1.0) ** 3
    kxy = (x @ y.T / d + 1.0) ** 3
    cross = (kxy.sum() - np.trace(kxy)) / (m * (m - 1)) if paired else kxy.mean()
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2.0 * cross)


def kernel_distance(f1: np.ndarray, f2: np.ndarray, subsets: int = KID_SUBSETS,
                    subset_size: int = KID_SUBSET_SIZE, seed: int = KID_SEED, paired: bool = False) -> dict[str, Any]:
    """KID: MMD² over ``subsets`` random subsets of ``min(subset_size, n1, n2)`` images per side, drawn without
    replacement with a seeded generator (``paired``: the same rows on both sides, see :func:`mmd2_poly`). Returns
    mean, std (over subsets; 0 when a subset is a whole side), subsets, the subset size and whether paired."""
    if subsets < 1 or subset_size < 2:
        raise ConfigError(f"KID needs subsets >= 1 and subset size >= 2, found {subsets} and {subset_size}")
    n1, n2 = len(f1), len(f2)
    m = min(subset_size, n1, n2)
    rng = np.random.default_rng(seed)
    vals = np.empty(subsets)
    for i in range(subsets):
        i1 = rng.choice(n1, m, replace=False)
        i2 = i1 if paired else rng.choice(n2, m, replace=False)
        vals[i] = mmd2_poly(f1[i1], f2[i2], paired=paired)
    return {"mean": float(vals.mean()), "std": float(vals.std()), "subsets": int(subsets), "subset_size": int(m),
            "paired": bool(paired)}


# --- statistics -----------------------------------------------------------------------------------------------

@dataclass(eq=False)
class FeatureStats:
    """What FID and KID need of one side: μ, Σ (float64), the image count, KID's reference features and the
    identity of the extractor that made them (``extractor``: weights_sha256, preprocess, name)."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int
    kid_features: np.ndarray
    extractor: dict[str, Any]
    source: str
    image_shape: tuple[int, int, int] | None = None  # (H, W, C) of the images before the resize

    @classmethod
    def from_features(cls, features: np.ndarray, extractor: dict[str, Any], source: str,
                      image_shape=None, kid_max: int = KID_REFERENCE_MAX, seed: int = KID_SEED) -> "FeatureStats":
        f = np.asarray(features)
        if f.ndim != 2 or f.shape[0] < 2:
            raise ConfigError(f"{source}: FID needs at least 2 images, found features of shape {f.shape}")
        if not np.isfinite(f).all():
            raise ArtifactError(f"{source}: the feature extractor returned NaN or Inf")
        f64 = f.astype(np.float64)
        keep = np.sort(np.random.default_rng(seed).choice(len(f), min(kid_max, len(f)), replace=False))
        return cls(mu=f64.mean(axis=0), sigma=np.cov(f64, rowvar=False), count=int(len(f)),
                   kid_features=np.ascontiguousarray(f[keep], dtype=np.float32), extractor=dict(extractor),
                   source=source, image_shape=tuple(int(v) for v in image_shape) if image_shape else None)

    @classmethod
    def accumulator(cls, n: int, extractor: dict[str, Any], source: str, image_shape=None,
                    kid_max: int = KID_REFERENCE_MAX, seed: int = KID_SEED) -> "StatsAccumulator":
        """Statistics of ``n`` images from their features given a batch at a time (memory: Σ and KID's ≤ kid_max
        features, whatever ``n``). Every reference (a live one and a cached ``fid-stats`` file) goes through it."""
        return StatsAccumulator(n, extractor, source, image_shape, kid_max, seed)

    # --- the file ---
    def header(self) -> FidStatsHeader:
        return FidStatsHeader(count=self.count, feature_dim=int(self.mu.shape[0]), extractor=self.extractor,
                              source=self.source, image_shape=list(self.image_shape) if self.image_shape else None,
                              kid_features=int(len(self.kid_features)))

    def save(self, path: str | os.PathLike) -> Path:
        """One .npz (μ, Σ, KID features, and the header as JSON), written atomically."""
        buf = io.BytesIO()
        np.savez(buf, header=np.array(self.header().to_json()), mu=self.mu, sigma=self.sigma,
                 kid_features=self.kid_features)
        atomic_write_bytes(path, buf.getvalue())
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FeatureStats":
        p = Path(path)
        hint = "compute it again with `ddpm-run fid-stats REF --out FILE`"
        try:
            with np.load(p, allow_pickle=False) as z:
                missing = [k for k in STATS_KEYS if k not in z.files]
                if missing:
                    raise ArtifactError(f"{p}: expected a FID statistics file with arrays {list(STATS_KEYS)}, "
                                        f"found {z.files}; {hint}")
                header = FidStatsHeader.from_json(str(z["header"]), str(p))
                mu, sigma, kid = z["mu"], z["sigma"], z["kid_features"]
        except FileNotFoundError:
            raise ArtifactError(f"expected the FID statistics file {p}, found no such file; {hint}") from None
        except (OSError, ValueError, EOFError, TypeError, zipfile.BadZipFile) as e:  # TypeError: a .npy (no `with`)
            raise ArtifactError(f"{p}: not a readable FID statistics file ({e}); {hint}") from None
        d = header.feature_dim
        if mu.shape != (d,) or sigma.shape != (d, d) or kid.ndim != 2 or kid.shape[1] != d:
            raise ArtifactError(f"{p}: expected μ [{d}], Σ [{d}, {d}] and KID features [k, {d}], found "
                                f"{mu.shape}, {sigma.shape}, {kid.shape}; {hint}")
        return cls(mu=mu, sigma=sigma, count=header.count, kid_features=kid, extractor=header.extractor,
                   source=header.source, image_shape=tuple(header.image_shape) if header.image_shape else None)


class StatsAccumulator:
    """μ and Σ (float64) summed a batch at a time around a shift (the first batch's mean, against cancellation):
    Σ = (Σᵢ dᵢdᵢᵀ − n d̄d̄ᵀ) / (n − 1) with dᵢ = fᵢ − shift; KID's features are the rows of a seeded choice of
    ``min(kid_max, n)`` of the ``n`` indices, drawn before the first batch."""

    def __init__(self, n: int, extractor: dict[str, Any], source: str, image_shape=None,
                 kid_max: int = KID_REFERENCE_MAX, seed: int = KID_SEED):
        if n < 2:
            raise ConfigError(f"{source}: FID needs at least 2 images, found {n}")
        self.n, self.extractor, self.source, self.image_shape = n, dict(extractor), source, image_shape
        self.keep = np.sort(np.random.default_rng(seed).choice(n, min(kid_max, n), replace=False))
        self.kid: np.ndarray | None = None
        self.shift = self.s = self.sxx = None
        self.count = 0

    def add(self, features: np.ndarray) -> None:
        f = np.asarray(features)
        if f.ndim != 2 or self.count + len(f) > self.n:
            raise ConfigError(f"{self.source}: expected features [b, d] of {self.n} images in all, found {f.shape} "
                              f"after {self.count}")
        if not np.isfinite(f).all():
            raise ArtifactError(f"{self.source}: the feature extractor returned NaN or Inf")
        f64 = f.astype(np.float64)
        if self.shift is None:
            d = f.shape[1]
            self.shift, self.s, self.sxx = f64.mean(axis=0), np.zeros(d), np.zeros((d, d))
            self.kid = np.empty((len(self.keep), d), np.float32)
        dev = f64 - self.shift
        self.s += dev.sum(axis=0)
        self.sxx += dev.T @ dev
        lo, hi = self.count, self.count + len(f)
        a, b = np.searchsorted(self.keep, [lo, hi])
        self.kid[a:b] = f[self.keep[a:b] - lo]
        self.count = hi

    def finish(self) -> FeatureStats:
        if self.count != self.n:
            raise ConfigError(f"{self.source}: features of {self.count} images, expected {self.n}")
        mean_dev = self.s / self.n
        sigma = (self.sxx - self.n * np.outer(mean_dev, mean_dev)) / (self.n - 1)
        return FeatureStats(mu=self.shift + mean_dev, sigma=(sigma + sigma.T) / 2.0, count=int(self.n),
                            kid_features=np.ascontiguousarray(self.kid), extractor=self.extractor,
                            source=self.source,
                            image_shape=tuple(int(v) for v in self.image_shape) if self.image_shape else None)


def is_stats_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a .npz written by :meth:`FeatureStats.save` (it holds a FID statistics header)."""
    p = Path(path)
    if not p.is_file() or p.suffix != ".npz":
        return False
    try:
        with np.load(p, allow_pickle=False) as z:
            return "header" in z.files and json.loads(str(z["header"])).get("schema") == FidStatsHeader.SCHEMA
    except Exception:
        return False


def check_same_extractor(a: dict[str, Any], b: dict[str, Any], where: str) -> None:
    """Refuse statistics made by another network or preprocessing (their FID would mean nothing)."""
    for key in ("weights_sha256", "preprocess"):
        if a.get(key) != b.get(key):
            raise ArtifactError(f"{where}: made with an extractor whose {key} is {b.get(key)!r}, but this extractor "
                                f"has {a.get(key)!r}; compute the statistics again with this extractor "
                                "(ddpm-run fid-stats)")
