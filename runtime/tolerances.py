"""Every parity tolerance and quality threshold, in one place (README "Parity" and "FID" list the measured values).

Max-abs unless named otherwise. A comparison that fails reports the largest difference, its index and both
values (see ``compare``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# L0 schedule: our float64 tables vs the paper's formulas in float64 (rounding only).
L0_FLOAT64_RTOL = 1e-12
# L0: β_t of the linear schedule in float64 vs the paper's formula, absolute (the same arithmetic, ≤ a few ulp).
L0_FLOAT64_ATOL = 1e-15
# L0: Π(1 − β') of a respaced schedule vs its ᾱ (each factor undoes the cancellation β' = 1 − ᾱ_t/ᾱ_prev).
L0_RESPACED_CUMPROD_RTOL = 1e-10
# L0 vs diffusers' DDPMScheduler, which builds β in float32 (by design): float32 rounding of ᾱ.
L0_DIFFUSERS_FLOAT32_RTOL = 1e-5
# L1 one step with injected noise vs DDPMScheduler.step (float32 arithmetic on both sides).
L1_STEP_ATOL = 1e-5
# L1 vs diffusers' own float32 DDPMScheduler.step: it re-derives β_t = 1 − ᾱ_t/ᾱ_{t−1} from float32 ᾱ inside
# step(), a cancellation that costs ~3 digits at small t (relative error of β_1 ≈ 5e-4). Measured ≤ 8e-5 per
# unit step magnitude (≤ 3e-4 absolute at t ≤ 5); our step agrees with diffusers' formulas on float64 tables
# within L1_STEP_ATOL.
L1_DIFFUSERS_FLOAT32_ATOL = 1e-3
# L1 golden test (diffusers style): the float32 step vs its closed form in float64 on an arange sample.
L1_STEP_GOLDEN_RTOL, L1_STEP_GOLDEN_ATOL = 1e-5, 1e-6
# L1 per scheduler: our float32 plan rule over a whole trajectory (10–50 steps) vs diffusers' own scheduler class on
# the same ε function and noise, relative to max |x_0| (the schedulers issue's bound; measured 2e-7 – 5e-6: DDIM,
# DPM-Solver++ and its SDE form, UniPC bh1/bh2, orders 1–3; diffusers' float32 ᾱ dominates).
L1_SCHEDULER_FP32_RTOL = 1e-4
# the same plan in float64 vs diffusers' formulas on float64 tables (UniPC measured ≤ 7e-15): transcription only.
L1_SCHEDULER_FLOAT64_RTOL = 1e-12
# L2 ε: ONNX Runtime fp32 vs PyTorch fp32.
L2_EPS_FP32_ATOL = 1e-4
# L2 ε: fp16 mixed-precision ONNX / engine vs fp32, relative L2 over a batch.
L2_EPS_FP16_REL_L2 = 1e-2
# ε of the UNet2DModel that `ddpm-export --diffusers-out` writes (run by diffusers in PyTorch) vs our ONNX of the same
# weights, max |Δε| relative to max |ε| (issue 27; measured ≤ 2.5e-7 on the trained micro run, ≤ 2.0e-6 on ddpm-cifar10
# with random weights).
DIFFUSERS_OUT_EPS_RTOL = 1e-5
# round trip `--diffusers-out` → `--from-diffusers`: that ONNX's ε vs the original ONNX's, relative as above.
DIFFUSERS_ROUND_TRIP_EPS_RTOL = 1e-6  # measured ≤ 2.2e-7 (micro run)
# L3 trajectory: full 1000-step loop, fp32 runtime vs PyTorch reference loop with the same noise.
L3_TRAJECTORY_FP32_ATOL = 1e-3
# images (uint8) of two fp32 backends: a pixel on a rounding boundary may differ by 1; at most this share may
UINT8_DIFFERING_FRACTION = 1e-3
# L4 backend: GPU step kernel vs NumPy step (relative), Philox words bitwise.
L4_STEP_RTOL = 1e-6
# L4: a sample computed alone vs inside a batch, host loop, ONNX Runtime CPU (only the batch's BLAS blocking differs).
L4_BATCH_INDEPENDENCE_ATOL = 1e-5


# --- FID / KID (README "Sample quality: FID"; measured values there) -----------------------------------------
# FID is biased upward for small sets: below this many images on either side fid.json carries a warning.
FID_SMALL_SAMPLE = 10_000
# ONNX Runtime vs TorchScript Inception, max |Δ| of the 2048 pool3 features (values up to ~10).
FID_EXTRACTOR_ONNX_ATOL = 1e-3
# Our NumPy TF1 bilinear resize vs NVlabs' affine_grid/grid_sample formulation, on 0..255 values.
FID_RESIZE_ATOL = 1e-3
# FID(x, x): only round-off of the eigen-decompositions remains.
FID_SELF_ATOL = 1e-6
# |FID(a, b) − FID(b, a)| relative to FID(a, b).
FID_SYMMETRY_RTOL = 1e-6
# our FID vs torchmetrics' _compute_fid and the TTUR/pytorch-fid sqrtm formula on the same full-rank statistics
# (relative; measured 2e-15).
FID_REFERENCE_RTOL = 1e-9
# the same on real features of a few hundred images (Σ rank-deficient): the sqrtm-based references keep √(round-off)
# terms from the zero eigenvalues and differ from us, and from each other, by ~1e-6 (measured ≤ 3.5e-6 at 2048
# dimensions, ≤ 3.3e-7 on the first 256 that the test uses).
FID_RANK_DEFICIENT_RTOL = 1e-5
# FID from the n × n matrix of the samples' features vs from Σ^½ (d × d), on the same data (measured ≤ 1.3e-12).
FID_PATHS_RTOL = 1e-9
# sanity checks with the real Inception (tests/verify/test_fid_sanity.py), 200 vs 200 real digits (16×16) from two
# disjoint halves, and 200 digits vs 100 uniform-noise images. Measured: 29.2 and 450 (README "FID").
FID_DIGITS_HALVES_MAX = 60.0
FID_DIGITS_NOISE_MIN = 200.0
# our unbiased MMD² vs torchmetrics' poly_mmd on the same features (relative).
KID_REFERENCE_RTOL = 1e-9


@dataclass
class Comparison:
    name: str
    max_abs: float
    rel_l2: float
    index: tuple[int, ...]
    got: float
    want: float
    tol: float
    metric: str = "max_abs"  # or "rel_l2", or "rel_max": max |Δ| / max |want|
    want_max: float = 0.0  # max |want|

    @property
    def value(self) -> float:
        if self.metric == "rel_max":
            return self.max_abs / self.want_max if self.want_max > 0 else self.max_abs
        return self.max_abs if self.metric == "max_abs" else self.rel_l2

    @property
    def passed(self) -> bool:
        v = self.value
        return bool(np.isfinite(v) and v <= self.tol)

    def message(self) -> str:
        return (f"{self.name}: {self.metric} {self.value:.3g} vs "
                f"tolerance {self.tol:g}; largest |Δ| {self.max_abs:.3g} at index {self.index}: got {self.got:.8g}, "
                f"want {self.want:.8g} (relative L2 {self.rel_l2:.3g})")

    def to_dict(self) -> dict:
        return {"name": self.name, "passed": self.passed, "metric": self.metric, "tolerance": self.tol,
                "max_abs": self.max_abs, "rel_l2": self.rel_l2, "index": list(self.index), "got": self.got,
                "want": self.want}


def compare(name: str, got, want, tol: float, metric: str = "max_abs") -> Comparison:
    g = np.asarray(got, dtype=np.float64)
    w = np.asarray(want, dtype=np.float64)
    if g.shape != w.shape:
        raise ValueError(f"{name}: shapes differ, got {g.shape} want {w.shape}")
    d = np.abs(g - w)
    if d.size == 0:
        return Comparison(name, 0.0, 0.0, (), 0.0, 0.0, tol, metric)
    d_nan = np.where(np.isnan(d), np.inf, d)
    k = int(np.argmax(d_nan))
    idx = tuple(int(v) for v in np.unravel_index(k, d.shape))
    denom = float(np.linalg.norm(w.ravel()))
    rel = float(np.linalg.norm((g - w).ravel()) / denom) if denom > 0 else float(np.linalg.norm((g - w).ravel()))
    return Comparison(name, float(d_nan.flat[k]), rel, idx, float(g.flat[k]), float(w.flat[k]), tol, metric,
                      float(np.abs(w).max()))


def assert_close(name: str, got, want, tol: float, metric: str = "max_abs") -> Comparison:
    c = compare(name, got, want, tol, metric)
    assert c.passed, c.message()
    return c
