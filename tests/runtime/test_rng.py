"""Tests for the counter-based noise definition (ddpm_deploy.runtime.rng)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ddpm_deploy.runtime import rng
from ddpm_deploy.runtime.errors import ConfigError

# Published Philox4x32-10 known answers: (counter c0..c3, key k0..k1, expected output w0..w3), hex words.
#
# The first three are the philox4x32 10 lines of Random123's tests/kat_vectors, as quoted in
# johnsalmon/cpp-counter-based-engine, tests.cpp ("Known-answer tests from the original Random123
# distribution"; commit 0753d52aa01f5a3aca56d3f275177dbdb8588e34):
#   dokat<philox4x32_prf<10>, 2>("00000000 ... 00000000   6627e8d5 e169c58d bc57ac4c 9b00dbd8") etc.
# The others are philox4x32 10 lines of girving/random123-manual, examples/kat_vectors
# (commit 61e8479252c42f0f8c0490dec55237d7c01bf509), which exercise single key/counter bits.
PHILOX4X32_10_KAT = [
    # zero counter, zero key
    ("00000000 00000000 00000000 00000000", "00000000 00000000", "6627e8d5 e169c58d bc57ac4c 9b00dbd8"),
    # all ones
    ("ffffffff ffffffff ffffffff ffffffff", "ffffffff ffffffff", "408f276d 41c83b0e a20bc7c6 6d5451fd"),
    # digits of pi
    ("243f6a88 85a308d3 13198a2e 03707344", "a4093822 299f31d0", "d16cfe09 94fdcceb 5001e420 24126ea1"),
    # girving/random123-manual examples/kat_vectors
    ("00000001 00000000 00000000 00000000", "00000001 00000000", "ac08141b dfc5ccbe 79c07a47 a7f66093"),
    ("00000000 00000000 00000000 80000000", "00000000 00000001", "0436a39b 31be9efa 6abd0c76 e7a68f83"),
    ("243f6a88 85a308d3 13198a2e 03707344", "00000000 80000000", "63675d2c 422d7c4d 3145d30d 3bce33a4"),
    ("a4093822 299f31d0 082efa98 ec4e6c89", "00000000 ffffffff", "9fcce05d 837d3f3c 5cdf3e61 db2544c0"),
]

SHAPE = (3, 8, 8)


def _words(hex_words: str) -> list[int]:
    return [int(h, 16) for h in hex_words.split()]


def _phi(x: np.ndarray) -> np.ndarray:
    """Standard normal CDF, from math.erf (no scipy)."""
    return np.array([0.5 * (1.0 + math.erf(v / math.sqrt(2.0))) for v in x])


# ------------------------------------------------------------------------------------------- Philox KAT


@pytest.mark.parametrize("counter, key, expected", PHILOX4X32_10_KAT)
def test_philox_known_answer(counter, key, expected):
    # setup
    ctr = np.array(_words(counter), dtype=np.uint32)
    k = tuple(_words(key))
    # execute
    out = rng.philox4x32_10(ctr, k)
    # assert
    assert out.dtype == np.uint32
    assert out.tolist() == _words(expected)


def test_philox_vectorised_matches_kat_rows():
    # setup: all KAT rows as one batch, key as an array [N, 2]
    ctr = np.array([_words(c) for c, _, _ in PHILOX4X32_10_KAT], dtype=np.uint32)
    key = np.array([_words(k) for _, k, _ in PHILOX4X32_10_KAT], dtype=np.uint32)
    expected = np.array([_words(e) for _, _, e in PHILOX4X32_10_KAT], dtype=np.uint32)
    # execute
    out = rng.philox4x32_10(ctr, key)
    # assert
    assert out.shape == (len(PHILOX4X32_10_KAT), 4)
    np.testing.assert_array_equal(out, expected)


def test_philox_rejects_bad_shapes_and_values():
    # setup / execute / assert
    with pytest.raises(ConfigError, match=r"counter must have shape \[\.\.\., 4\]"):
        rng.philox4x32_10(np.zeros(3, dtype=np.uint32), (0, 0))
    with pytest.raises(ConfigError, match=r"key must have shape \[\.\.\., 2\]"):
        rng.philox4x32_10(np.zeros(4, dtype=np.uint32), (0, 0, 0))
    with pytest.raises(ConfigError, match=r"\[0, 2\*\*32\)"):
        rng.philox4x32_10(np.array([0, 0, 0, 2**32]), (0, 0))
    with pytest.raises(ConfigError, match="integers"):
        rng.philox4x32_10(np.zeros(4, dtype=np.float32), (0, 0))


# ------------------------------------------------------------------------------------------- contract


def test_key_from_seed_splits_low_and_high_words():
    # setup
    seed = 0x0123456789ABCDEF
    # execute
    key = rng.key_from_seed(seed)
    # assert
    assert key == (0x89ABCDEF, 0x01234567)
    assert rng.key_from_seed(2**64 - 1) == (0xFFFFFFFF, 0xFFFFFFFF)


def test_uniform_words_use_counter_block_step_sample_zero():
    # setup
    seed, step, indices, n = 2**40 + 77, 123, [5, 0, 2**32 - 1], 10  # 3 blocks, 2 surplus words
    key = rng.key_from_seed(seed)
    # execute
    words = rng.uniform_words(seed, indices, step, n)
    # assert
    assert words.dtype == np.uint32 and words.shape == (3, 12)
    for row, i in enumerate(indices):
        for b in range(3):
            expected = rng.philox4x32_10(np.array([b, step, i, 0], dtype=np.uint32), key)
            np.testing.assert_array_equal(words[row, 4 * b : 4 * b + 4], expected)


def test_normals_follow_words_in_c_order_and_drop_surplus():
    # setup: 3*5*7 = 105 elements -> 27 blocks, 3 normals dropped
    seed, step, shape = 9, 17, (3, 5, 7)
    words = rng.uniform_words(seed, [4, 1], step, 105)
    # execute
    z = rng.normals(seed, [4, 1], step, shape)
    # assert
    assert z.dtype == np.float32 and z.shape == (2, *shape)
    np.testing.assert_array_equal(z.reshape(2, -1), rng.box_muller(words)[:, :105])
    longer = rng.normals(seed, [4, 1], step, (108,))
    np.testing.assert_array_equal(z.reshape(2, -1), longer[:, :105])


def test_box_muller_matches_independent_float64_computation():
    # setup: a few elements, recomputed from the words with Python's math module
    seed, step, n = 31337, 500, 64
    words = rng.uniform_words(seed, [3], step, n)[0].tolist()
    expected = []
    for b in range(n // 4):
        for wa, wb in ((words[4 * b], words[4 * b + 1]), (words[4 * b + 2], words[4 * b + 3])):
            u1 = (wa + 1.0) / 4294967296.0
            u2 = wb / 4294967296.0
            r = math.sqrt(-2.0 * math.log(u1))
            expected += [r * math.cos(2.0 * math.pi * u2), r * math.sin(2.0 * math.pi * u2)]
    expected32 = np.array(expected, dtype=np.float32)
    # execute
    z = rng.normals(seed, [3], step, (n,))[0]
    # assert: one float32 rounding of float64 values; allow one float32 ulp for libm differences
    ulp = np.spacing(np.abs(expected32))
    assert np.all(np.abs(z - expected32) <= ulp), np.max(np.abs(z - expected32) / ulp)
    assert np.mean(z == expected32) > 0.9


def test_box_muller_edge_words():
    # setup: w0 = 0xFFFFFFFF gives u1 = 1 exactly (r = 0); w0 = 0 gives the largest radius
    words = np.array([[0xFFFFFFFF, 12345, 0, 0]], dtype=np.uint32)
    # execute
    z = rng.box_muller(words)
    # assert
    assert z[0, 0] == 0.0 and z[0, 1] == 0.0
    r_max = math.sqrt(-2.0 * math.log(2.0**-32))  # ~6.66
    assert z[0, 2] == np.float32(r_max) and z[0, 3] == 0.0


# ------------------------------------------------------------------------------------------- independence


def test_sample_is_identical_alone_or_in_a_batch():
    # setup
    seed, step = 1234, 999
    batch = rng.normals(seed, np.arange(7), step, SHAPE)
    # execute
    alone = [rng.normals(seed, [i], step, SHAPE)[0] for i in range(7)]
    # assert
    for i in range(7):
        np.testing.assert_array_equal(batch[i], alone[i])


def test_sharded_and_permuted_indices_give_the_same_samples():
    # setup
    seed, step = 2**63 + 5, 0
    full = rng.normals(seed, np.arange(10), step, SHAPE)
    # execute
    shards = [rng.normals(seed, np.arange(s, e), step, SHAPE) for s, e in ((0, 3), (3, 4), (4, 10))]
    perm = np.array([9, 2, 7, 0])
    permuted = rng.normals(seed, perm, step, SHAPE)
    as_list = rng.normals(seed, [int(i) for i in perm], step, SHAPE)
    # assert
    np.testing.assert_array_equal(np.concatenate(shards), full)
    np.testing.assert_array_equal(permuted, full[perm])
    np.testing.assert_array_equal(as_list, permuted)


def test_chunking_does_not_change_the_noise(monkeypatch):
    # setup
    seed, step, shape = 77, 3, (3, 9, 9)  # 243 elements -> 61 blocks
    reference = rng.normals(seed, np.arange(5), step, shape)
    ref_words = rng.uniform_words(seed, np.arange(5), step, 243)
    monkeypatch.setattr(rng, "_CHUNK_BLOCKS", 7)  # splits both samples and blocks
    # execute
    chunked = rng.normals(seed, np.arange(5), step, shape)
    chunked_words = rng.uniform_words(seed, np.arange(5), step, 243)
    # assert
    np.testing.assert_array_equal(chunked, reference)
    np.testing.assert_array_equal(chunked_words, ref_words)


def test_steps_seeds_and_samples_give_different_noise():
    # setup: 3072 elements, so a correlation's standard error is ~0.018
    shape = (3, 32, 32)
    base = rng.normals(1, [0], 0, shape)
    # execute
    variants = {
        "step 1": rng.normals(1, [0], 1, shape),
        "INITIAL_STEP": rng.normals(1, [0], rng.INITIAL_STEP, shape),
        "seed 2": rng.normals(2, [0], 0, shape),
        "seed high word": rng.normals(1 + 2**32, [0], 0, shape),
        "sample 1": rng.normals(1, [1], 0, shape),
    }
    # assert
    assert rng.INITIAL_STEP == 0xFFFFFFFF
    for name, z in variants.items():
        assert np.mean(z == base) < 0.01, name
        assert abs(np.corrcoef(z.ravel(), base.ravel())[0, 1]) < 0.1, name


def test_deterministic_across_calls():
    # setup / execute
    a = rng.normals(42, [0, 1, 2], 10, SHAPE)
    b = rng.normals(42, np.array([0, 1, 2], dtype=np.uint32), 10, SHAPE)
    # assert
    np.testing.assert_array_equal(a, b)


def test_empty_inputs():
    # setup / execute
    no_samples = rng.normals(0, [], 0, SHAPE)
    no_elements = rng.normals(0, [0, 1], 0, (0, 4))
    no_words = rng.uniform_words(0, [0], 0, 0)
    # assert
    assert no_samples.shape == (0, *SHAPE) and no_samples.dtype == np.float32
    assert no_elements.shape == (2, 0, 4)
    assert no_words.shape == (1, 0) and no_words.dtype == np.uint32


# ------------------------------------------------------------------------------------------- statistics


@pytest.fixture(scope="module")
def million_normals() -> np.ndarray:
    return rng.normals(20240601, np.arange(100), 250, (10_000,))  # 1e6 normals


def test_moments(million_normals):
    # setup
    z = million_normals.astype(np.float64).ravel()
    # execute
    mean, std = z.mean(), z.std()
    kurtosis = np.mean((z - mean) ** 4) / std**4
    # assert
    assert np.all(np.isfinite(z))
    assert abs(mean) < 5e-3
    assert abs(std - 1.0) < 5e-3
    assert abs(kurtosis - 3.0) < 0.03
    for lane in range(4):  # each Box-Muller output (cos/sin of both pairs) is standard normal too
        zl = million_normals.reshape(100, -1, 4)[..., lane].ravel()
        assert abs(zl.mean()) < 1e-2 and abs(zl.std() - 1.0) < 1e-2, lane


def test_kolmogorov_smirnov(million_normals):
    # setup
    z = np.sort(million_normals.astype(np.float64).ravel())
    grid = np.linspace(-5.0, 5.0, 2001)
    # execute: sup |F_n - Phi| over a fine grid
    empirical = np.searchsorted(z, grid, side="right") / z.size
    d = np.max(np.abs(empirical - _phi(grid)))
    # assert: 1.95 / sqrt(n) is the 0.1% critical value
    assert d < 1.95 / math.sqrt(z.size), d


def test_adjacent_elements_uncorrelated(million_normals):
    # setup
    z = million_normals.astype(np.float64).reshape(100, -1)
    # execute
    lag1 = np.mean(z[:, 1:] * z[:, :-1])  # includes the cos/sin pair sharing a radius
    lag4 = np.mean(z[:, 4:] * z[:, :-4])
    across_samples = np.mean(z[1:] * z[:-1])
    # assert: standard error is 1e-3
    assert abs(lag1) < 5e-3 and abs(lag4) < 5e-3 and abs(across_samples) < 5e-3


# ------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(seed=-1), r"seed must be in \[0, 18446744073709551615\], found -1"),
        (dict(seed=2**64), "seed must be in"),
        (dict(seed=1.5), "seed must be an integer"),
        (dict(seed=True), "seed must be an integer"),
        (dict(step=-1), r"step must be in \[0, 4294967295\], found -1"),
        (dict(step=2**32), "step must be in"),
        (dict(step="7"), "step must be an integer"),
        (dict(sample_indices=[0, -1]), r"sample indices must be in \[0, 2\*\*32 - 1\]"),
        (dict(sample_indices=[2**32]), r"sample indices must be in \[0, 2\*\*32 - 1\]"),
        (dict(sample_indices=[0.0, 1.0]), "sample_indices must be integers"),
        (dict(sample_indices=3), "1-D sequence"),
        (dict(sample_indices=[[0, 1]]), "1-D sequence"),
        (dict(shape_per_sample=(3, -1)), "shape_per_sample entry must be in"),
        (dict(shape_per_sample=(3, 2.0)), "shape_per_sample entry must be an integer"),
        (dict(shape_per_sample="abc"), "shape_per_sample entry must be an integer"),
        (dict(shape_per_sample=None), "shape_per_sample must be a tuple"),
    ],
)
def test_normals_validates_inputs(kwargs, message):
    # setup
    args = dict(seed=0, sample_indices=[0, 1], step=0, shape_per_sample=SHAPE)
    args.update(kwargs)
    # execute / assert
    with pytest.raises(ConfigError, match=message):
        rng.normals(**args)


def test_uniform_words_validates_inputs():
    # setup / execute / assert
    with pytest.raises(ConfigError, match="n_elements must be in"):
        rng.uniform_words(0, [0], 0, -4)
    with pytest.raises(ConfigError, match="seed must be in"):
        rng.uniform_words(2**64, [0], 0, 4)
    with pytest.raises(ConfigError, match="at most"):
        rng.uniform_words(0, [0], 0, 2**34 + 1)


def test_normals_steps_equals_per_step_normals_bitwise():
    from ddpm_deploy.runtime.rng import INITIAL_STEP, normals, normals_steps

    steps = [999, 998, 500, 1, INITIAL_STEP]
    idx = [3, 0, 17]
    many = normals_steps(5, idx, steps, (3, 5, 7))  # 105 elements: a partial last block
    assert many.shape == (5, 3, 3, 5, 7)
    for k, s in enumerate(steps):
        np.testing.assert_array_equal(many[k], normals(5, idx, s, (3, 5, 7)))
