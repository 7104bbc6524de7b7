"""Per-image speed of a fast scheduler: ours (ONNX Runtime fp32, OpenVINO bf16 where the CPU has it) against
diffusers' same scheduler class driving the PyTorch UNet (fp32, and bf16 autocast), same model structure (random
weights of a preset), same ε calls and batch, one process per row; and the loop's own share of every row of ours
(loop overhead: wall time / time in ε calls). Writes results.json and results.md.

    python -m ddpm_deploy.verify.scheduler_speed --preset ddpm-cifar10 --batch 8 --steps 20 \\
        --out benchmarks/results/cpu-scheduler-speed
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from ddpm_deploy.runtime.fileio import atomic_write_text

SCHEDULERS = ("ddim", "dpmsolver++", "sde-dpmsolver++", "unipc")
OURS = ("ours ort-cpu fp32", "ours openvino bf16")
THEIRS = ("diffusers + torch fp32", "diffusers + torch bf16 autocast")


def row(job: dict[str, Any]) -> dict[str, Any]:
    """One row, in its own process: sample one batch along the scheduler's plan (after one warm-up batch)."""
    threads = job["threads"] or os.cpu_count()
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    from ddpm_deploy.runtime.sampling.config import plan_for
    from ddpm_deploy.runtime.schedule import DiffusionConfig
    from ddpm_deploy.verify.bench import _onnx_for

    kind, name, b, steps = job["kind"], job["scheduler"], job["batch"], job["steps"]
    plan = plan_for(DiffusionConfig(), name, steps)
    out: dict[str, Any] = {"kind": kind, "scheduler": name, "batch": b, "eps_calls": len(plan)}
    idx = np.arange(b)
    if kind.startswith("ours"):
        from ddpm_deploy.runtime.backends.base import open_runner
        from ddpm_deploy.runtime.sampling.open import open_loop

        onnx = _onnx_for(job["preset"], Path(job["workdir"]))
        if "openvino" in kind:
            runner = open_runner(onnx, "cpu", backend="openvino", precision="bf16", threads=threads, cache_dir=False)
        else:
            runner = open_runner(onnx, "cpu", threads=threads)
        out["precision"] = runner.precision  # what really ran (OpenVINO runs f32 on a CPU without bf16)
        loop = open_loop(runner, runner.sample_shape, max_batch=b)
        loop.sample(plan, 1, idx)  # warm-up
        t0 = time.perf_counter()
        _, tm = loop.sample(plan, 0, idx)
        wall = time.perf_counter() - t0
        s = tm.summary()
        out.update(seconds=wall, eps_seconds=s["eps_seconds"], loop_overhead_ratio=wall / s["eps_seconds"])
    else:
        import torch

        from ddpm_deploy.verify.bench import _model
        from ddpm_deploy.verify.diffusers_ref import diffusers_scheduler

        torch.set_num_threads(threads)
        model, _ = _model(job["preset"])
        bf16 = "bf16" in kind
        import inspect

        sched, step_kw = diffusers_scheduler(plan, DiffusionConfig())
        shape = (b, *job["shape"])
        takes_generator = "generator" in inspect.signature(sched.step).parameters

        def run(seed):
            g = torch.Generator().manual_seed(seed)
            x = torch.randn(shape, generator=g)
            sched.set_timesteps(len(plan))
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                for t in sched.timesteps:  # a diffusers pipeline's loop
                    eps = model(x, torch.full((b,), int(t), dtype=torch.int32)).float()
                    kw = {"generator": g, **step_kw} if takes_generator else step_kw
                    x = sched.step(eps, t, x, **kw).prev_sample
            return x

        run(1)  # warm-up
        t0 = time.perf_counter()
        run(0)
        out.update(seconds=time.perf_counter() - t0, precision="bf16 autocast" if bf16 else "fp32")
    out["seconds_per_image"] = out["seconds"] / b
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="ddpm-cifar10")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--schedulers", default=",".join(SCHEDULERS))
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)

    from ddpm_deploy.trainer.presets import get_preset
    from ddpm_deploy.verify.bench import machine_info, record_load

    cfg = get_preset(args.preset).unet
    shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
    rows = []
    load = record_load({}, "before")
    with tempfile.TemporaryDirectory() as work:
        ctx = get_context("spawn")
        for name in args.schedulers.split(","):
            for kind in (*OURS, *THEIRS):
                job = dict(kind=kind, scheduler=name, batch=args.batch, steps=args.steps, threads=args.threads,
                           preset=args.preset, workdir=work, shape=shape)
                load = os.getloadavg()[0]
                with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as ex:
                    try:
                        r = ex.submit(row, job).result()
                    except Exception as e:  # a failing row is recorded, not fatal
                        r = {"kind": kind, "scheduler": name, "error": f"{type(e).__name__}: {e}"}
                r["load_before"] = load
                rows.append(r)
                print(f"{name:16s} {kind:34s} " + (f"{r['seconds_per_image']:.3f} s/image" + (
                    f", loop overhead ×{r['loop_overhead_ratio']:.4f}" if "loop_overhead_ratio" in r else "")
                    if "seconds" in r else r["error"]), file=sys.stderr, flush=True)
    machine = record_load({**machine_info(), **load}, "after")
    result = {"preset": args.preset, "batch": args.batch, "steps": args.steps, "machine": machine,
              "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "rows": rows,
              "command": " ".join(["python -m ddpm_deploy.verify.scheduler_speed", *(argv or sys.argv[1:])])}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "results.json", json.dumps(result, indent=2, default=str))
    atomic_write_text(args.out / "results.md", table(result))
    print(f"wrote {args.out}/results.json, results.md", file=sys.stderr)
    return 0


def table(result: dict) -> str:
    lines = [f"{result['preset']}, batch {result['batch']}, {result['steps']} ε calls per image; seconds per image "
             f"(lower is better); the ratio is diffusers + torch bf16 autocast / ours.", "",
             "| scheduler | " + " | ".join((*OURS, *THEIRS)) + " | loop overhead (ours, ort) | bf16 torch / ours best |",
             "|---|" + "---:|" * (len(OURS) + len(THEIRS) + 2)]
    by = {}
    for r in result["rows"]:
        by.setdefault(r["scheduler"], {})[r["kind"]] = r
    for name, rs in by.items():
        cells = [f"{rs[k]['seconds_per_image']:.3f}" + (" (f32 ran)" if rs[k].get("precision") == "fp32" and "bf16" in k
                                                         else "") if "seconds_per_image" in rs.get(k, {}) else "—"
                 for k in (*OURS, *THEIRS)]
        ort = rs.get(OURS[0], {})
        over = f"×{ort['loop_overhead_ratio']:.4f}" if "loop_overhead_ratio" in ort else "—"
        best = min((rs[k]["seconds_per_image"] for k in OURS if "seconds_per_image" in rs.get(k, {})), default=None)
        ref = rs.get(THEIRS[1], {}).get("seconds_per_image")
        ratio = f"{ref / best:.2f}×" if best and ref else "—"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {over} | {ratio} |")
    from ddpm_deploy.verify.bench import load_text

    m = result["machine"]
    lines += ["", f"Machine: {m.get('cpu', '?')}, {m.get('cpus')} cores, CPU flags {', '.join(m.get('cpu_flags', []))}; "
              f"{result['date']}; {load_text(m)}. Load average before each row is in results.json."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
