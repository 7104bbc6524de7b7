"""Sample quality per ε call: every scheduler and step count on one model, FID and KID of each row against a
reference (the real digits), ε calls and images/s per row, and diffusers' own schedulers driving the same ONNX as
peer rows. Writes results.json (rows as they finish: an interrupted run keeps them), results.md and fid_per_call.png.

    python -m ddpm_deploy.verify.scheduler_bench --onnx runs/demo/export/model.onnx \\
        --ref runs/fid-stats/digits16.npz --num 1797 --out benchmarks/results/cpu-schedulers

Every row samples the same seed and indices 0 … num−1 (the same x_T for every scheduler) through the shipped runner
and host loop (``verify.fid.sample_set``, resumable: a row already sampled in OUT is reused, said on stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from ddpm_deploy.runtime.fileio import atomic_write_text

# (label, scheduler, steps, options): the rows, then the stochastic solvers at 10–20 calls
ROWS = [
    ("DDPM 1000", "ddpm", 1000, ()),
    ("DDPM respaced 100", "ddpm", 100, ()),
    ("DDPM respaced 50", "ddpm", 50, ()),
    ("DDIM 100", "ddim", 100, ()),
    ("DDIM 50", "ddim", 50, ()),
    ("DDIM 20", "ddim", 20, ()),
    ("DDIM 10", "ddim", 10, ()),
    ("DDIM η=1 20", "ddim", 20, ("eta=1.0",)),
    ("DDIM η=1 10", "ddim", 10, ("eta=1.0",)),
    ("DPM-Solver++ 2M 20", "dpmsolver++", 20, ()),
    ("DPM-Solver++ 2M 15", "dpmsolver++", 15, ()),
    ("DPM-Solver++ 2M 10", "dpmsolver++", 10, ()),
    ("DPM-Solver++ 3M 20", "dpmsolver++", 20, ("solver_order=3",)),
    ("DPM-Solver++ 3M 15", "dpmsolver++", 15, ("solver_order=3",)),
    ("DPM-Solver++ 3M 10", "dpmsolver++", 10, ("solver_order=3",)),
    ("SDE-DPM-Solver++ 2M 20", "sde-dpmsolver++", 20, ()),
    ("SDE-DPM-Solver++ 2M 10", "sde-dpmsolver++", 10, ()),
    ("UniPC 10", "unipc", 10, ()),
    ("UniPC 5", "unipc", 5, ()),
]
PEERS = [("diffusers DPM-Solver++ 2M 20 (our ONNX)", "dpmsolver++", 20, ()),
         ("diffusers DDIM 20 (our ONNX)", "ddim", 20, ())]


def _slug(label: str) -> str:
    """"DPM-Solver++ 2M 20" → "dpm-solver-2m-20" (the --rows names)."""
    import re

    return re.sub(r"[^0-9a-z]+", "-", label.lower()).strip("-")


def _load() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def sample_peer(onnx: Path, out: Path, scheduler: str, steps: int, options, num: int, batch: int, seed: int,
                threads: int) -> tuple[np.ndarray, float]:
    """diffusers' own scheduler class driving our ONNX (ONNX Runtime CPU ε), x_T and noise from our stream."""
    from ddpm_deploy.runtime.backends.ort import OrtRunner
    from ddpm_deploy.runtime.cli import parse_options
    from ddpm_deploy.runtime.imageio import to_uint8
    from ddpm_deploy.runtime.sampling.config import plan_for
    from ddpm_deploy.verify.diffusers_ref import sample_with_scheduler

    runner = OrtRunner(onnx, threads=threads)
    plan = plan_for(runner.card.diffusion, scheduler, steps, **parse_options(options))
    t0, xs = time.perf_counter(), []
    for lo in range(0, num, batch):
        idx = np.arange(lo, min(lo + batch, num))
        xs.append(sample_with_scheduler(runner.eps, plan, runner.card.diffusion, runner.sample_shape, seed, idx))
    seconds = time.perf_counter() - t0
    images = to_uint8(np.concatenate(xs), runner.card.data.value_range)
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "samples.npz", images=images, indices=np.arange(num))
    return images, seconds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--onnx", type=Path, required=True, help="the model (ONNX from ddpm-export)")
    ap.add_argument("--ref", required=True, help="FID reference: a fid-stats file or a dataset spec (digits)")
    ap.add_argument("--num", type=int, default=1797, help="images per row (default: as many as the real digits)")
    ap.add_argument("--batch", type=int, default=64, help="images per ε call")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0: all cores)")
    ap.add_argument("--rows", default="all", help="comma-separated row names (a label in lower case, dashes for "
                    "everything else: dpm-solver-2m-20, ddpm-1000, …), or 'all'")
    ap.add_argument("--no-peers", action="store_true", help="skip diffusers' schedulers on our ONNX")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)

    from ddpm_deploy.verify.bench import machine_info, record_load
    from ddpm_deploy.verify.fid import FidSettings, fid_report, open_extractor, sample_set
    from ddpm_deploy.runtime.imageset import ImageSet, read_image_set

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "results.json"
    prev = json.loads(path.read_text()) if path.is_file() else {}
    done = {r["label"]: r for r in prev.get("rows", []) if r.get("fid") is not None}
    rows = ROWS
    if args.rows != "all":
        wanted = set(args.rows.split(","))
        unknown = wanted - {_slug(r[0]) for r in ROWS}
        if unknown:
            ap.error(f"--rows: unknown {sorted(unknown)}; rows: {', '.join(_slug(r[0]) for r in ROWS)}")
        rows = [r for r in ROWS if _slug(r[0]) in wanted]
    peers = [] if args.no_peers else PEERS
    result = {"model": str(args.onnx), "reference": args.ref, "num": args.num, "seed": args.seed, "batch": args.batch,
              "machine": record_load(machine_info(), "before"), "rows": list(done.values()),
              "command": " ".join(["python -m ddpm_deploy.verify.scheduler_bench", *(argv or sys.argv[1:])])}
    settings = FidSettings(threads=args.threads)
    with open_extractor(settings, echo=lambda m: print(m, file=sys.stderr)) as ext:
        # cheap rows first (an interrupted run has them), DDPM 1000 last
        for label, scheduler, steps, options in sorted([*rows, *peers], key=lambda r: r[2]):
            if label in done:
                print(f"{label}: done before (results.json)", file=sys.stderr)
                continue
            row_dir = args.out / "samples" / _slug(label)
            load0 = _load()
            print(f"{label}: sampling {args.num} images …", file=sys.stderr, flush=True)
            if label.startswith("diffusers"):
                images, seconds = sample_peer(args.onnx, row_dir, scheduler, steps, options, args.num, args.batch,
                                              args.seed, args.threads)
                samples = ImageSet(images=images, source=str(row_dir), indices=np.arange(args.num))
                eps_calls = steps
            else:
                samples = sample_set(args.onnx, "cpu", row_dir, args.num, args.batch, args.seed, steps, args.threads,
                                     mode="resume", echo=lambda m: print(m, file=sys.stderr), scheduler=scheduler,
                                     options=options)
                run = read_image_set(row_dir).run
                seconds, eps_calls = float(run.total_seconds), int(run.steps)
            print(f"{label}: FID/KID …", file=sys.stderr, flush=True)
            rep = fid_report(samples, args.ref, settings, ext)
            row = {"label": label, "scheduler": scheduler, "options": list(options), "eps_calls": eps_calls,
                   "fid": rep.fid, "kid_mean": rep.kid["mean"], "kid_std": rep.kid["std"],
                   "images_per_second": args.num / seconds if seconds else None, "sampling_seconds": seconds,
                   "load_before": load0, "load_after": _load(), "samples": str(row_dir)}
            result["rows"].append(row)
            atomic_write_text(path, json.dumps(result, indent=2, default=str))
            print(f"{label}: FID {rep.fid:.2f}, KID {rep.kid['mean']:.5f} ± {rep.kid['std']:.5f}", file=sys.stderr)
    record_load(result["machine"], "after")
    atomic_write_text(path, json.dumps(result, indent=2, default=str))
    write_table(result, args.out / "results.md")
    plot(result, args.out / "fid_per_call.png")
    print(f"wrote {path}, results.md, fid_per_call.png", file=sys.stderr)
    return 0


def write_table(result: dict, out: Path) -> None:
    from ddpm_deploy.verify.bench import load_text

    rows = sorted(result["rows"], key=lambda r: (r["label"].startswith("diffusers"), -r["eps_calls"]))
    lines = ["| sampler | ε calls | FID | KID (mean ± std) | images/s |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        ips = f"{r['images_per_second']:.2f}" if r.get("images_per_second") else "—"
        lines.append(f"| {r['label']} | {r['eps_calls']} | {r['fid']:.2f} | {r['kid_mean']:.5f} ± {r['kid_std']:.5f} "
                     f"| {ips} |")
    m = result["machine"]
    lines += ["", f"{result['num']} images per row (seed {result['seed']}, indices 0 … {result['num'] - 1}, batch "
              f"{result['batch']}) against `{result['reference']}`; model `{result['model']}`.",
              f"Machine: {m.get('cpu', '?')}, {m.get('cpus')} cores, CPU flags {', '.join(m.get('cpu_flags', []))}; "
              f"{load_text(m)} (each row's load before and after is in results.json)."]
    atomic_write_text(out, "\n".join(lines) + "\n")


def plot(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    import re

    families = {}
    for r in result["rows"]:
        fam = re.sub(r" \d+(?= |$)", "", r["label"])  # the label without its ε-call count
        families.setdefault(fam, []).append(r)
    ref = next((r for r in result["rows"] if r["label"] == "DDPM 1000"), None)
    if ref is not None:  # the 1000-step ancestral row as the target band
        a.axhline(ref["fid"], color="grey", ls="--", lw=1, label="DDPM 1000")
        b.axhspan(ref["kid_mean"] - ref["kid_std"], ref["kid_mean"] + ref["kid_std"], color="grey", alpha=0.2,
                  label="DDPM 1000 KID ± std")
    for fam, rs in sorted(families.items()):
        rs = sorted(rs, key=lambda r: r["eps_calls"])
        x = [r["eps_calls"] for r in rs]
        style = "x" if fam.startswith("diffusers") else "o-"
        a.plot(x, [r["fid"] for r in rs], style, label=fam)
        b.errorbar(x, [r["kid_mean"] for r in rs], yerr=[r["kid_std"] for r in rs], fmt=style, label=fam, capsize=2)
    for ax, name in ((a, "FID"), (b, "KID")):
        ax.set_xscale("log")
        ax.set_xlabel("ε calls per image")
        ax.set_ylabel(f"{name} vs the real digits")
        ax.grid(True, alpha=0.3)
    b.legend(fontsize=7, loc="upper right")
    fig.suptitle(f"Sample quality per ε call ({result['num']} images per row)")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
