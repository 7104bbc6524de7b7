"""What a CPU precision costs in samples, and what it buys in speed: the same seeds and indices sampled in fp32 and
in each lower precision, with the same noise.

    python -m ddpm_deploy.verify.fidelity --onnx runs/latest/export/model.onnx [--int8 model.int8.xml] \\
        --num 64 --batch 8 --out benchmarks/results/cpu-openvino-fidelity

Rows (each a runner through the shipped host loop): ONNX Runtime fp32 seed S (the reference), ONNX Runtime fp32 seed
S+1 (the spread between two fp32 seeds: what "the same quality" may differ by), OpenVINO fp32, OpenVINO bf16, OpenVINO
int8. For each: ms per step (median ε call at the batch), images vs the reference with the same noise (PSNR median and
min, max abs of x_0), and for 1-channel digits models the digits-classifier score (``trainer.quality``). A precision
whose score drops by more than the fp32-seed spread is reported, not offered. Results: results.json (BenchResults) +
results.md, with the CPU flags.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np

from ddpm_deploy.runtime.backends.base import open_runner
from ddpm_deploy.runtime.contract import BenchResults
from ddpm_deploy.runtime.fileio import atomic_write_text
from ddpm_deploy.runtime.imageio import to_uint8
from ddpm_deploy.runtime.sampling.config import plan_for
from ddpm_deploy.runtime.sampling.open import open_loop


def psnr_per_image(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """PSNR (dB) of each pair of [-1, 1] images mapped to [0, 1]; inf where identical."""
    ua = np.clip((a.astype(np.float64) + 1) / 2, 0, 1)
    ub = np.clip((b.astype(np.float64) + 1) / 2, 0, 1)
    mse = ((ua - ub) ** 2).reshape(len(a), -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        return np.where(mse == 0, np.inf, 10 * np.log10(1.0 / np.maximum(mse, 1e-300)))


def sample_all(runner, schedule, shape, seed: int, num: int, batch: int):
    """All ``num`` images with the shipped host loop; returns (x0 float32 [N,C,H,W], median ε ms at ``batch``)."""
    xs, eps_ms = [], []
    with open_loop(runner, shape, max_batch=batch) as loop:
        for lo in range(0, num, batch):
            x, tm = loop.sample(schedule, seed, np.arange(lo, min(lo + batch, num)))
            xs.append(x)
            if lo + batch <= num:  # full batches only: the speed at `batch`
                eps_ms.append(tm.summary()["eps_ms_median"])
    return np.concatenate(xs), float(np.median(eps_ms)) if eps_ms else float("nan")


def quality(x: np.ndarray, value_range) -> dict | None:
    if x.shape[1] != 1:
        return None
    try:
        from ddpm_deploy.trainer.quality import evaluate
    except ImportError:
        return None
    u8 = np.ascontiguousarray(to_uint8(x, value_range))
    return evaluate(u8)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--onnx", type=Path, required=True, help="the fp32 ONNX (ddpm-export)")
    ap.add_argument("--int8", type=Path, default=None, help="the int8 IR (ddpm-export --int8); default: beside --onnx")
    ap.add_argument("--num", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=None, help="respaced steps (default: all T)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rows", default="ref,spread,ov-fp32,ov-bf16,int8",
                    help="rows to run, comma-separated (ref is always run: the others are compared with it); skip "
                         "ov-fp32/ov-bf16 where they only repeat fp32 (ov-bf16 on a CPU without bf16 runs fp32)")
    args = ap.parse_args(argv)

    from ddpm_deploy.verify.bench import machine_info, record_load

    load = record_load({}, "before")
    ref_runner = open_runner(args.onnx, "cpu", threads=args.threads)
    card = ref_runner.card
    shape = (card.data.channels, card.data.image_size, card.data.image_size)
    sched = plan_for(card.diffusion, "ddpm", steps=args.steps)
    int8 = args.int8 or args.onnx.with_name("model.int8.xml")
    wanted = {r.strip() for r in args.rows.split(",")} | {"ref"}
    unknown = wanted - {"ref", "spread", "ov-fp32", "ov-bf16", "int8"}
    if unknown:
        ap.error(f"--rows: unknown rows {sorted(unknown)}")
    rows_spec = [("ref", "onnxruntime fp32 (reference)", lambda: ref_runner, args.seed),
                 ("spread", "onnxruntime fp32, next seed (spread)", lambda: ref_runner, args.seed + 1),
                 ("ov-fp32", "openvino fp32",
                  lambda: open_runner(args.onnx, "cpu", backend="openvino", threads=args.threads), args.seed),
                 ("ov-bf16", "openvino bf16 hint", lambda: open_runner(args.onnx, "cpu", backend="openvino",
                                                                       precision="bf16", threads=args.threads), args.seed)]
    if int8.is_file():
        rows_spec.append(("int8", "openvino int8 (NNCF)", lambda: open_runner(int8, "cpu", threads=args.threads),
                          args.seed))
    rows_spec = [(label, make, seed) for key, label, make, seed in rows_spec if key in wanted]
    results, ref = [], None
    for label, make, seed in rows_spec:
        runner = make()
        t0 = time.perf_counter()
        x, ms = sample_all(runner, sched, shape, seed, args.num, args.batch)
        row = {"row": label, "runner": type(runner).__name__, "precision": runner.precision, "seed": seed,
               "eps_ms": ms, "seconds": time.perf_counter() - t0, "steps": len(sched), "batch": args.batch,
               "num": args.num}
        if ref is None:
            ref = x
        else:
            p = psnr_per_image(x, ref)
            row.update(psnr_db_median=float(np.median(p)), psnr_db_min=float(p.min()),
                       max_abs=float(np.abs(x - ref).max()))
        q = quality(x, card.data.value_range)
        if q is not None:
            row["quality_confident_share"] = q["confident_share"]
        results.append(row)
        print(f"{label:40s} {ms:8.2f} ms/step  " + (f"PSNR median {row['psnr_db_median']:.1f} dB min "
              f"{row['psnr_db_min']:.1f} dB  " if "psnr_db_median" in row else "") +
              (f"quality {row['quality_confident_share']:.0%}" if "quality_confident_share" in row else ""), flush=True)
    spread = None
    has_spread = len(results) > 1 and results[1]["row"].startswith("onnxruntime fp32, next seed")
    if has_spread and "quality_confident_share" in results[0] and "quality_confident_share" in results[1]:
        spread = abs(results[0]["quality_confident_share"] - results[1]["quality_confident_share"])
        for r in results[2:]:
            drop = results[0]["quality_confident_share"] - r.get("quality_confident_share", math.nan)
            r["quality_drop"] = drop
            r["offered"] = bool(drop <= spread)
    machine = record_load({**machine_info(), **load}, "after")
    doc = BenchResults(machine={**machine, "python": platform.python_version()}, date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                       command=" ".join(["python -m ddpm_deploy.verify.fidelity", *(argv or sys.argv[1:])]),
                       statistic="median", warmup=0, repeat=1, results=results)
    args.out.mkdir(parents=True, exist_ok=True)
    doc.save(args.out / "results.json")
    atomic_write_text(args.out / "results.md", markdown(doc.to_dict(), spread))
    print(f"wrote {args.out}/results.json and results.md")
    return 0


def markdown(doc: dict, spread: float | None) -> str:
    from ddpm_deploy.verify.bench import load_text

    m = doc["machine"]
    lines = [f"Fidelity and speed of CPU precisions; {m.get('cpu', '?')} ({m.get('cpus')} cores), CPU flags "
             f"{', '.join(m.get('cpu_flags', [])) or 'none of interest'}; {load_text(m)}; {doc['date']}.", "",
             f"`{doc['command']}`", "",
             "| row | runner | precision run | ms/step | PSNR vs fp32 (median / min) | max abs x0 | digits quality | offered |",
             "|---|---|---|---:|---|---:|---:|---|"]
    for r in doc["results"]:
        ps = f"{r['psnr_db_median']:.1f} / {r['psnr_db_min']:.1f} dB" if "psnr_db_median" in r else "—"
        q = f"{r['quality_confident_share']:.0%}" if "quality_confident_share" in r else "—"
        off = {True: "yes", False: "no (quality drop > fp32 seed spread)"}.get(r.get("offered"), "—")
        lines.append(f"| {r['row']} | {r['runner']} | {r['precision']} | {r['eps_ms']:.2f} | {ps} | "
                     f"{r.get('max_abs', 0):.3g} | {q} | {off} |")
    if spread is not None:
        lines += ["", f"fp32 seed-to-seed spread of the quality score: {spread:.1%}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
