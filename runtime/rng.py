"""Counter-based noise for the sampler: Philox4x32-10 words turned into normals by Box–Muller.

This module is the reference definition. The CUDA kernel of the device loop reproduces the 32-bit words
bit for bit; everything below is the contract, in the order it is applied.

**Philox4x32-10** (Salmon, Moraes, Dror & Shaw, "Parallel random numbers: as easy as 1, 2, 3", SC 2011;
Random123). State: counter ``c = (c0, c1, c2, c3)`` and key ``k = (k0, k1)``, all uint32. Ten rounds;
between two rounds the key is bumped by the Weyl constants, modulo 2**32::

    M0, M1 = 0xD2511F53, 0xCD9E8D57          # multipliers
    W0, W1 = 0x9E3779B9, 0xBB67AE85          # Weyl key increments
    round:  (hi0, lo0) = mulhilo32(M0, c0)   # 64-bit product, high and low 32-bit halves
            (hi1, lo1) = mulhilo32(M1, c2)
            c = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0)
    rounds 1..10, with k0 += W0, k1 += W1 after each of rounds 1..9

The output is the counter after round 10: four uint32 words ``(w0, w1, w2, w3)``.

**Key**: ``(seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF)`` for a seed in ``[0, 2**64)``.

**Counter** for element block ``b`` of sample ``i`` at step ``s``: ``(c0, c1, c2, c3) = (b, s, i, 0)``.
``s`` is the original timestep ``t`` (0..T-1) of the noise z added at that step (with respacing too: the
kept step's original index), or ``INITIAL_STEP = 0xFFFFFFFF`` for the initial ``x_T``. ``i`` is the
sample's global index (so shards and batches of any size give the same images).

**Elements**: within one sample, elements are numbered in flattened C order (``x[i].reshape(-1)``). Block
``b`` gives the normals of elements ``4b, 4b+1, 4b+2, 4b+3``; the block count is ``ceil(n / 4)`` and the
normals beyond ``n`` are dropped.

**Box–Muller**, in float64, then rounded to float32::

    u1 = (w0 + 1.0) * 2**-32        # in (0, 1], never 0
    u2 = w1 * 2**-32                 # in [0, 1)
    r  = sqrt(-2 * log(u1))
    z0 = r * cos(2*pi * u2)          # element 4b
    z1 = r * sin(2*pi * u2)          # element 4b + 1
    (z2, z3) likewise from (w2, w3)  # elements 4b + 2, 4b + 3

``2*pi`` is the float64 constant ``6.283185307179586``. The words are reproduced bitwise on every backend;
the normals go through libm's float64 ``log``/``cos``/``sin``, whose last bit may differ between
implementations, so a float32 normal from another backend may (rarely) differ by one float32 ulp.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import numpy as np

from .errors import ConfigError

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10

INITIAL_STEP = 0xFFFFFFFF  # the step id of the initial noise x_T
WORDS_PER_BLOCK = 4  # one Philox call -> four words -> four normals
MAX_SEED = 2**64 - 1
MAX_WORD = 2**32 - 1
TWO_PI = 2.0 * math.pi  # 6.283185307179586
_TWO_POW_M32 = 2.0**-32
_MASK32 = np.uint64(0xFFFFFFFF)
_SHIFT32 = np.uint64(32)
# Work is done in chunks of at most this many Philox blocks, to bound the float64/uint64 temporaries.
_CHUNK_BLOCKS = 1 << 15

__all__ = [
    "INITIAL_STEP",
    "PHILOX_M0",
    "PHILOX_M1",
    "PHILOX_ROUNDS",
    "PHILOX_W0",
    "PHILOX_W1",
    "box_muller",
    "key_from_seed",
    "normals",
    "normals_steps",
    "philox4x32_10",
    "uniform_words",
]


# ----------------------------------------------------------------------------------------------- Philox


def _philox_rounds(c0, c1, c2, c3, k0: int, k1: int) -> tuple[np.ndarray, ...]:
    """Ten Philox rounds on uint64 arrays holding 32-bit words (broadcastable); key words as Python ints
    or uint64 arrays. Returns the four output words as uint64 arrays of the broadcast shape."""
    m0 = np.uint64(PHILOX_M0)
    m1 = np.uint64(PHILOX_M1)
    for r in range(PHILOX_ROUNDS):
        if r:
            k0 = (k0 + PHILOX_W0) & MAX_WORD
            k1 = (k1 + PHILOX_W1) & MAX_WORD
        p0 = c0 * m0  # < 2**64: the exact 64-bit product of two 32-bit words
        p1 = c2 * m1
        new_c0 = (p1 >> _SHIFT32) ^ c1 ^ k0
        new_c2 = (p0 >> _SHIFT32) ^ c3 ^ k1
        c1 = p1 & _MASK32
        c3 = p0 & _MASK32
        c0, c2 = new_c0, new_c2
    return c0, c1, c2, c3


def _as_words(x, name: str, width: int) -> np.ndarray:
    """An integer array [..., width] with values in [0, 2**32), as uint64."""
    try:
        arr = np.asarray(x)
    except (OverflowError, ValueError) as e:
        raise ConfigError(f"{name} must be uint32 words [..., {width}], found {x!r} ({e})") from None
    if arr.ndim == 0 or arr.shape[-1] != width:
        raise ConfigError(f"{name} must have shape [..., {width}] (uint32 words), found shape {arr.shape}")
    if arr.size and arr.dtype.kind not in "iu":
        raise ConfigError(f"{name} must hold integers (uint32 words), found dtype {arr.dtype}")
    if arr.size and arr.dtype != np.uint32 and (int(arr.min()) < 0 or int(arr.max()) > MAX_WORD):
        raise ConfigError(
            f"{name} words must be in [0, 2**32), found range [{int(arr.min())}, {int(arr.max())}]"
        )
    return arr.astype(np.uint64)


def philox4x32_10(counter, key) -> np.ndarray:
    """Philox4x32-10 of ``counter`` [..., 4] under ``key`` [..., 2] (or a ``(k0, k1)`` tuple).

    Both are uint32 words (any integer dtype with values in [0, 2**32) is accepted); they broadcast against
    each other over the leading axes. Returns uint32 [..., 4].
    """
    c = _as_words(counter, "counter", 4)
    k = _as_words(key, "key", 2)
    out = _philox_rounds(c[..., 0], c[..., 1], c[..., 2], c[..., 3], k[..., 0], k[..., 1])
    return np.stack(out, axis=-1).astype(np.uint32)


# ----------------------------------------------------------------------------------------------- inputs


def _check_int(value, name: str, lo: int, hi: int) -> int:
    try:
        if isinstance(value, bool):
            raise TypeError
        v = operator.index(value)
    except TypeError:
        raise ConfigError(f"{name} must be an integer in [{lo}, {hi}], found {value!r}") from None
    if not lo <= v <= hi:
        raise ConfigError(f"{name} must be in [{lo}, {hi}], found {v}")
    return v


def key_from_seed(seed: int) -> tuple[int, int]:
    """The Philox key (k0, k1) of a seed in [0, 2**64): its low and high 32-bit halves."""
    s = _check_int(seed, "seed", 0, MAX_SEED)
    return s & MAX_WORD, (s >> 32) & MAX_WORD


def _check_indices(sample_indices) -> np.ndarray:
    arr = np.asarray(sample_indices)
    if arr.ndim != 1:
        raise ConfigError(
            f"sample_indices must be a 1-D sequence of sample indices, found shape {arr.shape}; "
            "pass [i] for a single sample"
        )
    if arr.size == 0:
        return np.zeros(0, dtype=np.uint64)
    if arr.dtype.kind not in "iu":
        raise ConfigError(f"sample_indices must be integers, found dtype {arr.dtype}")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi > MAX_WORD:
        raise ConfigError(f"sample indices must be in [0, 2**32 - 1], found range [{lo}, {hi}]")
    return arr.astype(np.uint64)


def _check_shape(shape_per_sample) -> tuple[int, ...]:
    if isinstance(shape_per_sample, int | np.integer):
        shape_per_sample = (shape_per_sample,)
    if not isinstance(shape_per_sample, Sequence | np.ndarray):
        raise ConfigError(f"shape_per_sample must be a tuple of non-negative ints, found {shape_per_sample!r}")
    dims = tuple(_check_int(d, "shape_per_sample entry", 0, 2**62) for d in shape_per_sample)
    return dims


def _n_blocks(n_elements: int) -> int:
    n_blocks = -(-n_elements // WORDS_PER_BLOCK)
    if n_blocks > MAX_WORD + 1:
        raise ConfigError(
            f"at most {(MAX_WORD + 1) * WORDS_PER_BLOCK} elements per sample (2**32 Philox blocks), "
            f"found {n_elements}"
        )
    return n_blocks


# ----------------------------------------------------------------------------------------------- words


def _chunks(n_samples: int, n_blocks: int):
    """(sample slice, block slice) pairs covering [n_samples, n_blocks] in chunks of <= _CHUNK_BLOCKS."""
    cols = max(1, min(n_blocks, _CHUNK_BLOCKS))
    rows = max(1, _CHUNK_BLOCKS // cols)
    for s0 in range(0, n_samples, rows):
        for b0 in range(0, n_blocks, cols):
            yield slice(s0, min(s0 + rows, n_samples)), slice(b0, min(b0 + cols, n_blocks))


def _block_words(key: tuple[int, int], idx: np.ndarray, step: int, b: slice) -> tuple[np.ndarray, ...]:
    """The four words of blocks b of samples idx: each uint64 [len(idx), len(b)]."""
    c0 = np.arange(b.start, b.stop, dtype=np.uint64)[None, :]
    c2 = idx[:, None]
    w = _philox_rounds(c0, np.uint64(step), c2, np.uint64(0), key[0], key[1])
    shape = (idx.shape[0], b.stop - b.start)
    return tuple(np.broadcast_to(x, shape) for x in w)


def uniform_words(seed: int, sample_indices, step: int, n_elements: int) -> np.ndarray:
    """The raw Philox words behind ``normals``: uint32 [B, ceil(n_elements / 4) * 4].

    Row j holds, for sample ``sample_indices[j]``, the words (w0, w1, w2, w3) of blocks 0, 1, 2, ... in
    order; this is what the CUDA kernel must reproduce bit for bit.
    """
    key = key_from_seed(seed)
    step = _check_int(step, "step", 0, MAX_WORD)
    idx = _check_indices(sample_indices)
    n_elements = _check_int(n_elements, "n_elements", 0, 2**62)
    nb = _n_blocks(n_elements)
    out = np.empty((idx.shape[0], nb, WORDS_PER_BLOCK), dtype=np.uint32)
    for rows, b in _chunks(idx.shape[0], nb):
        for j, w in enumerate(_block_words(key, idx[rows], step, b)):
            out[rows, b, j] = w
    return out.reshape(idx.shape[0], nb * WORDS_PER_BLOCK)


# ----------------------------------------------------------------------------------------------- normals


def box_muller(words) -> np.ndarray:
    """Normals from Philox words [..., 2m] (pairs (w_even, w_odd)): float32 [..., 2m], by the module's
    Box–Muller definition (float64 arithmetic, one rounding to float32 at the end)."""
    w = np.asarray(words)
    if w.ndim == 0 or w.shape[-1] % 2:
        raise ConfigError(f"box_muller needs words [..., 2m], found shape {w.shape}")
    out = np.empty(w.shape, dtype=np.float32)
    _box_muller_into(w[..., 0::2], w[..., 1::2], out[..., 0::2], out[..., 1::2])
    return out


def _box_muller_into(wa, wb, out_cos, out_sin) -> None:
    u1 = wa.astype(np.float64)
    u1 += 1.0
    u1 *= _TWO_POW_M32
    r = np.log(u1, out=u1)
    r *= -2.0
    np.sqrt(r, out=r)
    theta = wb.astype(np.float64)
    theta *= _TWO_POW_M32  # u2, exact
    theta *= TWO_PI
    out_cos[...] = r * np.cos(theta)
    out_sin[...] = r * np.sin(theta, out=theta)


def normals(seed: int, sample_indices, step: int, shape_per_sample) -> np.ndarray:
    """Standard normal noise float32 [len(sample_indices), *shape_per_sample] for one sampler step.

    ``seed`` in [0, 2**64); ``sample_indices`` the global indices of the samples (each in [0, 2**32));
    ``step`` the original timestep t whose noise this is, or ``INITIAL_STEP`` for x_T. Sample i's noise
    depends only on (seed, i, step, shape): it is bitwise the same in any batch, shard or order.
    """
    key = key_from_seed(seed)
    step = _check_int(step, "step", 0, MAX_WORD)
    idx = _check_indices(sample_indices)
    shape = _check_shape(shape_per_sample)
    n = math.prod(shape)
    nb = _n_blocks(n)
    out = np.empty((idx.shape[0], nb, WORDS_PER_BLOCK), dtype=np.float32)
    for rows, b in _chunks(idx.shape[0], nb):
        w0, w1, w2, w3 = _block_words(key, idx[rows], step, b)
        o = out[rows, b]
        _box_muller_into(w0, w1, o[..., 0], o[..., 1])
        _box_muller_into(w2, w3, o[..., 2], o[..., 3])
    flat = out.reshape(idx.shape[0], nb * WORDS_PER_BLOCK)
    if nb * WORDS_PER_BLOCK != n:
        flat = flat[:, :n]
    return np.ascontiguousarray(flat).reshape((idx.shape[0], *shape))


def normals_steps(seed: int, sample_indices, steps, shape_per_sample) -> np.ndarray:
    """The noise of several steps at once: float32 [len(steps), B, *shape_per_sample], where entry ``[k]`` is
    bitwise ``normals(seed, sample_indices, steps[k], shape_per_sample)``.

    One vectorised pass over all (step, sample) rows: the sampler prefetches noise this way so that small
    batches do not pay NumPy's per-call overhead on every step.
    """
    key = key_from_seed(seed)
    st = np.asarray([_check_int(v, "step", 0, MAX_WORD) for v in steps], dtype=np.uint64)
    idx = _check_indices(sample_indices)
    shape = _check_shape(shape_per_sample)
    n = math.prod(shape)
    nb = _n_blocks(n)
    n_rows = st.shape[0] * idx.shape[0]
    row_step = np.repeat(st, idx.shape[0])[:, None]
    row_idx = np.tile(idx, st.shape[0])[:, None]
    out = np.empty((n_rows, nb, WORDS_PER_BLOCK), dtype=np.float32)
    for rows, b in _chunks(n_rows, nb):
        c0 = np.arange(b.start, b.stop, dtype=np.uint64)[None, :]
        w = _philox_rounds(c0, row_step[rows], row_idx[rows], np.uint64(0), key[0], key[1])
        w0, w1, w2, w3 = (np.broadcast_to(x, (rows.stop - rows.start, b.stop - b.start)) for x in w)
        o = out[rows, b]
        _box_muller_into(w0, w1, o[..., 0], o[..., 1])
        _box_muller_into(w2, w3, o[..., 2], o[..., 3])
    flat = out.reshape(n_rows, nb * WORDS_PER_BLOCK)
    if nb * WORDS_PER_BLOCK != n:
        flat = flat[:, :n]
    return np.ascontiguousarray(flat).reshape((st.shape[0], idx.shape[0], *shape))
