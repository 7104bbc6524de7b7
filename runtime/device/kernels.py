"""The device loop's CUDA kernels: source generated from the reference definitions, compiled with NVRTC.

The Philox constants, the round count, ``INITIAL_STEP`` and the Box–Muller constants are written into the
source from ``runtime.rng``, and the plan table's column offsets from ``runtime.sampling.plan.COLUMNS``, so the
kernel cannot drift from the NumPy reference. The step is ``sampling.rules.linear_step`` with explicitly
rounded float32 operations (``__fmul_rn`` …, never contracted into FMAs) in the same order, and a term skipped
where the image's coefficient is zero (the host skips it where it is zero for the whole batch: the same value).

The same source also compiles as host C++ (no ``__CUDACC_RTC__``): every kernel body is written as a loop
over its threads, which is one thread on the device and all of them on the host. ``tests/hostsim.py`` uses
that to run the device loop on a CPU in the tests.

Per-image state (every array has one entry per slot b of the loop): ``idx`` u32 (sample index), ``keys``
u32[2] (the Philox key of the image's seed), ``plan`` i32 (a plan of the loop's plan table), ``k`` i32 (steps
done), ``active`` i32. The plan table: ``table`` f32[rows, NCOLS], ``timesteps`` i32[rows], ``noise_ids``
u32[rows], ``offsets``/``lengths`` i32[plans]. Kernels (grid x over Philox blocks or samples, 256 threads; grid y
over the batch):

- ``ddpm_philox_words(out u32[B, nb*4], idx, keys, step, nb)``: the raw words (tests).
- ``ddpm_normals(out f32[B, n], idx, keys, mask, step, n, nb)``: N(0, 1) noise of the rows with ``mask[b]``,
  e.g. x_T with ``INITIAL_STEP`` for the images just admitted.
- ``ddpm_prepare(t, row, timesteps, offsets, lengths, plan, k, active, state, B)``: each active image's table
  row and t for the next ε call (row −1 for a free slot or a finished image; state[3] ← 1 if an image is past its
  last step).
- ``ddpm_step(x, eps, hist, xp, table, row, noise_ids, idx, keys, k, state, n, nb, B, H, use_xp)``: one fused
  step of every image with a row: noise, x̂0, x_next, the x̂0 history shift, UniPC's corrected sample.
- ``ddpm_advance(k, row, B)``: k[b] += 1 for each image that stepped.

``hist`` is f32[B, HMAX, n] (m1, m2, m3 of each image; H ≤ HMAX of them in use), ``xp`` f32[B, n].
``state`` is int32[4]: [0] unused, [1] unused, [2] the earliest step k (0-based, per image) that produced a
non-finite value (INT_MAX: none), [3] 1 if a kernel found an image past its last step.
"""

from __future__ import annotations

import importlib
import logging
import time
from dataclasses import dataclass, field

from .. import rng
from ..sampling.plan import COLUMNS, MAX_HISTORY
from ..errors import DDPMError, MissingDependencyError

log = logging.getLogger(__name__)

THREADS = 256  # threads per block of every kernel
STATE_WORDS = 4
NO_BAD_STEP = 2**31 - 1  # state[2] when no step produced a non-finite value
ENTRY_POINTS = ("ddpm_philox_words", "ddpm_normals", "ddpm_prepare", "ddpm_step", "ddpm_advance")
# Argument kinds of each kernel, in order: "ptr" (device pointer), "u32", "i32". Used to pack launches.
SIGNATURES: dict[str, tuple[str, ...]] = {
    "ddpm_philox_words": ("ptr", "ptr", "ptr", "u32", "u32"),
    "ddpm_normals": ("ptr", "ptr", "ptr", "ptr", "u32", "u32", "u32"),
    "ddpm_prepare": ("ptr",) * 9 + ("i32",),
    "ddpm_step": ("ptr",) * 11 + ("u32", "u32", "i32", "i32", "i32"),
    "ddpm_advance": ("ptr", "ptr", "i32"),
}
NVRTC_OPTIONS = ("--std=c++17", "--fmad=false", "--extra-device-vectorization")
INSTALL_GPU = "pip install cuda-python==13.4.4 nvidia-cuda-nvrtc==13.4.92"


class KernelCompileError(DDPMError):
    """NVRTC could not compile the kernels (or is missing / too old for the GPU)."""


_PRELUDE = r"""
#ifdef __CUDACC_RTC__
#define DDPM_HD __device__ __forceinline__
#define DDPM_KERNEL extern "C" __global__ void
#define DDPM_THREADS { const unsigned tx = blockIdx.x * blockDim.x + threadIdx.x; const unsigned ty = blockIdx.y; {
#define DDPM_END_THREADS } }
#define DDPM_ISFINITE(v) isfinite(v)
#define DDPM_NAN __int_as_float(0x7fc00000)
#define DDPM_INF __int_as_float(0x7f800000)
#else  /* host C++ build (tests): a kernel body loops over all of its threads */
#include <cmath>
#include <cstddef>
#include <cstdint>
#define DDPM_HD static inline
#define DDPM_KERNEL extern "C" void
extern "C" { unsigned ddpm_grid_x = 1, ddpm_grid_y = 1, ddpm_block_x = 1; }
#define DDPM_THREADS for (unsigned ty = 0; ty < ddpm_grid_y; ++ty) for (unsigned tx = 0; tx < ddpm_grid_x * ddpm_block_x; ++tx) {
#define DDPM_END_THREADS }
#define DDPM_ISFINITE(v) std::isfinite(v)
#define DDPM_NAN NAN
#define DDPM_INF INFINITY
static inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((uint64_t)a * b) >> 32); }
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fsub_rn(float a, float b) { return a - b; }
static inline double __dmul_rn(double a, double b) { return a * b; }
static inline double __dadd_rn(double a, double b) { return a + b; }
static inline float __double2float_rn(double a) { return (float)a; }
static inline int atomicMin(int* p, int v) { int old = *p; if (v < old) *p = v; return old; }
#endif
"""

_BODY = r"""
/* Philox4x32-10 (Salmon et al. 2011), as runtime/rng.py: counter c, key (k0, k1). */
DDPM_HD void philox4x32_10(unsigned c[4], unsigned k0, unsigned k1) {
  for (int r = 0; r < PHILOX_ROUNDS; ++r) {
    if (r) { k0 += PHILOX_W0; k1 += PHILOX_W1; }
    const unsigned hi0 = __umulhi(PHILOX_M0, c[0]), lo0 = PHILOX_M0 * c[0];
    const unsigned hi1 = __umulhi(PHILOX_M1, c[2]), lo1 = PHILOX_M1 * c[2];
    const unsigned n0 = hi1 ^ c[1] ^ k0, n2 = hi0 ^ c[3] ^ k1;
    c[0] = n0; c[1] = lo1; c[2] = n2; c[3] = lo0;
  }
}

/* Box–Muller in double precision, one rounding to float at the end (rng.py's definition). */
DDPM_HD void box_muller(unsigned wa, unsigned wb, float* za, float* zb) {
  const double u1 = __dmul_rn(__dadd_rn((double)wa, 1.0), TWO_POW_M32);
  const double r = sqrt(__dmul_rn(log(u1), -2.0));
  const double theta = __dmul_rn(__dmul_rn((double)wb, TWO_POW_M32), TWO_PI);
  *za = __double2float_rn(__dmul_rn(r, cos(theta)));
  *zb = __double2float_rn(__dmul_rn(r, sin(theta)));
}

/* The four normals of Philox block `blk` of sample `index` at step `step`. */
DDPM_HD void block_normals(unsigned blk, unsigned step, unsigned index, const unsigned* key, float z[4]) {
  unsigned c[4] = {blk, step, index, 0u};
  philox4x32_10(c, key[0], key[1]);
  box_muller(c[0], c[1], &z[0], &z[1]);
  box_muller(c[2], c[3], &z[2], &z[3]);
}

DDPM_KERNEL ddpm_philox_words(unsigned* out, const unsigned* idx, const unsigned* keys, unsigned step,
                              unsigned nblocks) {
  DDPM_THREADS
  if (tx < nblocks) {
    unsigned c[4] = {tx, step, idx[ty], 0u};
    philox4x32_10(c, keys[2 * ty], keys[2 * ty + 1]);
    unsigned* o = out + ((size_t)ty * nblocks + tx) * 4;
    o[0] = c[0]; o[1] = c[1]; o[2] = c[2]; o[3] = c[3];
  }
  DDPM_END_THREADS
}

DDPM_KERNEL ddpm_normals(float* out, const unsigned* idx, const unsigned* keys, const int* mask, unsigned step,
                         unsigned n, unsigned nblocks) {
  DDPM_THREADS
  if (tx < nblocks && mask[ty]) {
    float z[4];
    block_normals(tx, step, idx[ty], keys + 2 * ty, z);
    for (unsigned j = 0; j < 4; ++j) {
      const unsigned e = 4 * tx + j;
      if (e < n) out[(size_t)ty * n + e] = z[j];
    }
  }
  DDPM_END_THREADS
}

DDPM_KERNEL ddpm_prepare(int* t, int* row, const int* timesteps, const int* offsets, const int* lengths,
                         const int* plan, const int* k, const int* active, int* state, int batch) {
  DDPM_THREADS
  if (ty == 0 && tx < (unsigned)batch) {
    int r = -1;
    if (active[tx]) {
      const int p = plan[tx], kk = k[tx];
      if (kk < 0 || kk > lengths[p]) state[3] = 1;
      else if (kk < lengths[p]) r = offsets[p] + kk;  /* k == length: done, waiting to be taken */
    }
    row[tx] = r;
    if (r >= 0) t[tx] = timesteps[r];
  }
  DDPM_END_THREADS
}

/* One step of sampling.rules.linear_step for image ty, elements 4*tx .. 4*tx+3. */
DDPM_KERNEL ddpm_step(float* x, const float* eps, float* hist, float* xp, const float* table, const int* row,
                      const unsigned* noise_ids, const unsigned* idx, const unsigned* keys, const int* k, int* state,
                      unsigned n, unsigned nblocks, int batch, int H, int use_xp) {
  DDPM_THREADS
  if (tx < nblocks && ty < (unsigned)batch && row[ty] >= 0) {
    const float* c = table + (size_t)row[ty] * NCOLS;
    float z[4] = {0.f, 0.f, 0.f, 0.f};
    if (c[COL_Z] != 0.f) block_normals(tx, noise_ids[row[ty]], idx[ty], keys + 2 * ty, z);
    bool bad = false;
    for (unsigned j = 0; j < 4; ++j) {
      const unsigned e = 4 * tx + j;
      if (e >= n) break;
      const size_t off = (size_t)ty * n + e;
      const float xv = x[off], ev = eps[off];
      float m[4] = {0.f, 0.f, 0.f, 0.f};  /* m0 (this step's x̂0), m1..m3 */
      float* hv = hist + ((size_t)ty * HMAX) * n + e;  /* this element's history, [HMAX] with stride n */
      for (int h = 0; h < H; ++h) m[h + 1] = hv[(size_t)h * n];
      m[0] = __fsub_rn(__fmul_rn(c[COL_A], xv), __fmul_rn(c[COL_B], ev));  /* eq. 15 */
      const float cl = c[COL_CLIP];
      if (cl < DDPM_INF) m[0] = m[0] < -cl ? -cl : (m[0] > cl ? cl : m[0]);   /* NaN passes, as np.clip */
      const float pv = use_xp ? xp[off] : 0.f;
      float out = __fadd_rn(__fmul_rn(c[COL_M0], m[0]), __fmul_rn(c[COL_X], xv));
      if (c[COL_EPS] != 0.f) out = __fadd_rn(out, __fmul_rn(c[COL_EPS], ev));
      if (c[COL_M1] != 0.f) out = __fadd_rn(out, __fmul_rn(c[COL_M1], m[1]));
      if (c[COL_M2] != 0.f) out = __fadd_rn(out, __fmul_rn(c[COL_M2], m[2]));
      if (c[COL_M3] != 0.f) out = __fadd_rn(out, __fmul_rn(c[COL_M3], m[3]));
      if (c[COL_XP] != 0.f) out = __fadd_rn(out, __fmul_rn(c[COL_XP], pv));
      if (c[COL_Z] != 0.f) out = __fadd_rn(out, __fmul_rn(c[COL_Z], z[j]));
      if (use_xp) {
        float q = 0.f;
        if (c[COL_XP_X] != 0.f) q = __fadd_rn(q, __fmul_rn(c[COL_XP_X], xv));
        if (c[COL_XP_XP] != 0.f) q = __fadd_rn(q, __fmul_rn(c[COL_XP_XP], pv));
        if (c[COL_XP_M0] != 0.f) q = __fadd_rn(q, __fmul_rn(c[COL_XP_M0], m[0]));
        if (c[COL_XP_M1] != 0.f) q = __fadd_rn(q, __fmul_rn(c[COL_XP_M1], m[1]));
        if (c[COL_XP_M2] != 0.f) q = __fadd_rn(q, __fmul_rn(c[COL_XP_M2], m[2]));
        if (c[COL_XP_M3] != 0.f) q = __fadd_rn(q, __fmul_rn(c[COL_XP_M3], m[3]));
        xp[off] = q;
      }
      for (int h = H - 1; h > 0; --h) hv[(size_t)h * n] = m[h];
      if (H > 0) hv[0] = m[0];
      x[off] = out;
      bad = bad || !DDPM_ISFINITE(out) || !DDPM_ISFINITE(ev);  /* ε: clipping would hide it */
    }
    if (bad) atomicMin(&state[2], k[ty]);
  }
  DDPM_END_THREADS
}

DDPM_KERNEL ddpm_advance(int* k, const int* row, int batch) {
  DDPM_THREADS
  if (ty == 0 && tx < (unsigned)batch && row[tx] >= 0) k[tx] += 1;
  DDPM_END_THREADS
}
"""


def _constants() -> str:
    """``#define``s of every constant the kernels share with runtime.rng (exact: hex literals) and of the plan
    table's layout (``sampling.plan.COLUMNS``)."""
    lines = [
        f"#define PHILOX_M0 0x{rng.PHILOX_M0:08X}u",
        f"#define PHILOX_M1 0x{rng.PHILOX_M1:08X}u",
        f"#define PHILOX_W0 0x{rng.PHILOX_W0:08X}u",
        f"#define PHILOX_W1 0x{rng.PHILOX_W1:08X}u",
        f"#define PHILOX_ROUNDS {rng.PHILOX_ROUNDS}",
        f"#define INITIAL_STEP 0x{rng.INITIAL_STEP:08X}u",
        f"#define TWO_PI {float.hex(rng.TWO_PI)}",  # 6.283185307179586, bit for bit
        f"#define TWO_POW_M32 {float.hex(2.0 ** -32)}",
        f"#define NCOLS {len(COLUMNS)}",
        f"#define HMAX {MAX_HISTORY}",
        *(f"#define COL_{name.upper()} {i}" for i, name in enumerate(COLUMNS)),
    ]
    return "\n".join(lines) + "\n"


def kernel_source() -> str:
    """The complete CUDA C++ source of the device loop's kernels."""
    return "/* generated by ddpm_deploy.runtime.device.kernels */\n" + _constants() + _PRELUDE + _BODY


# --------------------------------------------------------------------------------------------- NVRTC


@dataclass
class CompiledKernels:
    """NVRTC output: PTX always; CUBIN when compiled for a real architecture (``sm_XY``)."""

    target: str  # "sm_90" (CUBIN + PTX) or "compute_90" (PTX only, JIT-compiled by the driver)
    ptx: bytes
    cubin: bytes | None
    log: str
    seconds: float
    nvrtc_version: tuple[int, int]
    options: tuple[str, ...] = field(default_factory=tuple)

    @property
    def image(self) -> bytes:
        """What ``cuModuleLoadData`` gets: the CUBIN, or the NUL-terminated PTX."""
        return self.cubin if self.cubin is not None else self.ptx + b"\0"


def _nvrtc():
    try:
        nvrtc = importlib.import_module("cuda.bindings.nvrtc")
    except ImportError:
        raise MissingDependencyError("cuda-python", "Compiling the GPU kernels (NVRTC)", INSTALL_GPU) from None
    return nvrtc


def _check(nvrtc, call: str, result):
    err, *rest = result
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        try:
            msg = nvrtc.nvrtcGetErrorString(err)[1].decode()
        except Exception:  # pragma: no cover - error string lookup itself failed
            msg = str(err)
        raise KernelCompileError(f"{call} failed: {msg}")
    return rest[0] if len(rest) == 1 else tuple(rest)


def _load_nvrtc():
    """The nvrtc binding with its library loaded; KernelCompileError naming the wheel if libnvrtc is missing."""
    nvrtc = _nvrtc()
    try:
        major, minor = _check(nvrtc, "nvrtcVersion", nvrtc.nvrtcVersion())
    except KernelCompileError:
        raise
    except Exception as e:  # cuda.pathfinder's DynamicLibNotFoundError (a RuntimeError) and friends
        raise KernelCompileError(
            f"the NVRTC library (libnvrtc.so.13) could not be loaded ({str(e).splitlines()[0]}); install the "
            f"NVRTC wheel: {INSTALL_GPU}. cuda-python looks in site-packages, LD_LIBRARY_PATH and CUDA_HOME, not in "
            f"PYTHONPATH: a wheel installed with pip --target needs its nvidia/cu13/lib folder on LD_LIBRARY_PATH"
        ) from None
    return nvrtc, (int(major), int(minor))


def nvrtc_version() -> tuple[int, int]:
    """(major, minor) of the loaded NVRTC library."""
    return _load_nvrtc()[1]


def supported_archs() -> list[int]:
    """The ``sm_XY`` targets this NVRTC can compile for, as integers XY (e.g. [75, 80, ..., 120])."""
    nvrtc, _ = _load_nvrtc()
    return [int(a) for a in _check(nvrtc, "nvrtcGetSupportedArchs", nvrtc.nvrtcGetSupportedArchs())]


def select_target(cc: tuple[int, int], supported: list[int]) -> str:
    """``sm_XY`` (CUBIN) for a GPU of compute capability ``cc`` if NVRTC supports it; else PTX for the newest
    supported architecture below it (the driver JIT-compiles it); KernelCompileError if the GPU is too old."""
    want = cc[0] * 10 + cc[1]
    if want in supported:
        return f"sm_{want}"
    older = [a for a in supported if a <= want]
    if not older:
        raise KernelCompileError(
            f"this NVRTC compiles for sm_{min(supported)} and newer, the GPU has compute capability "
            f"{cc[0]}.{cc[1]}; use a GPU of compute capability {min(supported) // 10}.{min(supported) % 10} or newer"
        )
    return f"compute_{max(older)}"


def compile_kernels(target: str = "sm_90", source: str | None = None, name: str = "ddpm_kernels.cu") -> CompiledKernels:
    """Compile ``source`` (default: ``kernel_source()``) for ``target`` ("sm_XY" or "compute_XY")."""
    if not (target.startswith("sm_") or target.startswith("compute_")) or not target.split("_", 1)[1].isdigit():
        raise KernelCompileError(f"target must look like 'sm_90' or 'compute_90', found {target!r}")
    nvrtc, version = _load_nvrtc()
    src = (source if source is not None else kernel_source()).encode()
    options = (*NVRTC_OPTIONS, f"--gpu-architecture={target}")
    start = time.perf_counter()
    prog = _check(nvrtc, "nvrtcCreateProgram", nvrtc.nvrtcCreateProgram(src, name.encode(), 0, [], []))
    try:
        opts = [o.encode() for o in options]
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        size = _check(nvrtc, "nvrtcGetProgramLogSize", nvrtc.nvrtcGetProgramLogSize(prog))
        # bytearray, never b" " * size: NVRTC writes into the buffer, and b" " * 1 (an empty log) is CPython's
        # shared one-byte object, which would then read b"\0" everywhere in the process.
        buf = bytearray(size)
        _check(nvrtc, "nvrtcGetProgramLog", nvrtc.nvrtcGetProgramLog(prog, buf))
        compile_log = bytes(buf).rstrip(b"\0").decode(errors="replace").strip()
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise KernelCompileError(
                f"nvrtcCompileProgram failed for {target} (NVRTC {version[0]}.{version[1]}, options "
                f"{' '.join(options)}):\n{compile_log}"
            )
        size = _check(nvrtc, "nvrtcGetPTXSize", nvrtc.nvrtcGetPTXSize(prog))
        ptx = bytearray(size)
        _check(nvrtc, "nvrtcGetPTX", nvrtc.nvrtcGetPTX(prog, ptx))
        cubin = None
        if target.startswith("sm_"):
            size = _check(nvrtc, "nvrtcGetCUBINSize", nvrtc.nvrtcGetCUBINSize(prog))
            cubin_buf = bytearray(size)
            _check(nvrtc, "nvrtcGetCUBIN", nvrtc.nvrtcGetCUBIN(prog, cubin_buf))
            cubin = bytes(cubin_buf)
    finally:
        nvrtc.nvrtcDestroyProgram(prog)
    seconds = time.perf_counter() - start
    if compile_log:
        log.debug("NVRTC log for %s: %s", target, compile_log)
    log.debug("compiled %d kernels for %s in %.2f s", len(ENTRY_POINTS), target, seconds)
    return CompiledKernels(target, bytes(ptx).rstrip(b"\0"), cubin, compile_log, seconds, version, options)
