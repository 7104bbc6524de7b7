"""FID and KID with the real Inception on real images (the issue's sanity checks): two disjoint halves of the
digits are close, digits and uniform noise are far apart, FID(x, x) ≈ 0, FID is symmetric, cached statistics
give the same number as live ones, and our FID agrees with torchmetrics and the TTUR formula on real features."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import ttur_fid

from ddpm_deploy.runtime.fid import FeatureStats, frechet_distance, kernel_distance
from ddpm_deploy.runtime.inception import InceptionExtractor
from ddpm_deploy.runtime.tolerances import (FID_DIGITS_HALVES_MAX, FID_DIGITS_NOISE_MIN, FID_RANK_DEFICIENT_RTOL,
                                            FID_PATHS_RTOL, FID_SELF_ATOL, FID_SYMMETRY_RTOL)

pytestmark = pytest.mark.slow  # ~500 images through Inception-v3 on the CPU

N_REAL, N_NOISE = 200, 100


@pytest.fixture(scope="module")
def features(fid_extractor):
    """Inception features of two disjoint random halves of the real digits (16×16, as the demo samples) and of
    uniform noise images of the same shape."""
    from ddpm_deploy.runtime.imageio import to_uint8
    from ddpm_deploy.trainer.data import load_dataset

    digits = to_uint8(load_dataset("digits").images)
    order = np.random.default_rng(0).permutation(len(digits))
    noise = np.random.default_rng(1).integers(0, 256, (N_NOISE, *digits.shape[1:]), dtype=np.uint8)
    with InceptionExtractor(fid_extractor) as ext:
        out = {"a": ext.features(digits[order[:N_REAL]]), "b": ext.features(digits[order[N_REAL:2 * N_REAL]]),
               "noise": ext.features(noise)}
        out["identity"] = ext.identity
    return out


def stats_of(f, ident=None):
    return FeatureStats.from_features(f, ident or {}, "test")


@pytest.fixture(scope="module")
def fids(features):
    """FID of each pair the tests need, computed once (a 2048-dimensional FID takes seconds on 2 cores)."""
    st = {k: stats_of(features[k]) for k in ("a", "b", "noise")}
    pair = lambda x, y: frechet_distance(st[x].mu, st[x].sigma, st[y].mu, st[y].sigma,  # noqa: E731
                                         features1=features[x])
    return {"ab": pair("a", "b"), "ba": pair("b", "a"), "aa": pair("a", "a"), "a-noise": pair("a", "noise")}


def test_digits_halves_are_close_and_noise_is_far(features, fids):
    kid_halves = kernel_distance(features["a"], features["b"], subsets=20, subset_size=100)
    kid_noise = kernel_distance(features["a"], features["noise"], subsets=20, subset_size=100)

    assert 0 < fids["ab"] < FID_DIGITS_HALVES_MAX, fids
    assert fids["a-noise"] > FID_DIGITS_NOISE_MIN, fids
    assert abs(kid_halves["mean"]) < 3 * kid_halves["std"] + 1e-3      # KID: unbiased, ≈ 0 for one distribution
    assert kid_noise["mean"] > 100 * max(kid_halves["mean"], kid_halves["std"])


def test_fid_of_a_set_with_itself_is_zero_and_fid_is_symmetric(fids):
    assert abs(fids["aa"]) <= FID_SELF_ATOL
    assert abs(fids["ab"] - fids["ba"]) <= FID_SYMMETRY_RTOL * fids["ab"], fids


def test_cached_statistics_give_the_same_fid_and_kid(features, fids, tmp_path):
    a, b, ident = features["a"], features["b"], features["identity"]
    live_ref = FeatureStats.from_features(b, ident, "digits half b")
    cached_ref = FeatureStats.load(live_ref.save(tmp_path / "b.npz"))
    sa = FeatureStats.from_features(a, ident, "digits half a")

    cached = frechet_distance(sa.mu, sa.sigma, cached_ref.mu, cached_ref.sigma, features1=a)

    assert cached == fids["ab"]  # the live reference gave exactly this
    kid = lambda ref: kernel_distance(a, ref.kid_features, subsets=10)  # noqa: E731
    assert kid(live_ref) == kid(cached_ref)


def test_fid_on_real_features_agrees_with_torchmetrics_and_ttur(features):
    """Real features of 200 and 100 images, cut to their first 256 dimensions so that SciPy's sqrtm takes well
    under a second: Σ is rank-deficient as with the full 2048 (rank ≤ 199 < 256). The sqrtm-based references keep
    √(round-off) terms from the zero eigenvalues, so they agree with us, and with each other, only to ~1e-6."""
    torch = pytest.importorskip("torch")
    from torchmetrics.image.fid import _compute_fid

    cut = {k: features[k][:, :256] for k in ("a", "b", "noise")}
    st = {k: stats_of(f) for k, f in cut.items()}
    for x, y in (("a", "b"), ("a", "noise"), ("noise", "a")):
        args = (st[x].mu, st[x].sigma, st[y].mu, st[y].sigma)
        ours = frechet_distance(*args)
        from_features = frechet_distance(*args, features1=cut[x])  # the n × n path fid_report takes
        theirs = float(_compute_fid(*(torch.from_numpy(v) for v in args)))
        ttur = ttur_fid(*args)

        assert ours > 0.5
        assert abs(from_features - ours) <= FID_PATHS_RTOL * ours, (x, y, from_features, ours)
        assert abs(ours - theirs) <= FID_RANK_DEFICIENT_RTOL * ours, (x, y, ours, theirs)
        assert abs(ours - ttur) <= FID_RANK_DEFICIENT_RTOL * ours, (x, y, ours, ttur)
