"""How many ONNX Runtime threads should `ddpm-run sample` use? Measures images/s of `ddpm-run sample --threads T`
for each T (default 0, 1, 2; 0 is ONNX Runtime's default, one thread per core), on the `tiny` preset (random
weights) or a given ONNX, on an idle machine and with N other CPU-bound processes running (``--background``), since
issue 24 measured `--threads 0` slower than `--threads 1` on a 2-core machine while another process ran.

    python -m ddpm_deploy.verify.threads_bench --out benchmarks/results/cpu-threads

Every run is a fresh `ddpm-run sample` process (its own thread pool); the thread counts are interleaved round by
round, so a change of load over time hits every count alike. images/s is run.json's (sampling only, no process
start). results.json records the machine (CPU, core count, CPU flags), the load average before and after the whole
benchmark and around every run, and warns (stderr, results.json, results.md) when the load exceeds the core count
without background processes of ours: such numbers are not the machine's. results.md ends with the fastest thread
count per condition; picking the default from it is left to the maintainers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ddpm_deploy.runtime.contract import BenchResults
from ddpm_deploy.runtime.fileio import atomic_write_text
from ddpm_deploy.verify.bench import load_average, load_text, load_warning, machine_info, record_load

BURN = "while True:\n    pass\n"  # one core's worth of someone else's work


@contextlib.contextmanager
def busy(n: int):
    """``n`` CPU-bound Python processes for the duration (stopped, by their pids, however the block ends)."""
    procs = [subprocess.Popen([sys.executable, "-c", BURN], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL) for _ in range(n)]
    try:
        yield [p.pid for p in procs]
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


def sample_once(onnx: Path, threads: str, num: int, batch: int, steps: int, work: Path, tag: str) -> dict:
    """One `ddpm-run sample` process; its run.json's images/s and the load average around it. ``threads``: the
    --threads value, with "+spin" for ONNX Runtime's spinning worker threads (DDPM_ORT_SPIN=1; off by default)."""
    out = work / f"run-{tag}"
    count, _, spin = str(threads).partition("+")
    cmd = [sys.executable, "-m", "ddpm_deploy.verify.cli", "sample", "--onnx", str(onnx), "--num", str(num),
           "--batch", str(batch), "--steps", str(steps), "--threads", count, "--seed", "0", "--no-pngs",
           "--no-progress", "--out", str(out)]
    env = {**os.environ, "DDPM_ORT_SPIN": "1" if spin == "spin" else "0"}
    load0 = load_average()
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, env=env)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        return {"threads": threads, "error": (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1],
                "load_before": load0, "load_after": load_average()}
    info = json.loads((out / "run.json").read_text())
    return {"threads": threads, "images": num, "images_per_s": info["images_per_second"],
            "sampling_seconds": info["total_seconds"], "process_seconds": wall, "load_before": load0,
            "load_after": load_average()}


def summarise(rows: list[dict]) -> list[dict]:
    """Median images/s per (background, threads), and which thread count was fastest per background."""
    out = []
    for bg in sorted({r["background"] for r in rows}):
        meds = {}
        for t in sorted({r["threads"] for r in rows if r["background"] == bg}):
            ips = [r["images_per_s"] for r in rows if r["background"] == bg and r["threads"] == t and
                   "images_per_s" in r]
            if ips:
                meds[t] = statistics.median(ips)
                out.append({"kind": "median", "background": bg, "threads": t, "runs": len(ips),
                            "images_per_s": meds[t], "min": min(ips), "max": max(ips)})
        if meds:
            best = max(meds, key=meds.get)
            out.append({"kind": "fastest", "background": bg, "threads": best, "images_per_s": meds[best]})
    return out


def markdown(doc: dict) -> str:
    m = doc["machine"]
    lines = ["# `ddpm-run sample --threads`: images/s", "",
             f"Machine: {m.get('cpu', '?')}, {m.get('cpus')} cores, CPU flags {', '.join(m.get('cpu_flags', [])) or 'none of interest'}; "
             f"{load_text(m)}; {doc['date']}. Command: `{doc['command']}`. {doc['statistic']}.", "",
             "| other CPU-bound processes | --threads | runs | images/s (median) | min | max |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in doc["results"]:
        if r.get("kind") == "median":
            lines.append(f"| {r['background']} | {r['threads']} | {r['runs']} | {r['images_per_s']:.2f} | "
                         f"{r['min']:.2f} | {r['max']:.2f} |")
    lines.append("")
    for r in doc["results"]:
        if r.get("kind") == "fastest":
            lines.append(f"- with {r['background']} other CPU-bound process(es): fastest at `--threads {r['threads']}` "
                         f"({r['images_per_s']:.2f} images/s)")
    errors = [r for r in doc["results"] if r.get("kind") == "run" and "error" in r]
    if errors:
        lines += ["", f"{len(errors)} run(s) failed, first: {errors[0]['error']}"]
    for w in m.get("load_warnings", []):
        lines += ["", f"**Warning** ({w})"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", help="model preset, random weights (needs torch to export)")
    ap.add_argument("--onnx", type=Path, default=None, help="measure this ONNX instead of the preset")
    ap.add_argument("--threads", default="0,1,2", help="thread counts, comma-separated (0: ONNX Runtime's default; "
                    "N+spin: with ONNX Runtime's spinning worker threads, which ddpm-deploy turns off)")
    ap.add_argument("--background", default="0,1",
                    help="numbers of other CPU-bound processes to run during the measurement, comma-separated")
    ap.add_argument("--num", type=int, default=64, help="images per run")
    ap.add_argument("--batch", type=int, default=16, help="--batch of every run (ddpm-run sample's default)")
    ap.add_argument("--steps", type=int, default=50, help="sampling steps per image")
    ap.add_argument("--repeat", type=int, default=3, help="runs per thread count and condition (interleaved)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/cpu-threads"))
    args = ap.parse_args(argv)
    threads = [t.strip() for t in args.threads.split(",") if t.strip()]
    backgrounds = [int(b) for b in args.background.split(",")]
    if any(not t.partition("+")[0].isdigit() or t.partition("+")[2] not in ("", "spin") for t in threads):
        ap.error("--threads: comma-separated counts, each optionally with +spin (e.g. 0,1,0+spin)")
    if any(b < 0 for b in backgrounds) or any(b < 0 for b in backgrounds) or min(args.num, args.batch, args.steps,
                                                                          args.repeat) < 1:
        ap.error("--threads and --background must be >= 0; --num, --batch, --steps, --repeat >= 1")

    if (args.out / "results.json").exists():  # never replace earlier results silently (as ddpm-run bench)
        ap.error(f"{args.out} already holds results.json; choose another --out or remove it")
    machine = record_load(machine_info(), "before")
    cpus = os.cpu_count()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="threads-bench-") as tmp:
        work = Path(tmp)
        if args.onnx is not None:
            onnx, model = args.onnx, str(args.onnx)
        else:
            from ddpm_deploy.verify.models import random_preset_onnx

            onnx, _ = random_preset_onnx(args.preset, work / f"{args.preset}.onnx")
            model = f"{args.preset} (random weights)"
        for bg in backgrounds:
            with busy(bg):
                if bg:
                    time.sleep(1.0)  # let the load average notice them
                for rnd in range(args.repeat):
                    for t in threads:
                        r = sample_once(onnx, t, args.num, args.batch, args.steps, work, f"b{bg}-t{t}-r{rnd}")
                        r = {"kind": "run", "background": bg, "round": rnd, **r}
                        warning = load_warning(r["load_before"], cpus and cpus + bg)  # beyond our own burners
                        if warning:
                            r["load_warning"] = warning
                            print(f"warning: {warning}", file=sys.stderr, flush=True)
                        rows.append(r)
                        print(f"background {bg}, --threads {t}, round {rnd + 1}/{args.repeat}: " +
                              (f"{r['images_per_s']:.2f} images/s" if "images_per_s" in r else r["error"]) +
                              f" (load {r['load_before']})", file=sys.stderr, flush=True)
    record_load(machine, "after")
    statistic = (f"{model}, {args.num} images per run, batch {args.batch}, {args.steps} steps, median of "
                 f"{args.repeat} interleaved runs per row")
    doc = BenchResults(machine=machine, date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                       command=" ".join(["python -m ddpm_deploy.verify.threads_bench", *(argv or sys.argv[1:])]),
                       statistic=statistic, warmup=0, repeat=args.repeat, results=[*rows, *summarise(rows)])
    args.out.mkdir(parents=True, exist_ok=True)
    doc.save(args.out / "results.json")
    text = markdown(doc.to_dict())
    atomic_write_text(args.out / "results.md", text)
    print(text)
    print(f"wrote {args.out}/results.json and results.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
