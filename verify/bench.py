"""The benchmark harness (`ddpm-run bench`): our runtime against the tools users would pick instead.

Each (model, backend, batch) measurement runs in a fresh spawned process, so peak RSS is its own and one
backend's threads or caches never colour another's numbers. Medians after warm-up; wall-clock on the CPU
(CUDA events on a GPU, where the GPU harness runs).
"""

from __future__ import annotations

import logging
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from ddpm_deploy.runtime.contract import BenchResults, package_versions
from ddpm_deploy.runtime.fileio import atomic_write_bytes, atomic_write_text
from ddpm_deploy.runtime.cpu import FLAGS_OF_INTEREST as CPU_FLAGS_OF_INTEREST  # noqa: F401  (one list, one reader)
from ddpm_deploy.runtime.cpu import cpu_flags
from ddpm_deploy.verify.models import random_preset_model, random_preset_onnx

log = logging.getLogger(__name__)

CPU_BACKENDS = ("ort-cpu", "openvino-fp32", "openvino-bf16", "openvino-int8", "openvino-int8-bf16", "openvino-bands",
                "torch-eager-fp32", "torch-eager-bf16", "torch-compile-fp32", "diffusers-loop")
PRESETS = ("tiny", "ddpm-cifar10")


def _median_ms(fn, warmup: int, repeat: int, min_seconds: float = 0.0) -> float:
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < repeat or (time.perf_counter() - start < min_seconds and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _model(preset: str, seed: int = 0):
    return random_preset_model(preset, seed)


DEFAULT_BANDS = "bf16:0-99,int8-bf16:100-999"  # backend openvino-bands: what --precision auto runs (README)
SWEEP = 20  # openvino-bands: timesteps per measured repeat


def _onnx_for(preset: str, workdir: Path) -> Path:
    return random_preset_onnx(preset, workdir / f"{preset}.onnx")[0]


def _int8_for(preset: str, onnx_path: Path) -> Path:
    """The NNCF int8 IR of the preset's random-weights ONNX (calibrated on digits at the preset's size)."""
    from ddpm_deploy.export.int8 import INT8_XML_NAME, export_int8

    out = onnx_path.parent / f"{preset}-int8"
    if not (out / INT8_XML_NAME).is_file():
        export_int8(onnx_path, out, dataset="digits")
    return out / INT8_XML_NAME


def _diffusers_unet(preset: str):
    """A diffusers UNet2DModel with the same block structure as our preset (google/ddpm-cifar10-32 style)."""
    import torch
    from diffusers import UNet2DModel

    from ddpm_deploy.trainer.presets import get_preset

    cfg = get_preset(preset).unet
    down, up = [], []
    res = cfg.image_size
    for level in range(len(cfg.ch_mult)):
        down.append("AttnDownBlock2D" if res in cfg.attn_resolutions else "DownBlock2D")
        res //= 2
    up = ["AttnUpBlock2D" if t == "AttnDownBlock2D" else "UpBlock2D" for t in reversed(down)]
    torch.manual_seed(0)
    return UNet2DModel(sample_size=cfg.image_size, in_channels=cfg.in_channels, out_channels=cfg.in_channels,
                       block_out_channels=tuple(cfg.ch * m for m in cfg.ch_mult), layers_per_block=cfg.num_res_blocks,
                       down_block_types=tuple(down), up_block_types=tuple(up), norm_num_groups=cfg.norm_groups,
                       norm_eps=cfg.norm_eps, dropout=cfg.dropout, flip_sin_to_cos=False, freq_shift=1,
                       resnet_time_scale_shift="default", add_attention=True).eval()


def measure(job: dict[str, Any]) -> dict[str, Any]:
    """One measurement, in its own process. job: preset, backend, batch, warmup, repeat, workdir, threads."""
    threads = job.get("threads") or os.cpu_count()
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    preset, backend, b = job["preset"], job["backend"], job["batch"]
    out: dict[str, Any] = {"preset": preset, "backend": backend, "batch": b}
    rng = np.random.default_rng(0)
    from ddpm_deploy.trainer.presets import get_preset

    cfg = get_preset(preset).unet
    x = rng.standard_normal((b, cfg.in_channels, cfg.image_size, cfg.image_size)).astype(np.float32)
    t = np.full((b,), 500, np.int32)
    warm, rep = job["warmup"], job["repeat"]
    if backend == "openvino-bands":  # a precision per timestep band: ms per ε call over a sweep of timesteps
        from ddpm_deploy.runtime.backends.banded import BandedRunner, parse_bands
        from ddpm_deploy.runtime.backends.base import open_runner

        onnx_path = _onnx_for(preset, Path(job["workdir"]))
        bands = parse_bands(job.get("bands") or DEFAULT_BANDS, 1000)
        runners = {}
        for key in dict.fromkeys(k for _, _, k in bands):
            path = _int8_for(preset, onnx_path) if key.startswith("int8") else onnx_path
            runners[key] = open_runner(path, "cpu", backend="openvino", threads=threads, cache_dir=False,
                                       precision="bf16" if key in ("bf16", "int8-bf16") else "fp32")
        runner = BandedRunner(runners, bands)
        sweep = [np.full((b,), v, np.int32) for v in np.linspace(0, 999, SWEEP).round().astype(int)]
        out["eps_ms"] = _median_ms(lambda: [runner.eps(x, ts) for ts in sweep], warm, rep) / SWEEP
        out["runner"], out["precision"] = type(runner).__name__, runner.precision
        out["note"] = f"mean over {SWEEP} timesteps evenly spread over 0-999 (the mix of a sampling run)"
    elif backend.startswith("openvino-"):
        from ddpm_deploy.runtime.backends.base import open_runner

        precision = backend.split("-", 1)[1]
        onnx_path = _onnx_for(preset, Path(job["workdir"]))
        if precision in ("int8", "int8-bf16"):  # int8-bf16: the int8 model's float-kept layers in bf16
            runner = open_runner(_int8_for(preset, onnx_path), "cpu", threads=threads, cache_dir=False,
                                 precision="bf16" if precision == "int8-bf16" else "fp32")
        else:
            runner = open_runner(onnx_path, "cpu", backend="openvino", precision=precision, threads=threads,
                                 cache_dir=False)
        out["eps_ms"] = _median_ms(lambda: runner.eps(x, t), warm, rep)
        out["runner"], out["precision"] = type(runner).__name__, runner.precision  # what OpenVINO really ran
    elif backend == "ort-cpu":
        from ddpm_deploy.runtime.backends.base import open_runner
        from ddpm_deploy.runtime.sampling.open import open_loop

        runner = open_runner(_onnx_for(preset, Path(job["workdir"])), "cpu", threads=threads)
        out["eps_ms"] = _median_ms(lambda: runner.eps(x, t), warm, rep)
        out["runner"] = type(runner).__name__
        if job.get("e2e_steps"):
            from ddpm_deploy.runtime.sampling.config import plan_for
            from ddpm_deploy.runtime.schedule import DiffusionConfig

            loop = open_loop(runner, x.shape[1:], max_batch=b)
            per_scheduler = {}
            for name in job.get("schedulers") or ("ddpm",):  # the loop's own cost for every scheduler
                sched = plan_for(DiffusionConfig(), name, steps=job["e2e_steps"])
                t0 = time.perf_counter()
                _, tm = loop.sample(sched, seed=0, indices=np.arange(b))
                wall = time.perf_counter() - t0
                s = tm.summary()
                per_scheduler[name] = {"steps": len(sched), "seconds": wall, "eps_seconds": s["eps_seconds"],
                                       "loop_overhead_ratio": wall / s["eps_seconds"],
                                       "images_per_s": b / wall}
            first = per_scheduler.get("ddpm") or next(iter(per_scheduler.values()))  # the 1000-step figures: DDPM's
            out.update(e2e_steps=first["steps"], e2e_seconds=first["seconds"], e2e_eps_seconds=first["eps_seconds"],
                       loop_overhead_ratio=first["loop_overhead_ratio"],
                       images_per_s_1000_steps=b / (first["seconds"] / first["steps"] * 1000),
                       e2e_schedulers=per_scheduler)
    else:
        import torch

        torch.set_num_threads(threads)
        xt, tt = torch.from_numpy(x), torch.from_numpy(t)
        if backend == "diffusers-loop":
            from diffusers import DDPMScheduler

            m = _diffusers_unet(preset)
            sch = DDPMScheduler(num_train_timesteps=1000)
            sch.set_timesteps(1000)

            def step():
                with torch.no_grad():
                    eps = m(xt, 500).sample
                    sch.step(eps, 500, xt)

            out["eps_ms"] = _median_ms(step, warm, rep)
        else:
            m, _ = _model(preset)
            if backend == "torch-compile-fp32":
                t0 = time.perf_counter()
                m = torch.compile(m)
                with torch.no_grad():
                    m(xt, tt)
                out["compile_seconds"] = time.perf_counter() - t0
            bf16 = backend == "torch-eager-bf16"
            if bf16:
                from ddpm_deploy.runtime.cpu import cpu_precisions

                cpu = cpu_precisions()
                if not cpu.native_bf16:  # PyTorch's autocast runs bf16 anyway, emulated: 80-120x slower than fp32
                    out["emulated"] = (f"bf16 emulated: this CPU has no AVX512_BF16/AMX (flags: "
                                       f"{', '.join(cpu.flags) or 'unknown'})")

            def call():
                with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    m(xt, tt)

            out["eps_ms"] = _median_ms(call, warm, rep)
    out["ms_per_image_step"] = out["eps_ms"] / b
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def machine_info() -> dict[str, Any]:
    info = {"platform": platform.platform(), "machine": platform.machine(), "python": platform.python_version(),
            "cpus": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info["versions"] = package_versions()
    info["cpu_flags"] = cpu_flags()
    return info


def load_average() -> list[float] | None:
    """The machine's 1/5/15-minute load average (``os.getloadavg``; None where the OS has none)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def load_warning(load: list[float] | None, cpus: int | None) -> str | None:
    """A warning when the 1-minute load average exceeds the core count: other work is competing for the cores and
    the numbers measured now are low (a benchmark under load gave numbers up to 144× off the README)."""
    if not load or not cpus or load[0] <= cpus:
        return None
    return (f"load average {load[0]:.2f} exceeds the {cpus} cores of this machine: other processes compete for the "
            f"CPU, so these numbers understate it; measure again on an idle machine")


def record_load(machine: dict[str, Any], phase: str, echo=None) -> dict[str, Any]:
    """Record the load average in a benchmark's ``machine`` record as ``load_average_<phase>`` (phase "before" /
    "after"); a load above the core count is warned about on stderr and listed in ``machine["load_warnings"]``.
    Every benchmark that writes results.json calls it before and after measuring. Returns ``machine``."""
    load = load_average()
    machine[f"load_average_{phase}"] = load
    machine.setdefault("cpus", os.cpu_count())
    warning = load_warning(load, os.cpu_count())
    if warning:
        machine.setdefault("load_warnings", []).append(f"{phase}: {warning}")
        (echo or (lambda m: print(m, file=sys.stderr, flush=True)))(f"warning: {warning}")
    return machine


def load_text(machine: dict[str, Any]) -> str:
    """'load average before [..], after [..]' for a results.md header (with the warning, if any)."""
    text = f"load average before {machine.get('load_average_before')}, after {machine.get('load_average_after')}"
    warnings = machine.get("load_warnings")
    return text + (f" (**warning**: {warnings[0].split(': ', 1)[1]})" if warnings else "")




def run(out_dir: Path, presets=PRESETS, backends=CPU_BACKENDS, batches=(1, 8, 64), warmup: int = 2, repeat: int = 5,
        e2e_steps: int = 50, threads: int = 0, max_batch: dict[str, int] | None = None, echo=print,
        with_engine_builds: bool = True, schedulers: tuple[str, ...] = ("ddpm",), bands: str | None = None) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    load = record_load({}, "before")
    with tempfile.TemporaryDirectory() as work:
        ctx = get_context("spawn")
        for preset in presets:
            for backend in backends:
                for b in batches:
                    if max_batch and b > max_batch.get(preset, b):
                        continue
                    job = dict(preset=preset, backend=backend, batch=b, warmup=warmup, repeat=repeat, workdir=work,
                               threads=threads, e2e_steps=e2e_steps if backend == "ort-cpu" else 0,
                               schedulers=list(schedulers), bands=bands)
                    with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as ex:
                        try:
                            r = ex.submit(measure, job).result()
                        except Exception as e:  # one failing peer must not sink the run; record why
                            r = {**{k: job[k] for k in ("preset", "backend", "batch")}, "error": f"{type(e).__name__}: {e}"}
                    results.append(r)
                    echo(f"{preset:13s} {backend:20s} b={b:<4d} " +
                         (f"{r['eps_ms']:9.2f} ms/step  {r['ms_per_image_step']:8.3f} ms/img-step  "
                          f"rss {r['peak_rss_mb']:.0f} MB" if "eps_ms" in r else r["error"]))
        builds = engine_builds(presets, Path(work), echo) if with_engine_builds else []
    machine = record_load({**machine_info(), **load}, "after")
    bench = BenchResults(machine=machine, engine_builds=builds, date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                         warmup=warmup, repeat=repeat, statistic="median", command=" ".join(sys.argv), results=results)
    bench.save(out_dir / "results.json")
    doc = bench.to_dict()
    atomic_write_text(out_dir / "results.md", markdown(doc))
    plot(doc, out_dir / "images_per_s.png")
    return doc


def engine_builds(presets, work: Path, echo=print) -> list[dict[str, Any]]:
    """Engine build time per preset and precision, with whichever TensorRT flavour is installed (TensorRT-RTX
    builds without a GPU). fp16 means the calibrated mixed-precision ONNX of ``ddpm-export --fp16``."""
    rows: list[dict[str, Any]] = []
    try:
        from ddpm_deploy.export.engine import EngineSettings, build_engine, load_tensorrt

        load_tensorrt("auto")
    except Exception as e:  # no TensorRT flavour here: say so in the results
        return [{"error": f"no engine builds: {e}"}]
    for preset in presets:
        onnx_path = _onnx_for(preset, work)
        sources = [("fp32", onnx_path)]
        try:
            from ddpm_deploy.export.fp16 import export_fp16

            fp16_path, _ = export_fp16(onnx_path, work / f"{preset}-fp16", dataset="digits")
            sources.append(("fp16", fp16_path))
        except Exception as e:
            rows.append({"preset": preset, "precision": "fp16", "error": f"{type(e).__name__}: {e}"})
        for precision, src in sources:
            side = build_engine(src, work / f"{preset}-{precision}.plan", EngineSettings(batch_opt=8, batch_max=64))
            rows.append({"preset": preset, "precision": precision, "flavour": side.trt["flavour"],
                         "version": side.trt["version"], "seconds": side.build["seconds"],
                         "plan_mb": side.plan["bytes"] / 1e6, "gpu": side.gpu})
            echo(f"{preset:13s} engine {precision}: built in {side.build['seconds']:.1f}s "
                 f"({side.trt['flavour']} {side.trt['version']}, {side.plan['bytes'] / 1e6:.1f} MB)")
    return rows


def markdown(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    flags = m.get("cpu_flags")
    flag_text = "" if flags is None else f" (CPU flags that set fp32/bf16/int8 speed: {', '.join(flags) or 'none'})"
    lines = [f"Machine: {m.get('cpu', m['machine'])}{flag_text}, {m['cpus']} CPUs; {load_text(m)}; {doc['date']}; median "
             f"of {doc['repeat']} after {doc['warmup']} warm-up calls; versions {m['versions']}", ""]
    lines += ["| model | backend | batch | ε ms/step | ms per image-step | vs torch eager fp32 | peak RSS MB | notes |",
              "|---|---|---:|---:|---:|---:|---:|---|"]
    eager = {(r["preset"], r["batch"]): r.get("eps_ms") for r in doc["results"] if r["backend"] == "torch-eager-fp32"}
    for r in doc["results"]:
        if "eps_ms" not in r:
            lines.append(f"| {r['preset']} | {r['backend']} | {r['batch']} | – | – | – | – | {r['error'][:80]} |")
            continue
        ref = eager.get((r["preset"], r["batch"]))
        notes = []
        if "loop_overhead_ratio" in r:
            notes.append(f"loop overhead ×{r['loop_overhead_ratio']:.3f} ({r['e2e_steps']} steps); "
                         f"{r['images_per_s_1000_steps']:.3f} img/s at 1000 steps")
            others = {k: v for k, v in (r.get("e2e_schedulers") or {}).items() if k != "ddpm"}
            if others:
                notes.append("; ".join(f"{k} ×{v['loop_overhead_ratio']:.3f}" for k, v in others.items()))
        if "compile_seconds" in r:
            notes.append(f"compile {r['compile_seconds']:.0f}s")
        if r.get("emulated"):
            notes.append(f"**not a speed**: {r['emulated']}")
        if r.get("precision") and r["backend"].startswith("openvino-"):
            notes.append(f"ran {r['precision']}")
        if r.get("note"):
            notes.append(r["note"])
        lines.append(f"| {r['preset']} | {r['backend']} | {r['batch']} | {r['eps_ms']:.2f} | {r['ms_per_image_step']:.3f} "
                     f"| {'%.2f' % (r['eps_ms'] / ref) if ref else '–'} | {r['peak_rss_mb']:.0f} | {'; '.join(notes)} |")
    builds = doc.get("engine_builds") or []
    if builds:
        lines += ["", "| model | engine precision | flavour | build s | plan MB |", "|---|---|---|---:|---:|"]
        for b in builds:
            if "seconds" in b:
                lines.append(f"| {b['preset']} | {b['precision']} | {b['flavour']} {b['version']} | {b['seconds']:.1f} "
                             f"| {b['plan_mb']:.1f} |")
            else:
                lines.append(f"| {b.get('preset', '–')} | {b.get('precision', '–')} | {b['error'][:100]} | – | – |")
    return "\n".join(lines) + "\n"


def plot(doc: dict[str, Any], path: Path) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    presets = sorted({r["preset"] for r in doc["results"]})
    fig, axes = plt.subplots(1, len(presets), figsize=(5.5 * len(presets), 4), dpi=100, squeeze=False)
    for ax, preset in zip(axes[0], presets):
        for backend in sorted({r["backend"] for r in doc["results"]}):
            rows = sorted((r for r in doc["results"] if r["preset"] == preset and r["backend"] == backend
                           and "eps_ms" in r), key=lambda r: r["batch"])
            if rows:  # images/s for a 1000-step sampling run, from the ε time per step
                ax.plot([r["batch"] for r in rows], [r["batch"] / (r["eps_ms"] * 1e-3 * 1000) for r in rows],
                        marker="o", label=backend)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch")
        ax.set_ylabel("images/s (1000 steps, ε time)")
        ax.set_title(preset)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
