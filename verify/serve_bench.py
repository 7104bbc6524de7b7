"""The cost of serving: images/s and request latency (p50/p99) through Triton Inference Server for 1, 4 and 16
concurrent clients, with 1 and 2 model instances, against `ddpm-run sample` on the same model and machine.

    python -m ddpm_deploy.verify.serve_bench --out benchmarks/results/cpu-serving [--preset tiny --steps 50]

The model is the preset with seeded random weights (what every benchmark here uses). `ddpm-run sample` runs as
its own process (images/s from its run.json, model load excluded); the server is the real tritonserver; the clients
are tritonclient HTTP threads in this process, on the same machine (they share its cores with the server).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import click
import numpy as np

from ddpm_deploy.runtime.contract import BenchResults, RunInfo
from ddpm_deploy.runtime.fileio import atomic_write_text
from ddpm_deploy.runtime.serve.client import TritonImages
from ddpm_deploy.runtime.serve.repository import RepoSettings, write_repository
from ddpm_deploy.runtime.serve.server import TritonServer
from ddpm_deploy.verify.bench import load_average, load_text, machine_info, record_load
from ddpm_deploy.verify.models import random_preset_onnx


def batch_stats(server: TritonServer) -> dict[int, int]:
    # the model that batches (ddpm, the one clients call, is its ensemble and has no batch statistics)
    with urllib.request.urlopen(f"http://{server.http_url}/v2/models/ddpm_sampler/stats", timeout=10) as r:
        body = json.load(r)
    return {b["batch_size"]: b["compute_infer"]["count"] for b in body["model_stats"][0]["batch_stats"]}


def sample_cli(onnx: Path, num: int, batch: int, steps: int, workdir: Path, threads: int) -> dict:
    out = workdir / f"sample-b{batch}-t{threads}"
    cmd = [str(Path(sys.executable).with_name("ddpm-run")), "sample", "--onnx", str(onnx), "--num", str(num),
           "--batch", str(batch), "--steps", str(steps), "--threads", str(threads), "--no-pngs", "--no-progress",
           "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=1800)
    info = RunInfo.load(out / "run.json")
    return {"mode": "ddpm-run sample", "batch": batch, "threads": threads, "images": num, "seconds": info.total_seconds,
            "images_per_s": info.images_per_second, "latency_ms_p50": None, "latency_ms_p99": None,
            "load_average": load_average()}


def serve_rows(onnx: Path, instances: int, concurrencies, images_for, steps: int, max_batch: int, workdir: Path,
               echo) -> list[dict]:
    cores = os.cpu_count() or 1  # model.py's default: ONNX Runtime threads = cores / instances
    repo = write_repository(onnx, workdir / f"repo-{instances}", RepoSettings(instances=instances, max_batch=max_batch))
    rows = []
    with TritonServer(repo) as server, TritonImages(server.http_url) as client:
        client.fetch(0, range(2 * max_batch), steps=steps, concurrency=max_batch)  # warm-up: every instance
        for c in concurrencies:
            n = images_for(c)
            before = batch_stats(server)
            got = client.fetch(1, range(n), steps=steps, concurrency=c)
            after = batch_stats(server)
            lat = np.asarray(got.latencies) * 1e3
            formed = {b: k - before.get(b, 0) for b, k in sorted(after.items()) if k > before.get(b, 0)}
            rows.append({"mode": "triton", "instances": instances, "threads": max(1, cores // instances),
                         "concurrency": c, "images": n,
                         "seconds": got.seconds, "images_per_s": n / got.seconds,
                         "latency_ms_p50": float(np.percentile(lat, 50)),
                         "latency_ms_p99": float(np.percentile(lat, 99)), "batches_formed": formed,
                         "load_average": load_average()})
            echo(f"triton x{instances} c={c}: {n / got.seconds:.1f} images/s, p50 {rows[-1]['latency_ms_p50']:.0f} ms, "
                 f"p99 {rows[-1]['latency_ms_p99']:.0f} ms, batches {formed}")
    return rows


def markdown(doc: BenchResults, preset: str, steps: int) -> str:
    m = doc.machine
    lines = [f"# Serving benchmark: {preset} (random weights), {steps} steps per image", "",
             f"Machine: {m.get('cpu')} ({m.get('cpus')} CPUs; flags {', '.join(m.get('cpu_flags', []))}); "
             f"{load_text(m)}. "
             f"Date {doc.date}. Command: `{doc.command}`.", "",
             "| mode | instances | ORT threads each | clients | batch | images | images/s | p50 latency (ms) | p99 latency (ms) | batches formed (size: count) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in doc.results:
        p50 = f"{r['latency_ms_p50']:.0f}" if r["latency_ms_p50"] is not None else "—"
        p99 = f"{r['latency_ms_p99']:.0f}" if r["latency_ms_p99"] is not None else "—"
        formed = ", ".join(f"{b}: {n}" for b, n in r.get("batches_formed", {}).items()) or "—"
        lines.append(f"| {r['mode']} | {r.get('instances', '—')} | {r.get('threads', '—')} | {r.get('concurrency', '—')} | "
                     f"{r.get('batch', 'dynamic ≤ ' + str(r.get('max_batch', '')))} | {r['images']} | "
                     f"{r['images_per_s']:.1f} | {p50} | {p99} | {formed} |")
    return "\n".join(lines) + "\n"


@click.command(context_settings={"show_default": True})
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("benchmarks/results/cpu-serving"),
              help="Where results.json and results.md go.")
@click.option("--preset", default="tiny", help="Model preset (random weights).")
@click.option("--steps", type=int, default=50, help="Sampling steps per image.")
@click.option("--max-batch", type=int, default=16, help="Triton's dynamic batching max batch.")
@click.option("--concurrency", default="1,4,16", help="Concurrent clients, comma-separated.")
@click.option("--instances", default="1,2", help="Model instances, comma-separated.")
@click.option("--scale", type=int, default=3, help="Images per run: scale × max(16, 3 × clients).")
def main(out, preset, steps, max_batch, concurrency, instances, scale):
    """Serving vs ddpm-run sample on one machine."""
    conc = [int(c) for c in concurrency.split(",")]
    insts = [int(i) for i in instances.split(",")]
    images_for = lambda c: scale * max(16, 3 * c)  # noqa: E731
    machine = record_load(machine_info(), "before", click.echo)
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        work = Path(tmp)
        onnx, _ = random_preset_onnx(preset, work / f"{preset}.onnx")
        rows = []
        n = images_for(max(conc))
        cores = os.cpu_count() or 1
        for b in (1, max_batch):
            for threads in sorted({cores, 1}, reverse=True):
                rows.append(sample_cli(onnx, n, b, steps, work, threads))
                click.echo(f"ddpm-run sample batch {b}, {threads} threads: {rows[-1]['images_per_s']:.1f} images/s")
        for i in insts:
            rows += [{**r, "max_batch": max_batch} for r in serve_rows(onnx, i, conc, images_for, steps, max_batch,
                                                                        work, click.echo)]
    record_load(machine, "after", click.echo)
    doc = BenchResults(machine=machine, date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                       command="python -m ddpm_deploy.verify.serve_bench " + " ".join(sys.argv[1:]),
                       statistic="images/s over the whole run (wall clock); latency percentiles over its requests",
                       warmup=1, repeat=1, results=rows)
    out.mkdir(parents=True, exist_ok=True)
    doc.save(out / "results.json")
    atomic_write_text(out / "results.md", markdown(doc, preset, steps))
    click.echo(f"wrote {out}/results.json and results.md")


if __name__ == "__main__":
    main()
