"""`ddpm-run parity`: every parity level the given artifacts allow, written as parity.json and parity.md.

Levels (shared/DESIGN.md): L0 schedule tables, L1 one step with injected noise, L2 ε of the exported model vs
PyTorch, L3 the full sampling loop with the same noise, L4 GPU backends vs CPU. References are external where
they can be: the paper's equations re-derived here in float64, diffusers' DDPMScheduler (when installed), the
PyTorch checkpoint (ours or a diffusers UNet), run side by side with ONNX Runtime through Polygraphy's
Comparator. Tolerances come from ``runtime.tolerances`` only. What cannot run here (TensorRT plans and the GPU
loop without a GPU) is recorded as "not run" with the reason, never as a pass.
"""

from __future__ import annotations

import importlib.util

import math
import platform
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ddpm_deploy.runtime import rng
from ddpm_deploy.runtime import tolerances as tol
from ddpm_deploy.runtime.config import ModelCard
from ddpm_deploy.runtime.contract import ParityReport
from ddpm_deploy.runtime.errors import ArtifactError, ConfigError, MissingDependencyError
from ddpm_deploy.runtime.fileio import atomic_write_text
from ddpm_deploy.runtime.schedule import DiffusionConfig, Schedule
from ddpm_deploy.runtime.tolerances import Comparison, compare

BUCKETS = 10  # per-timestep-bucket ε tables: t in [k·T/10, (k+1)·T/10)
L4_MAX_STEPS = 50  # the CPU batch-independence check runs a respaced loop of at most this many steps


@dataclass(frozen=True)
class ParitySettings:
    checkpoint: Path
    onnx: Path | None = None
    engine: Path | None = None
    steps: int | None = None
    batch: int = 4
    seed: int = 0
    weights: str = "ema"
    threads: int = 0  # PyTorch and ONNX Runtime intra-op threads; 0 leaves the libraries' defaults
    device: str = "cpu"  # "cuda": L4 also runs the device loop (ONNX Runtime CUDA, and the plan) against the host loop
    backend: str = "onnxruntime"  # the CPU backend of L2/L3/L4: "onnxruntime" or "openvino"
    scheduler: str | None = None  # L1/L3/L4 along this scheduler's plan (None: DDPM ancestral)
    scheduler_options: tuple[str, ...] = ()  # KEY=VALUE, as ddpm-run sample --option


def plan_of(card: ModelCard, s: ParitySettings, steps: int | None = None):
    """The StepPlan the levels sample along (``steps`` overrides the settings')."""
    from ddpm_deploy.runtime.cli import resolve_plan

    return resolve_plan(card, s.scheduler, None, s.steps if steps is None else steps, None, None, s.scheduler_options)


@dataclass
class LevelResult:
    level: str
    backend: str
    reference: str
    status: str = "pass"
    reason: str = ""
    runner: str = ""  # the class that computed the backend's side (OrtRunner, OrtCudaRunner, TrtRunner, ...)
    checks: list[Comparison] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)

    def add(self, c: Comparison) -> Comparison:
        self.checks.append(c)
        if not c.passed:
            self.status = "fail"
        return c

    def to_dict(self) -> dict[str, Any]:
        return {"level": self.level, "backend": self.backend, "reference": self.reference, "status": self.status,
                "runner": self.runner, "reason": self.reason, "max_abs": max((c.max_abs for c in self.checks), default=None),
                "rel_l2": max((c.rel_l2 for c in self.checks), default=None),
                "checks": [c.to_dict() for c in self.checks], "metrics": self.metrics}


def compare_rel(name: str, got, want, rtol: float, cond=1.0) -> Comparison:
    """Elementwise relative error |got − want| / (|want|·cond) against ``rtol``; ``cond`` is the condition number
    of the quantity (e.g. (1−β)/β for β computed as 1 − ᾱ_t/ᾱ_{t−1}), so a well-conditioned table gets ``rtol``."""
    g, w = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = np.abs(w) * np.maximum(np.asarray(cond, np.float64), 1.0)
    scale = np.where(scale > 0, scale, 1.0)
    c = compare(f"{name} (relative error / condition number)", g / scale, w / scale, rtol)
    c.rel_l2 = compare(name, g, w, rtol).rel_l2  # the plain relative L2 of the tables
    return c


def gpu_status() -> tuple[bool, str]:
    """(True, device name) when a CUDA device is usable, else (False, why not): the runtime's one GPU probe."""
    from ddpm_deploy.runtime.device.info import probe_gpu

    props, why = probe_gpu(0)
    return props is not None, why


# --- the reference model ----------------------------------------------------------------------------------

@dataclass
class Reference:
    kind: str  # "ddpm-deploy" (a ddpm-train run dir) or "diffusers" (a UNet2DModel directory)
    path: Path
    model: torch.nn.Module  # (x float32 [B,C,H,W], t int32 [B]) → ε
    card: ModelCard
    scheduler_config: dict[str, Any] | None = None


def load_reference(path: Path, weights: str = "ema") -> Reference:
    path = Path(path)
    if (path / "model.json").is_file():
        from ddpm_deploy.trainer.checkpoint import load_model

        model, card, _ = load_model(path, weights)
        return Reference("ddpm-deploy", path, model, card)
    if (path / "config.json").is_file() or (path / "unet" / "config.json").is_file():
        from ddpm_deploy.export.from_diffusers import load_diffusers

        model, card, _ = load_diffusers(path)
        return Reference("diffusers", path, model, card, card.architecture.get("scheduler_config"))
    raise ArtifactError(f"{path}: expected a ddpm-train run directory (model.json) or a diffusers UNet2DModel "
                        f"directory (config.json), found neither")


# --- L0 / L1: the paper's equations in float64 (independent of runtime.schedule) --------------------------

def paper_tables(cfg: DiffusionConfig, steps: int | None) -> dict[str, np.ndarray]:
    """β, ᾱ, posterior variance and mean coefficients (DDPM eq. 4, 6, 7; improved DDPM eq. 17, 19) in float64."""
    T = cfg.num_timesteps
    if cfg.schedule == "linear":
        beta = cfg.beta_start + (cfg.beta_end - cfg.beta_start) * np.arange(T) / (T - 1)
    else:
        f = lambda t: math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        beta = np.array([min(1.0 - f(i + 1) / f(i), 0.999) for i in range(T)])
    abar_all = np.cumprod(1.0 - beta)
    ts = np.arange(T) if steps in (None, T) else np.unique(np.round(np.linspace(0, T - 1, steps)).astype(int))
    abar = abar_all[ts]
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    b = beta if len(ts) == T else 1.0 - abar / abar_prev
    var = b * (1.0 - abar_prev) / (1.0 - abar)
    sigma = np.sqrt(var if cfg.variance_type == "fixed_small" else b)
    sigma[0] = 0.0
    return {"timesteps": ts, "betas": b, "alphas_cumprod": abar, "posterior_variance": var,
            "posterior_mean_coef1": b * np.sqrt(abar_prev) / (1.0 - abar),
            "posterior_mean_coef2": np.sqrt(1.0 - b) * (1.0 - abar_prev) / (1.0 - abar), "sigmas": sigma,
            "ratio_derived": np.full(len(ts), cfg.schedule == "cosine" or len(ts) < T)}


def paper_step(tables: dict[str, np.ndarray], cfg: DiffusionConfig, x, eps, i: int, z) -> np.ndarray:
    """One ancestral step in float64: x̂0 (eq. 15), clip, μ (eq. 7), + σ·z (eq. 11's sampling form)."""
    x, eps = np.asarray(x, np.float64), np.asarray(eps, np.float64)
    abar = tables["alphas_cumprod"][i]
    x0 = (x - np.sqrt(1.0 - abar) * eps) / np.sqrt(abar)
    if cfg.clip_denoised:
        x0 = np.clip(x0, -1.0, 1.0)
    out = tables["posterior_mean_coef1"][i] * x0 + tables["posterior_mean_coef2"][i] * x
    return out + (tables["sigmas"][i] * np.asarray(z, np.float64) if i > 0 else 0.0)


def step_scale(sched: Schedule, x, eps, i: int) -> np.ndarray:
    """1 + c1·(a·|x_t| + b·|ε|) + c2·|x_t|: the sum of the magnitudes of the step's terms, which float32 rounding
    is relative to (forward error bound). a·x_t and b·ε nearly cancel in x̂0 where ᾱ_t is tiny (≈ 1e4 each at
    t = T−1 of the cosine schedule), so a plain absolute tolerance would judge the conditioning, not the code."""
    a, b = sched.sqrt_recip_alphas_cumprod[i], sched.sqrt_recipm1_alphas_cumprod[i]
    c1, c2 = abs(sched.posterior_mean_coef1[i]), abs(sched.posterior_mean_coef2[i])
    ax, ae = np.abs(np.asarray(x, np.float64)), np.abs(np.asarray(eps, np.float64))
    return 1.0 + c1 * (a * ax + b * ae) + c2 * ax


def level0(card: ModelCard, steps: int | None, artifact_cards: dict[str, dict]) -> list[LevelResult]:
    cfg = card.diffusion
    sched, ref = Schedule(cfg, steps), paper_tables(cfg, steps)
    r = LevelResult("L0 schedule", "numpy float64 tables", "paper equations, float64")
    cond = np.where(ref["ratio_derived"], 1.0 / ref["betas"], 1.0)
    r.add(compare("timesteps", sched.timesteps, ref["timesteps"], 0.0))
    for k in ("betas", "posterior_variance", "posterior_mean_coef1", "posterior_mean_coef2"):
        r.add(compare_rel(k, getattr(sched, k)[1:], ref[k][1:], tol.L0_FLOAT64_RTOL, cond[1:]))
    r.add(compare_rel("alphas_cumprod", sched.alphas_cumprod, ref["alphas_cumprod"], tol.L0_FLOAT64_RTOL))
    r.add(compare_rel("sigmas", sched.sigmas, ref["sigmas"], tol.L0_FLOAT64_RTOL, cond))
    out = [r, _level0_diffusers(cfg, sched)]
    c = LevelResult("L0 schedule", "artifact metadata", "checkpoint config")
    want = card.diffusion.to_dict()
    for name, d in artifact_cards.items():
        diff = {k: (d.get(k), v) for k, v in want.items() if d.get(k) != v}
        c.metrics[name] = "same DDPM config" if not diff else {k: {"artifact": a, "checkpoint": b} for k, (a, b) in diff.items()}
        if diff:
            c.status, c.reason = "fail", f"{name} carries another DDPM config than the checkpoint: {c.metrics[name]}"
    if c.status == "pass":
        c.status, c.reason = ("pass", "same DDPM config in " + ", ".join(artifact_cards)) if artifact_cards else (
            "skipped", "no artifact given (--onnx / --engine)")
    return out + [c]


def _level0_diffusers(cfg: DiffusionConfig, sched: Schedule) -> LevelResult:
    from ddpm_deploy.verify.diffusers_ref import scheduler_for

    r = LevelResult("L0 schedule", "numpy float64 tables", "diffusers DDPMScheduler (float32 β, by design)")
    try:
        d = scheduler_for(cfg)
    except MissingDependencyError:
        r.status, r.reason = "skipped", "diffusers is not installed (pip install 'diffusers>=0.30')"
        return r
    ts = sched.timesteps
    if len(ts) < cfg.num_timesteps:
        d.set_timesteps(timesteps=[int(t) for t in ts[::-1]])
    abar = d.alphas_cumprod.double().numpy()[ts]
    # float32 1 − β_s loses digits where β_s ≈ 1 (the cosine cap 0.999): the condition number of ᾱ_t is that of
    # its worst factor so far, max_{s≤t} β_s/(1 − β_s) (≤ 0.02 for the linear schedule, 999 at the cosine cap)
    cond_abar = np.maximum.accumulate(sched.base_betas / (1.0 - sched.base_betas))[ts]
    r.add(compare_rel("betas (base)", d.betas.double().numpy(), sched.base_betas, tol.L0_DIFFUSERS_FLOAT32_RTOL))
    r.add(compare_rel("alphas_cumprod", abar, sched.alphas_cumprod, tol.L0_DIFFUSERS_FLOAT32_RTOL, cond_abar))
    # diffusers re-derives β_t = 1 − ᾱ_t/ᾱ_prev and 1 − ᾱ_prev in float32 inside _get_variance/step: each a
    # cancellation; the condition number of β̃_t is the sum of its factors' (1/β_t + ᾱ/(1 − ᾱ) twice)
    a, p = sched.alphas_cumprod[1:], sched.alphas_cumprod_prev[1:]
    var_cond = 1.0 / sched.betas[1:] + p / (1.0 - p) + a / (1.0 - a)
    var = np.array([float(d._get_variance(int(t), variance_type="fixed_small")) for t in ts[1:]])
    r.add(compare_rel("posterior_variance", var, sched.posterior_variance[1:], tol.L0_DIFFUSERS_FLOAT32_RTOL,
                      var_cond))
    d64 = scheduler_for(cfg, float64_betas=sched.base_betas)
    if len(ts) < cfg.num_timesteps:
        d64.set_timesteps(timesteps=[int(t) for t in ts[::-1]])
    var64 = np.array([float(d64._get_variance(int(t), variance_type="fixed_small")) for t in ts[1:]])
    r.add(compare_rel("posterior_variance, diffusers formulas in float64", var64, sched.posterior_variance[1:],
                      tol.L0_FLOAT64_RTOL, var_cond))
    return r


def level1(cfg: DiffusionConfig, steps: int | None, seed: int = 0) -> list[LevelResult]:
    """One step with injected noise at a spread of steps, vs the float64 paper step and diffusers' step."""
    from ddpm_deploy.verify.diffusers_ref import scheduler_for, step_with_noise

    sched, ref = Schedule(cfg, steps), paper_tables(cfg, steps)
    n = len(sched)
    idx = sorted({n - 1, n // 2, min(10, n - 1), 1, 0})
    g = np.random.default_rng(seed)
    cases = [(i, *(g.standard_normal((2, 3, 8, 8)).astype(np.float32) for _ in range(3))) for i in idx]
    r = LevelResult("L1 step", "numpy float32 step", "paper step, float64")
    for i, x, e, z in cases:
        s = step_scale(sched, x, e, i)
        r.add(compare(f"step i={i} (t={sched.timesteps[i]}), Δ / step scale", sched.step(x.copy(), e, i, z) / s,
                      paper_step(ref, cfg, x, e, i, z) / s, tol.L1_STEP_ATOL))
    out = [r]
    try:
        d32, d64 = scheduler_for(cfg), scheduler_for(cfg, float64_betas=sched.base_betas)
    except MissingDependencyError:
        out.append(LevelResult("L1 step", "numpy float32 step", "diffusers DDPMScheduler.step", "skipped",
                               "diffusers is not installed (pip install 'diffusers>=0.30')"))
        return out
    for d, name, atol in ((d64, "float64 tables", tol.L1_STEP_ATOL),
                          (d32, "float32 (its own β)", tol.L1_DIFFUSERS_FLOAT32_ATOL)):
        rr = LevelResult("L1 step", "numpy float32 step", f"diffusers DDPMScheduler.step, {name}")
        if n < cfg.num_timesteps:
            d.set_timesteps(timesteps=[int(t) for t in sched.timesteps[::-1]])
        dt = d.betas.dtype
        for i, x, e, z in cases:
            t = int(sched.timesteps[i])
            want = step_with_noise(d, torch.from_numpy(e).to(dt), t, torch.from_numpy(x).to(dt),
                                   torch.from_numpy(z).to(dt)).double().numpy()
            s = step_scale(sched, x, e, i)
            rr.add(compare(f"step t={t}, Δ / step scale", sched.step(x.copy(), e, i, z) / s, want / s, atol))
        out.append(rr)
    return out


# --- L2: ε through Polygraphy's Comparator ----------------------------------------------------------------

def _polygraphy():
    from polygraphy.backend.base import BaseRunner
    from polygraphy.common import TensorMetadata

    class TorchCpuRunner(BaseRunner):
        """A PyTorch model on the CPU (Polygraphy's PytRunner moves inputs to CUDA)."""

        def __init__(self, model, shape):
            super().__init__(name="pytorch-cpu", prefix="pytorch-cpu")
            self.model, self.shape = model, shape

        def get_input_metadata_impl(self):
            return TensorMetadata().add("x", np.float32, (-1, *self.shape)).add("t", np.int32, (-1,))

        def infer_impl(self, feed_dict):
            start = time.perf_counter()
            with torch.no_grad():
                eps = self.model(torch.from_numpy(feed_dict["x"]), torch.from_numpy(feed_dict["t"])).float()
            self.inference_time = time.perf_counter() - start
            return OrderedDict(eps=eps.numpy())

    return TorchCpuRunner


def l2_times(T: int) -> list[int]:
    """t ∈ {0, 1, T/2, T−1} plus the middle of every bucket."""
    mids = [int((k + 0.5) * T / BUCKETS) for k in range(BUCKETS)]
    return sorted({0, 1, T // 2, T - 1, *mids})


def _bucket_table(per_t: dict[int, tuple[float, float, float]], T: int) -> list[dict[str, Any]]:
    """per_t: t → (max|Δ|, Σ Δ², Σ ref²); aggregated over BUCKETS equal ranges of t."""
    rows = []
    for k in range(BUCKETS):
        lo, hi = k * T // BUCKETS, (k + 1) * T // BUCKETS
        sel = [v for t, v in per_t.items() if lo <= t < hi]
        if sel:
            num, den = sum(v[1] for v in sel), sum(v[2] for v in sel)
            rows.append({"t_range": [lo, hi - 1], "n": len(sel), "max_abs": max(v[0] for v in sel),
                         "rel_l2": math.sqrt(num / den) if den > 0 else math.sqrt(num)})
    return rows


class _Hooked:
    """A runner seen by the host loop through one more ``eps`` hop: records every ε by timestep."""

    def __init__(self, runner):
        self.runner, self.seen = runner, {}

    def eps(self, x, t):
        self.seen[int(t[0])] = e = self.runner.eps(x, t)
        return e


def _adapter(runner, label: str):
    """One of our runners as a Polygraphy runner, so the Comparator drives the code we ship."""
    from polygraphy.backend.base import BaseRunner
    from polygraphy.common import TensorMetadata

    class ShippedRunner(BaseRunner):
        def __init__(self):
            super().__init__(name=label, prefix=label)

        def get_input_metadata_impl(self):
            return TensorMetadata().add("x", np.float32, (-1, *runner.sample_shape)).add("t", np.int32, (-1,))

        def infer_impl(self, feed_dict):
            start = time.perf_counter()
            eps = runner.eps(feed_dict["x"], feed_dict["t"])
            self.inference_time = time.perf_counter() - start
            return OrderedDict(eps=eps)

    return ShippedRunner()


def _engine_runner(engine: Path):
    """Our TensorRT runner for the plan, or (None, why not): no GPU, no TensorRT, or a GPU it cannot run on."""
    from ddpm_deploy.runtime.backends.base import open_runner
    from ddpm_deploy.runtime.errors import DDPMError

    ok, why = gpu_status()
    if not ok:
        return None, f"not run: {why}; TensorRT plans execute on NVIDIA GPUs only (the sidecar was validated)"
    try:
        return open_runner(engine, "cuda", backend="tensorrt", cuda_graph=False), ""
    except DDPMError as e:
        return None, f"not run: {e}"


def _ort_cuda_runner(onnx_path: Path):
    """Our ONNX Runtime CUDA runner, or (None, status, why not)."""
    import onnxruntime as ort

    from ddpm_deploy.runtime.backends.base import open_runner
    from ddpm_deploy.runtime.errors import DDPMError

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return None, "skipped", "onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu on a GPU machine)"
    ok, why = gpu_status()
    if not ok:
        return None, "not run", why
    try:
        return open_runner(onnx_path, "cuda", cuda_graph=False), "", ""
    except DDPMError as e:
        return None, "not run", str(e)


def level2(ref: Reference, onnx_path: Path, batches: tuple[int, ...], seed: int, engine: dict | None,
           threads: int = 0, backend: str = "onnxruntime") -> list[LevelResult]:
    """ε of our runners (ONNX Runtime CPU; ONNX Runtime CUDA and the plan's TensorRT runner where a GPU runs them)
    vs the PyTorch model, side by side in Polygraphy's Comparator."""
    from polygraphy import comparator as pgc
    from polygraphy.logger import G_LOGGER

    from ddpm_deploy.runtime.backends.base import open_runner

    T, C, S = ref.card.diffusion.num_timesteps, ref.card.data.channels, ref.card.data.image_size
    g = np.random.default_rng(seed)
    feeds = [OrderedDict(x=g.standard_normal((b, C, S, S)).astype(np.float32), t=np.full(b, tv, np.int32))
             for b in batches for tv in l2_times(T)]
    cpu = open_runner(onnx_path, "cpu", backend=backend, threads=threads)
    runners = {cpu.name: cpu}
    notes: list[LevelResult] = []
    cuda, status, why = _ort_cuda_runner(onnx_path)
    if cuda is None:
        notes.append(LevelResult("L2 eps", "onnxruntime-cuda", "pytorch", status, why, runner="OrtCudaRunner"))
    else:
        runners["onnxruntime-cuda"] = cuda
    engine_feeds = feeds
    if engine is not None:
        side = engine["sidecar"]
        trt_runner, why = _engine_runner(Path(engine["path"]))
        if trt_runner is None:
            notes.append(LevelResult("L2 eps", f"tensorrt plan ({side.trt['flavour']})", "pytorch", "not run", why,
                                     runner="TrtRunner"))
        else:
            lo, hi = side.profile["min"], side.profile["max"]
            engine_feeds = [f for f in feeds if lo <= len(f["t"]) <= hi]
            if engine_feeds:
                runners["tensorrt"] = trt_runner
            else:
                trt_runner.close()
                notes.append(LevelResult("L2 eps", f"tensorrt plan ({side.trt['flavour']})", "pytorch", "not run",
                                         f"none of the batches {sorted({len(f['t']) for f in feeds})} is in the plan's "
                                         f"profile {lo}..{hi}: pass --batch within it", runner="TrtRunner"))
    torch_runner = _polygraphy()(ref.model.eval(), (C, S, S))
    measured: list[LevelResult] = []
    try:
        for name, runner in runners.items():
            use = engine_feeds if name == "tensorrt" else feeds
            # fp16 is judged by relative L2 below; Polygraphy's fp32-bound verdict is kept in the JSON, not printed.
            with G_LOGGER.verbosity(G_LOGGER.CRITICAL if runner.precision == "fp16" else G_LOGGER.ERROR):
                results = pgc.Comparator.run([torch_runner, _adapter(runner, name)], data_loader=use)
                simple = (pgc.SimpleCompareFunc if hasattr(pgc, "SimpleCompareFunc") else pgc.CompareFunc.simple)
                acc = pgc.Comparator.compare_accuracy(results, compare_func=simple(atol=tol.L2_EPS_FP32_ATOL, rtol=0.0))
            acc = acc if hasattr(acc, "items") else acc[0]  # polygraphy 0.53: AccuracyResults, one per compare_func
            measured.append(_l2_result(ref, name, runner, use, results, acc, T))
    finally:
        for runner in runners.values():
            runner.close()
    return measured + notes


def _l2_result(ref: Reference, name: str, runner, feeds, results, acc, T: int) -> LevelResult:
    precision = runner.precision
    r = LevelResult("L2 eps", f"{name} ({precision})", f"pytorch-cpu ({ref.kind})", runner=type(runner).__name__)
    (ref_name, ref_outs), (runner_name, outs) = list(results)
    per_t: dict[int, tuple[float, float, float]] = {}
    for feed, got, want in zip(feeds, outs, ref_outs):
        b, tv = len(feed["t"]), int(feed["t"][0])
        gv, wv = got["eps"], want["eps"]
        if precision == "fp32":
            c = r.add(compare(f"eps b={b} t={tv}", gv, wv, tol.L2_EPS_FP32_ATOL))
        elif precision in ("fp16", "bf16"):
            c = r.add(compare(f"eps b={b} t={tv}", gv, wv, tol.L2_EPS_FP16_REL_L2, metric="rel_l2"))
        else:  # int8 (or unknown): no ε tolerance is defined; judged by sample fidelity (verify/fidelity.py)
            c = compare(f"eps b={b} t={tv}", gv, wv, tol.L2_EPS_FP16_REL_L2, metric="rel_l2")
            r.checks.append(c)
            r.status, r.reason = "reported", f"{precision} model: no ε tolerance; judged by sample fidelity"
        m, s2, r2 = per_t.get(tv, (0.0, 0.0, 0.0))
        per_t[tv] = (max(m, c.max_abs), s2 + float(((gv - wv) ** 2).sum()), r2 + float((wv ** 2).sum()))
    iters = dict(acc.items()).get((ref_name, runner_name), [])
    matched = sum(all(bool(v) for v in it.values()) for it in iters)
    r.metrics = {"batches": sorted({len(f["t"]) for f in feeds}), "timesteps": l2_times(T), "precision": precision,
                 "polygraphy_comparator": {"compare_func": f"simple(atol={tol.L2_EPS_FP32_ATOL:g}, rtol=0)"
                                           + (" (fp32 bound; fp16 is judged by relative L2)" if precision == "fp16" else ""),
                                           "iterations_matched": matched, "iterations": len(iters)},
                 "buckets": _bucket_table(per_t, T)}
    return r


# --- L3: the whole loop -----------------------------------------------------------------------------------

def level1_scheduler(card: ModelCard, plan, seed: int) -> LevelResult:
    """L1 for any scheduler: the runtime's NumPy rule over the whole plan vs diffusers' own scheduler class, on a
    deterministic ε (tanh(0.9·x + 10⁻³·t)) with the same x_T and z; "reported" where diffusers is known wrong."""
    from ddpm_deploy.runtime.sampling.host import HostLoop

    r = LevelResult("L1 step", f"numpy plan rule, {plan.scheduler} {len(plan)} steps",
                    f"diffusers {plan.scheduler}.step, same noise", runner="HostLoop")
    if importlib.util.find_spec("diffusers") is None:
        r.status, r.reason = "skipped", "diffusers is not installed (pip install '.[test]')"
        return r
    from ddpm_deploy.verify.diffusers_ref import diffusers_agrees, sample_with_scheduler

    class Dummy:
        def eps(self, x, t):
            return np.tanh(0.9 * x + t.astype(np.float32)[:, None, None, None] * 1e-3).astype(np.float32)

    shape, idx = (card.data.channels, card.data.image_size, card.data.image_size), np.arange(2)
    got, _ = HostLoop(Dummy(), shape, len(idx)).sample(plan, seed, idx)
    try:
        want = sample_with_scheduler(Dummy().eps, plan, card.diffusion, shape, seed, idx)
    except ValueError as e:
        r.status, r.reason = "reported", str(e)
        return r
    scale = float(np.abs(want).max())
    c = compare(f"x_0 after {len(plan)} steps (atol = {tol.L1_SCHEDULER_FP32_RTOL:g} × max |x_0| = {scale:.3g})",
                got, want, tol.L1_SCHEDULER_FP32_RTOL * scale)
    agree, why = diffusers_agrees(plan, card.diffusion.num_timesteps)
    if agree:
        r.add(c)
    else:
        r.checks.append(c)
        r.status, r.reason = "reported", why
    r.metrics = {"scheduler": plan.describe()}
    return r


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two [-1, 1] image batches mapped to [0, 1]."""
    ua, ub = np.clip((a + 1) / 2, 0, 1), np.clip((b + 1) / 2, 0, 1)
    mse = float(np.mean((ua.astype(np.float64) - ub) ** 2))
    return float("inf") if mse == 0 else 10.0 * math.log10(1.0 / mse)


def reference_loop(ref: Reference, sched, shape, seed: int, idx, hook=None) -> np.ndarray:
    """The trajectory of ``sched`` (a StepPlan) in PyTorch: diffusers' own scheduler class driving the model where
    diffusers computes this plan as we do (every scheduler; the DDPM loop of a diffusers model's own config), else
    the trainer's torch sampler over the same plan table."""
    from ddpm_deploy.verify.diffusers_ref import diffusers_agrees

    if sched.scheduler != "DDPMScheduler" and importlib.util.find_spec("diffusers") is not None and \
            diffusers_agrees(sched, ref.card.diffusion.num_timesteps)[0]:
        from ddpm_deploy.verify.diffusers_ref import sample_with_scheduler

        def eps_fn(x, t):
            e = ref.model(torch.from_numpy(x), torch.from_numpy(t)).float().numpy()
            if hook is not None:
                hook(int(t[0]), e)
            return e

        return sample_with_scheduler(eps_fn, sched, ref.card.diffusion, shape, seed, idx, dtype=torch.float32)
    if ref.kind == "diffusers" and sched.scheduler == "DDPMScheduler":
        from ddpm_deploy.verify.diffusers_ref import make_scheduler, sample_diffusers

        return sample_diffusers(ref.model, make_scheduler(ref.scheduler_config), sched.timesteps[::-1], shape, seed,
                                idx, eps_hook=hook)
    from ddpm_deploy.trainer.sample import sample_torch

    class Hooked(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x, t):
            e = self.m(x, t).float()
            if hook is not None:
                hook(int(t[0]), e.numpy())
            return e

    return sample_torch(Hooked(ref.model), sched, shape, seed, idx)


def level3(ref: Reference, onnx_path: Path, sched, batch: int, seed: int, threads: int = 0,
           backend: str = "onnxruntime") -> LevelResult:
    from ddpm_deploy.runtime.backends.base import open_runner
    from ddpm_deploy.runtime.sampling.host import HostLoop

    card = ref.card
    shape = (card.data.channels, card.data.image_size, card.data.image_size)
    idx = np.arange(batch)
    with open_runner(onnx_path, "cpu", backend=backend, threads=threads) as runner:
        hooked = _Hooked(runner)  # ε of the runtime's trajectory, by timestep
        t0 = time.perf_counter()
        got, _ = HostLoop(hooked, shape, len(idx)).sample(sched, seed, idx)
        t1 = time.perf_counter()
    seen = hooked.seen
    per_t: dict[int, tuple[float, float, float]] = {}

    def hook(t, e):  # ε of the reference trajectory at t vs the runtime's
        d, e = (seen[t] - e).astype(np.float64), e.astype(np.float64)
        per_t[t] = (float(np.abs(d).max()), float((d ** 2).sum()), float((e ** 2).sum()))

    with torch.no_grad():
        want = reference_loop(ref, sched, shape, seed, idx, hook)
    t2 = time.perf_counter()
    precision = runner.precision
    refname = "diffusers DDPMScheduler loop" if ref.kind == "diffusers" else "pytorch reference loop (trainer.sample)"
    if sched.scheduler != "DDPMScheduler":
        from ddpm_deploy.verify.diffusers_ref import diffusers_agrees

        agree, why = diffusers_agrees(sched, card.diffusion.num_timesteps)
        refname = f"diffusers {sched.scheduler} loop" if agree and importlib.util.find_spec("diffusers") else \
            f"pytorch loop over the same plan (trainer.sample{'; ' + why if why else ''})"
    r = LevelResult("L3 trajectory", f"{runner.name} ({precision}) + host loop",
                    f"{refname}, same noise ({sched.scheduler}, {len(sched)} steps)",
                    runner=f"{type(runner).__name__} + HostLoop")
    c = compare(f"x_0 after {len(sched)} steps, batch {batch}, seed {seed}", got, want, tol.L3_TRAJECTORY_FP32_ATOL)
    if precision == "fp32":
        r.add(c)
    else:
        r.checks.append(c)
        r.status, r.reason = "reported", "no L3 tolerance is defined for fp16 models: reported, not judged"
    u8 = lambda a: np.round(np.clip((a + 1) / 2, 0, 1) * 255).astype(np.int16)  # noqa: E731
    r.metrics = {"steps": len(sched), "scheduler": sched.describe(), "batch": batch, "seed": seed,
                 "psnr_db": psnr(got, want),
                 "uint8_max_diff": int(np.abs(u8(got) - u8(want)).max()), "seconds_runtime": t1 - t0,
                 "seconds_reference": t2 - t1, "eps_along_trajectories_buckets": _bucket_table(per_t, card.diffusion.num_timesteps)}
    return r


# --- L4: GPU backends vs CPU (and the CPU-checkable parts) -------------------------------------------------

def _device_loop_level(name: str, open_fn, host_x0: np.ndarray | None, sched, shape, seed: int,
                       idx: np.ndarray, runner_cls: str, host: str = "onnxruntime-cpu") -> LevelResult:
    """The device loop (kernels + a device runner) vs the host loop on ONNX Runtime CPU, same seed and indices."""
    from ddpm_deploy.runtime.sampling.open import open_loop

    r = LevelResult("L4 backend", f"device loop + {name}", f"host loop + {host}", runner=runner_cls)
    runner, status, why = open_fn()
    if runner is None:
        r.status, r.reason = status or "not run", why
        return r
    from ddpm_deploy.runtime.errors import DDPMError, MissingDependencyError

    with runner:
        r.runner = f"{type(runner).__name__} + DeviceLoop"
        try:
            runner.check_batch(len(idx))
        except DDPMError as e:
            r.status, r.reason = "not run", f"batch {len(idx)}: {e}"
            return r
        try:
            with open_loop(runner, shape, max_batch=len(idx)) as loop:
                got, timings = loop.sample(sched, seed, idx)
        except MissingDependencyError as e:
            r.status, r.reason = "not run", str(e)
            return r
        except DDPMError as e:  # a CUDA or kernel error on a GPU that ran the rest: a failure, with its message
            r.status, r.reason = "fail", f"the device loop failed: {e}"
            return r
        c = compare(f"x_0 ({len(sched)} steps, batch {len(idx)}) device vs host loop", got, host_x0,
                    tol.L3_TRAJECTORY_FP32_ATOL)
        if runner.precision == "fp32":
            r.add(c)
        else:
            r.checks.append(c)
            r.status, r.reason = "reported", f"{runner.precision} model: reported, not judged (fp32 tolerance)"
        r.metrics = {"steps": len(sched), "batch": len(idx), "psnr_db": psnr(got, host_x0),
                     "graph": timings.graph, "precision": runner.precision}
    return r


def level4(ref: Reference, onnx_path: Path | None, engine: dict | None, steps: int | None, batch: int,
           seed: int, threads: int = 0, device: str = "cpu", backend: str = "onnxruntime",
           settings: ParitySettings | None = None) -> list[LevelResult]:
    """The host loop's independence of the batch composition (CPU), and with ``device='cuda'`` the device loop
    (ONNX Runtime CUDA, and the plan's TensorRT runner) against the host loop (ONNX Runtime CPU)."""
    from ddpm_deploy.runtime.backends.base import open_runner
    from ddpm_deploy.runtime.sampling.host import HostLoop

    out: list[LevelResult] = []
    settings = settings or ParitySettings(ref.path if hasattr(ref, "path") else Path("."), steps=steps)
    k = min(len(plan_of(ref.card, settings, steps)), L4_MAX_STEPS)
    sched = plan_of(ref.card, settings, k)
    shape = (ref.card.data.channels, ref.card.data.image_size, ref.card.data.image_size)
    r = LevelResult("L4 backend", "host loop, batch composition", "the same samples one at a time (CPU)",
                    runner="HostLoop")
    g_rng = rng.normals(seed, np.arange(batch), 7, (3, 5, 5))
    one = np.concatenate([rng.normals(seed, [i], 7, (3, 5, 5)) for i in range(batch)])
    r.add(compare("rng.normals batch vs one by one (bitwise)", g_rng, one, 0.0))
    if onnx_path is None:
        r.reason = "no --onnx: only the noise was checked"
        return out + [r]
    idx = np.arange(batch)
    with open_runner(onnx_path, "cpu", backend=backend, threads=threads) as runner:
        host = HostLoop(runner, shape, batch)
        whole, _ = host.sample(sched, seed, idx)
        single = np.concatenate([host.sample(sched, seed, [i])[0] for i in range(batch)])
        r.runner = f"{type(runner).__name__} + HostLoop"
        host_name = runner.name
    c = r.add(compare(f"x_0 ({k} steps) batch {batch} vs one by one", whole, single, tol.L4_BATCH_INDEPENDENCE_ATOL))
    r.metrics = {"steps": k, "bitwise_equal": bool(np.array_equal(whole, single)), "max_abs": c.max_abs}
    out.append(r)
    if device != "cuda":
        out.append(LevelResult("L4 backend", "device loop + onnxruntime-cuda", "host loop + onnxruntime-cpu",
                               "skipped", "the device loop runs with --device cuda", runner="OrtCudaRunner"))
        if engine is not None:
            out.append(LevelResult("L4 backend", f"device loop + tensorrt plan ({engine['sidecar'].trt['flavour']})",
                                   "host loop + onnxruntime-cpu", "skipped", "the device loop runs with --device cuda",
                                   runner="TrtRunner"))
        return out
    out.append(_device_loop_level("onnxruntime-cuda", lambda: _ort_cuda_runner(onnx_path), whole, sched, shape, seed,
                                  idx, "OrtCudaRunner", host_name))
    if engine is not None:
        def open_plan():
            runner, why = _engine_runner(Path(engine["path"]))
            return runner, "not run", why

        out.append(_device_loop_level(f"tensorrt plan ({engine['sidecar'].trt['flavour']})", open_plan, whole, sched,
                                      shape, seed, idx, "TrtRunner", host_name))
    return out


# --- orchestration and reports ----------------------------------------------------------------------------

def _engine_info(plan: Path, onnx_path: Path | None) -> tuple[dict, list[str]]:
    from ddpm_deploy.runtime.fileio import sha256_file
    from ddpm_deploy.runtime.plan import read_plan_sidecar

    sidecar = read_plan_sidecar(plan)
    problems = []
    if onnx_path is not None and sidecar.onnx.get("sha256") != sha256_file(onnx_path):
        problems.append(f"the plan was built from an ONNX with sha256 {sidecar.onnx.get('sha256')} "
                        f"({sidecar.onnx.get('path')}), not from {onnx_path}; rebuild the plan from this ONNX or "
                        f"pass the ONNX it was built from")
    return {"path": str(plan), "sidecar": sidecar}, problems


def onnx_for(s: ParitySettings) -> Path | None:
    """The ONNX the levels check: --onnx; with only --engine, the ONNX the plan was built from (its sidecar's
    SHA-256), found beside the plan or in CHECKPOINT/export/ — an fp16 plan is compared with model.fp16.onnx, not
    with the fp32 model.onnx; else CHECKPOINT/export/model.onnx. A plan built from another ONNX than --onnx is
    refused, naming the file to pass."""
    from ddpm_deploy.runtime.fileio import sha256_file
    from ddpm_deploy.runtime.plan import read_plan_sidecar

    default = s.checkpoint / "export" / "model.onnx"
    if s.engine is None:
        return s.onnx if s.onnx is not None else default if default.is_file() else None
    side = read_plan_sidecar(s.engine)
    want, name = side.onnx.get("sha256"), side.onnx.get("path") or "model.onnx"
    if s.onnx is not None:
        if sha256_file(s.onnx) == want:
            return s.onnx
        found = _find_source(s, name, want)
        hint = (f"pass --onnx {found}" if found else f"pass the ONNX it was built from ({name}, sha256 {want[:16]}…), "
                "or rebuild the plan from this ONNX with ddpm-export --onnx FILE --engine")
        raise ConfigError(f"--engine {s.engine} was built from {name} (sha256 {str(want)[:16]}…), not from --onnx "
                          f"{s.onnx}; {hint}")
    found = _find_source(s, name, want)
    if found is None:
        raise ConfigError(f"--engine {s.engine} was built from {name} (sha256 {str(want)[:16]}…), which is neither "
                          f"beside the plan nor in {s.checkpoint / 'export'}; pass it as --onnx FILE")
    return found


def _find_source(s: ParitySettings, name: str, sha: str) -> Path | None:
    from ddpm_deploy.runtime.fileio import sha256_file

    for folder in dict.fromkeys([s.engine.parent, s.checkpoint / "export"]):
        for cand in [folder / name, *sorted(folder.glob("*.onnx"))]:
            if cand.is_file() and sha256_file(cand) == sha:
                return cand
    return None


def run_parity(s: ParitySettings, echo: Callable[[str], None] = lambda m: None) -> ParityReport:
    if s.batch <= 0:
        raise ConfigError(f"--batch must be positive, found {s.batch}")
    if s.device not in ("cpu", "cuda"):
        raise ConfigError(f"--device must be cpu or cuda, found {s.device!r}")
    start = time.perf_counter()
    if s.threads:
        torch.set_num_threads(s.threads)
    onnx_path = onnx_for(s)  # before minutes of work: the plan's own source ONNX, or a refusal naming it
    ref = load_reference(s.checkpoint, s.weights)
    plan = plan_of(ref.card, s)  # validates --steps and the scheduler options
    cards: dict[str, dict] = {}
    if onnx_path is not None:
        from ddpm_deploy.export.onnx_io import read_card

        card = read_card(onnx_path)
        if card is None:
            raise ArtifactError(f"{onnx_path}: has no ddpm-deploy metadata; export it with ddpm-export")
        cards[f"ONNX {onnx_path.name}"] = card.diffusion.to_dict()
    engine, problems = None, []
    if s.engine is not None:
        engine, problems = _engine_info(s.engine, onnx_path)
        cards[f"plan {s.engine.name}"] = engine["sidecar"].ddpm["diffusion"]
    levels: list[LevelResult] = []
    echo("L0 schedule …")
    levels += level0(ref.card, s.steps, cards)
    if problems:
        levels.append(LevelResult("L0 schedule", "plan sidecar", "--onnx", "fail", "; ".join(problems)))
    echo("L1 step …")
    if plan.scheduler == "DDPMScheduler":
        levels += level1(ref.card.diffusion, s.steps, s.seed)
    levels.append(level1_scheduler(ref.card, plan, s.seed))
    if onnx_path is None:
        why = f"no --onnx given and {s.checkpoint / 'export' / 'model.onnx'} does not exist"
        levels += [LevelResult("L2 eps", "onnxruntime-cpu", "pytorch", "skipped", why, runner="OrtRunner"),
                   LevelResult("L3 trajectory", "onnxruntime-cpu", "reference loop", "skipped", why,
                               runner="OrtRunner + HostLoop")]
    else:
        echo("L2 eps (Polygraphy Comparator) …")
        levels += level2(ref, onnx_path, tuple(sorted({1, s.batch})), s.seed, engine, s.threads, s.backend)
        echo(f"L3 trajectory ({plan.scheduler}, {len(plan)} steps, batch {s.batch}) …")
        levels.append(level3(ref, onnx_path, plan, s.batch, s.seed, s.threads, s.backend))
    echo("L4 backend …")
    levels += level4(ref, onnx_path, engine, s.steps, s.batch, s.seed, s.threads, s.device, s.backend, s)
    failed = [lv for lv in levels if lv.status == "fail"]
    from ddpm_deploy.runtime.fileio import sha256_file

    return ParityReport(
        passed=not failed, failed=[f"{lv.level} [{lv.backend} vs {lv.reference}]" for lv in failed],
        checkpoint=str(s.checkpoint), reference=ref.kind, onnx=str(onnx_path) if onnx_path else None,
        engine=str(s.engine) if s.engine else None, device=s.device,
        steps=len(plan), batch=s.batch, seed=s.seed,
        diffusion=ref.card.diffusion.to_dict(),
        tolerances={k: getattr(tol, k) for k in dir(tol) if k[:2] in ("L0", "L1", "L2", "L3", "L4")},
        levels=[lv.to_dict() for lv in levels], seconds=time.perf_counter() - start,
        environment={"python": platform.python_version(), "gpu": gpu_status()[1]},
        model_sha256=sha256_file(onnx_path) if onnx_path else None,
    )


def _fmt(v) -> str:
    return "—" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)


def to_markdown(rep: ParityReport) -> str:
    rep = rep.to_dict()
    lines = [f"# Parity report: {'PASS' if rep['passed'] else 'FAIL'}", "",
             f"checkpoint `{rep['checkpoint']}` ({rep['reference']}), ONNX `{rep['onnx']}`, engine `{rep['engine']}`, "
             f"device {rep['device']}; "
             f"{rep['steps']} steps, batch {rep['batch']}, seed {rep['seed']}; {rep['seconds']:.1f} s", ""]
    if rep["failed"]:
        lines += ["**Failed:** " + "; ".join(rep["failed"]), ""]
    lines += ["max abs / rel L2: of each level's checks (L0: relative error per condition number; L1: per unit of the "
              "step's magnitude; L2, L3: ε and x_0).", "",
              "| level | backend | runner | reference | status | max abs | rel L2 | worst check | note |",
              "|---|---|---|---|---|---|---|---|---|"]
    for lv in rep["levels"]:
        worst = max(lv["checks"], key=lambda c: (not c["passed"], c["max_abs"] / (c["tolerance"] or 1)), default=None)
        w = f"{worst['name']}: {_fmt(worst['max_abs'])} (tol {worst['tolerance']:g})" if worst else ""
        note = lv["reason"] or ("PSNR %.1f dB" % lv["metrics"]["psnr_db"] if "psnr_db" in lv["metrics"] else "")
        lines.append(f"| {lv['level']} | {lv['backend']} | {lv['runner']} | {lv['reference']} | {lv['status']} | "
                     f"{_fmt(lv['max_abs'])} | "
                     f"{_fmt(lv['rel_l2'])} | {w} | {note} |")
    for lv in rep["levels"]:
        for key, what in (("buckets", "same inputs"), ("eps_along_trajectories_buckets", "along the two trajectories")):
            rows = lv["metrics"].get(key)
            if rows:
                lines += ["", f"### {lv['level']}, {lv['backend']}: ε error per timestep bucket ({what})",
                          "", "| t | n | max abs | rel L2 |", "|---|---|---|---|"]
                lines += [f"| {r['t_range'][0]}–{r['t_range'][1]} | {r['n']} | {r['max_abs']:.3g} | {r['rel_l2']:.3g} |"
                          for r in rows]
    lines += ["", "Tolerances (runtime/tolerances.py): " + ", ".join(f"{k} = {v:g}" for k, v in rep["tolerances"].items()), ""]
    return "\n".join(lines)


def report_outputs(out: Path, overwrite: bool):
    """parity.json and parity.md of one run, claimed before the work (runtime.outputs)."""
    from ddpm_deploy.runtime.outputs import Outputs

    return Outputs("ddpm-run parity", [out / "parity.json", out / "parity.md"], overwrite,
                   hint="choose another --out").claim()


def write_reports(rep: ParityReport, out: Path, outputs=None) -> tuple[Path, Path]:
    outputs = outputs or report_outputs(out, overwrite=True)
    with outputs as w:
        rep.save(w.stage(out / "parity.json"))
        atomic_write_text(w.stage(out / "parity.md"), to_markdown(rep))
    return out / "parity.json", out / "parity.md"
