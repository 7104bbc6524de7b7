"""Step-level against request-level batching in Triton serving: open-loop Poisson arrivals at 30 %, 60 % and 90 % of
the measured capacity, throughput and p50 / p99 latency, on one server, one model, one machine, one run.

    python -m ddpm_deploy.verify.step_bench --out benchmarks/results/cpu-step-batching [--requests 80]

One tritonserver serves one repository written with step-level batching: ``ddpm`` (request-level: Triton's dynamic
batcher, max batch B) and ``ddpm_stream`` (step-level: a loop of B slots) share the build, the model file and the
machine. The clients are tritonclient gRPC in this process on 127.0.0.1: request-level requests go through
``async_infer`` to ``ddpm``, step-level ones through one stream (``async_stream_infer``) to ``ddpm_stream``; both are
sent by one thread at pre-drawn Poisson arrival times (open loop: a slow server does not slow the arrivals), and a
request's latency runs from its scheduled arrival to its answer.

Workloads: every request ``--steps`` (default 50) ε calls; and a 50/50 mix of ``--mix`` (default 20 and 200) ε calls,
drawn at random per request. Capacity (images/s at saturation: 2·B requests kept in flight, counted between the
fill and the drain) is measured for both
modes and each workload; the loads are fractions of the **request-level** capacity (the baseline's), so both modes
see the same arrival sequence. Points alternate request / step so drift on a shared machine hits both alike.

The model is the preset with seeded random weights (as every benchmark here); results.json (the machine, its CPU
flags, its load average before / during / after each point), results.md and latency.png go to ``--out``.
"""

from __future__ import annotations

import datetime as dt
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import click
import numpy as np

from ddpm_deploy.runtime.clitools import clean_errors
from ddpm_deploy.runtime.contract import BenchResults
from ddpm_deploy.runtime.errors import ConfigError
from ddpm_deploy.runtime.outputs import Outputs
from ddpm_deploy.runtime.serve.client import make_inputs, stream_inputs
from ddpm_deploy.runtime.serve.repository import MODEL_NAME, STREAM_NAME, RepoSettings, write_repository
from ddpm_deploy.runtime.serve.server import TritonServer
from ddpm_deploy.verify.bench import load_average, load_text, machine_info, record_load
from ddpm_deploy.verify.models import random_preset_onnx

LOADS = (0.3, 0.6, 0.9)
MODES = ("request", "step")


class Driver:
    """Sends requests of one mode and records when each is answered (gRPC, callbacks on tritonclient's threads)."""

    def __init__(self, url: str, mode: str, timeout: float = 600.0):
        import tritonclient.grpc as grpc

        self.grpc, self.mode, self.timeout = grpc, mode, timeout
        self.client = grpc.InferenceServerClient(url)
        self.done: dict[int, tuple[float, str | None]] = {}
        self.orphans: list[tuple[float, str]] = []  # errors of the stream (request unknown)
        self.cv = threading.Condition()
        if mode == "step":
            self.client.start_stream(callback=self._on_stream)

    def _finish(self, rid: int, error) -> None:
        with self.cv:
            if rid not in self.done:
                self.done[rid] = (time.perf_counter(), None if error is None else str(error))
            self.cv.notify_all()

    def _on_stream(self, result, error):
        if error is not None:  # tritonclient passes a stream's error without the request's id
            with self.cv:
                self.orphans.append((time.perf_counter(), str(error)))
                self.cv.notify_all()
            return
        resp = result.get_response()
        if resp.parameters["triton_final_response"].bool_param:
            self._finish(int(resp.id), None)

    def send(self, rid: int, steps: int) -> None:
        g = self.grpc
        if self.mode == "step":
            self.client.async_stream_infer(STREAM_NAME, stream_inputs(g, [1], [rid], steps), request_id=str(rid),
                                           enable_empty_final_response=True)
        else:
            self.client.async_infer(MODEL_NAME, make_inputs(g, [1], [rid], steps),
                                    callback=lambda result, error, rid=rid: self._finish(rid, error),
                                    request_id=str(rid), client_timeout=self.timeout)

    def wait(self, rids, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self.cv:
            while sum(r not in self.done for r in rids) > len(self.orphans):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{sum(r not in self.done for r in rids)} requests unanswered after {timeout:.0f}s")
                self.cv.wait(min(left, 1.0))

    def settle(self, rids) -> None:
        """Give the requests without an answer the stream's errors (tritonclient does not say whose they are)."""
        for r, (t, e) in zip([r for r in rids if r not in self.done], self.orphans):
            self.done[r] = (t, e)

    def close(self) -> None:
        if self.mode == "step":
            self.client.stop_stream()
        self.client.close()


def capacity(url: str, mode: str, steps_of, n: int, inflight: int, base: int) -> float:
    """Images/s with ``inflight`` requests kept in flight (closed loop) over ``n`` requests, counted in the steady
    part: between the (k)th and the (n−k)th answer, k = min(inflight/2, n/4) (the start fills the batch, the end
    drains it)."""
    d = Driver(url, mode)
    try:
        rids = list(range(base, base + n))
        t0 = time.perf_counter()
        sent = 0
        for rid in rids[:inflight]:
            d.send(rid, steps_of(rid - base))
            sent += 1
        while True:
            with d.cv:
                finished = sum(r in d.done for r in rids) + len(d.orphans)
                if finished >= n:
                    break
                if sent - finished >= inflight or sent == n:
                    d.cv.wait(1.0)
                    continue
            d.send(rids[sent], steps_of(sent))
            sent += 1
        d.settle(rids)
        errors = [d.done[r][1] for r in rids if d.done[r][1]]
        if errors:
            raise RuntimeError(f"{mode}: {len(errors)} requests failed while measuring capacity: {errors[0]}")
        times = sorted(d.done[r][0] for r in rids)
        k = max(1, min(inflight // 2, n // 4))
        return (n - 2 * k) / (times[n - k - 1] - times[k - 1]) if n - 2 * k > 0 else n / (times[-1] - t0)
    finally:
        d.close()


def open_loop(url: str, mode: str, arrivals: np.ndarray, steps: np.ndarray, base: int) -> dict:
    """Send request i at ``arrivals[i]`` seconds (Poisson), whatever the server does; latencies from the arrival."""
    d = Driver(url, mode)
    rids = [base + i for i in range(len(arrivals))]
    loads = []
    try:
        t0 = time.perf_counter()
        for rid, at, st in zip(rids, arrivals, steps):
            delay = t0 + at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            d.send(rid, int(st))
        loads.append(load_average())
        d.wait(rids, timeout=600)
        d.settle(rids)
        end = max(d.done[r][0] for r in rids)
    finally:
        d.close()
    loads.append(load_average())
    lat = np.array([d.done[r][0] - (t0 + at) for r, at in zip(rids, arrivals)]) * 1e3
    errors = [d.done[r][1] for r in rids if d.done[r][1]]
    by_steps = {int(s): lat[steps == s] for s in np.unique(steps)}
    return {"images": len(rids), "errors": len(errors), "first_error": errors[0] if errors else None,
            "seconds": end - t0, "images_per_s": (len(rids) - len(errors)) / (end - t0),
            "offered_per_s": len(rids) / float(arrivals[-1]) if arrivals[-1] > 0 else None,
            "latency_ms_p50": float(np.percentile(lat, 50)), "latency_ms_p99": float(np.percentile(lat, 99)),
            "latency_ms_p99_by_steps": {s: float(np.percentile(v, 99)) for s, v in by_steps.items()},
            "load_average_during": loads}


def markdown(doc: BenchResults, preset: str, max_batch: int) -> str:
    m = doc.machine
    lines = [f"# Step-level vs request-level batching: {preset} (random weights), max batch {max_batch}", "",
             f"Machine: {m.get('cpu')} ({m.get('cpus')} CPUs; flags {', '.join(m.get('cpu_flags', []))}); "
             f"{load_text(m)}. Date {doc.date}. Command: `{doc.command}`.", "",
             "Capacity (images/s, closed loop, 2 × max batch in flight, counted between the fill and the drain): " + "; ".join(
                 f"{c['workload']}: request {c['request']:.2f}, step {c['step']:.2f}" for c in m["capacity"]) + ".",
             "", "| workload | load (of request-level capacity) | offered/s | mode | images/s | p50 ms | p99 ms | "
                 "p99 ms by steps | errors | 1-min load (sent → answered) |",
             "|---|---:|---:|---|---:|---:|---:|---|---:|---|"]
    for r in doc.results:
        by = ", ".join(f"{s}: {v:.0f}" for s, v in r["latency_ms_p99_by_steps"].items())
        lines.append(f"| {r['workload']} | {r['load']:.0%} | {r['rate_per_s']:.2f} | {r['mode']} | "
                     f"{r['images_per_s']:.2f} | {r['latency_ms_p50']:.0f} | {r['latency_ms_p99']:.0f} | {by} | "
                     f"{r['errors']} | {' → '.join(str(x[0]) for x in r['load_average_during'] if x)} |")
    lines += ["", "| workload | load | p99 request / step | throughput step / request |", "|---|---:|---:|---:|"]
    for w in dict.fromkeys(r["workload"] for r in doc.results):
        for load in LOADS:
            pair = {r["mode"]: r for r in doc.results if r["workload"] == w and r["load"] == load}
            if set(pair) == set(MODES):
                lines.append(f"| {w} | {load:.0%} | {pair['request']['latency_ms_p99'] / pair['step']['latency_ms_p99']:.2f}× | "
                             f"{pair['step']['images_per_s'] / pair['request']['images_per_s']:.2f}× |")
    return "\n".join(lines) + "\n"


def plot(doc: BenchResults, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(r["workload"] for r in doc.results))
    fig, axes = plt.subplots(1, len(workloads), figsize=(5.5 * len(workloads), 4), squeeze=False)
    for ax, w in zip(axes[0], workloads):
        for mode, style in (("request", "s--"), ("step", "o-")):
            rs = sorted((r for r in doc.results if r["workload"] == w and r["mode"] == mode), key=lambda r: r["load"])
            x = [r["load"] * 100 for r in rs]
            ax.plot(x, [r["latency_ms_p99"] for r in rs], style, label=f"{mode}-level p99")
            ax.plot(x, [r["latency_ms_p50"] for r in rs], style, alpha=0.4, label=f"{mode}-level p50")
        ax.set_title(w)
        ax.set_xlabel("load, % of request-level capacity")
        ax.set_ylabel("latency (ms)")
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


@click.command(context_settings={"show_default": True})
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              default=Path("benchmarks/results/cpu-step-batching"), help="Where results.json, results.md, latency.png go.")
@click.option("--overwrite", is_flag=True, help="Replace results already in --out (otherwise refused).")
@click.option("--preset", default="tiny", help="Model preset (random weights).")
@click.option("--onnx", "onnx_path", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="An ONNX model from ddpm-export instead of the preset.")
@click.option("--steps", type=int, default=50, help="ε calls per request of the uniform workload.")
@click.option("--mix", default="20,200", help="ε calls of the mixed workload's two kinds of request, 50/50.")
@click.option("--max-batch", type=int, default=16, help="Dynamic batcher's max batch = the step loop's slots.")
@click.option("--requests", type=int, default=80, help="Requests per point (6 points per workload).")
@click.option("--capacity-requests", type=int, default=96, help="Requests of each capacity measurement.")
@click.option("--loads", default="0.3,0.6,0.9", help="Fractions of the request-level capacity.")
@click.option("--seed", type=int, default=0, help="Seed of the arrival times and the mix.")
@clean_errors
def main(out, overwrite, preset, onnx_path, steps, mix, max_batch, requests, capacity_requests, loads, seed):
    """Step-level against request-level batching under open-loop Poisson load."""
    global LOADS
    try:
        LOADS = tuple(float(x) for x in loads.split(","))
        kinds = [int(s) for s in mix.split(",")]
    except ValueError as e:
        raise ConfigError(f"--loads and --mix are comma-separated numbers: {e}") from None
    if not all(0 < x <= 1.5 for x in LOADS) or min(kinds) < 1 or min(steps, max_batch, requests, capacity_requests) < 1:
        raise ConfigError(f"expected loads in (0, 1.5], steps, --mix, --max-batch, --requests and --capacity-requests "
                          f">= 1; found --loads {loads}, --mix {mix}, --steps {steps}, --max-batch {max_batch}, "
                          f"--requests {requests}, --capacity-requests {capacity_requests}")
    targets = [out / "results.json", out / "results.md", out / "latency.png"]
    with Outputs("step_bench", targets, overwrite=overwrite, hint="choose another --out") as files:
        machine = record_load(machine_info(), "before", click.echo)
        rng = np.random.default_rng(seed)
        workloads = {f"{steps} steps": lambda n: np.full(n, steps),
                     f"{'/'.join(map(str, kinds))} steps 50/50": lambda n: rng.choice(kinds, n)}
        rows, caps = [], []
        with tempfile.TemporaryDirectory(prefix="step-bench-") as tmp:
            onnx = onnx_path or random_preset_onnx(preset, Path(tmp) / f"{preset}.onnx")[0]
            if onnx_path is not None:
                preset = onnx_path.name
            repo = write_repository(onnx, Path(tmp) / "repo", RepoSettings(max_batch=max_batch, batching="step",
                                                                           queue_size=max(1024, 4 * requests)))
            with TritonServer(repo) as server:
                url, base = server.grpc_url, 0
                for mode in MODES:  # warm-up: every batch size of both models once
                    capacity(url, mode, lambda i: 2, 2 * max_batch, max_batch, base)
                    base += 2 * max_batch
                for name, draw in workloads.items():
                    mixture = draw(capacity_requests)
                    cap = {}
                    for mode in MODES:
                        cap[mode] = capacity(url, mode, lambda i: int(mixture[i]), capacity_requests, 2 * max_batch,
                                             base)
                        base += capacity_requests
                    caps.append({"workload": name, **cap})
                    click.echo(f"{name}: capacity request-level {cap['request']:.2f}, step-level {cap['step']:.2f} "
                               f"images/s")
                    for load in LOADS:
                        rate = load * cap["request"]
                        arrivals = np.cumsum(rng.exponential(1.0 / rate, requests))
                        st = draw(requests)
                        for mode in MODES:
                            r = open_loop(url, mode, arrivals, st, base)
                            base += requests
                            rows.append({"workload": name, "load": load, "rate_per_s": rate, "mode": mode,
                                         "max_batch": max_batch, **r})
                            click.echo(f"{name} at {load:.0%} ({rate:.2f}/s) {mode}-level: {r['images_per_s']:.2f} "
                                       f"images/s, p50 {r['latency_ms_p50']:.0f} ms, p99 {r['latency_ms_p99']:.0f} ms"
                                       f", {r['errors']} errors")
        record_load(machine, "after", click.echo)
        machine["capacity"] = caps
        machine["threads_per_model"] = os.cpu_count()
        doc = BenchResults(machine=machine, date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                           command="python -m ddpm_deploy.verify.step_bench " + " ".join(sys.argv[1:]),
                           statistic="images/s: answered requests / (last answer − first arrival); latency from the "
                                     "scheduled arrival to the answer, percentiles over the point's requests",
                           warmup=1, repeat=1, results=rows)
        doc.save(files.stage(targets[0]))
        files.stage(targets[1]).write_text(markdown(doc, preset, max_batch), encoding="utf-8")
        plot(doc, files.stage(targets[2]))
    click.echo(f"wrote {out}/results.json, results.md and latency.png")


if __name__ == "__main__":
    main()
