"""OpenVINO's levers at a given batch (issue 25): performance hints, streams, threads and pinning, per precision.

Each (precision, config) row runs in its own process (its own compile, no shared thread pool), timed as the median
of ``--repeat`` ε calls of one batch after warm-up; a "streams=2" row splits the batch into two halves run at once
on two infer requests (OpenVINO's throughput mode needs concurrent requests to use its streams). Results:
``OUT/results.json`` (+ ``results.md``) with the machine, CPU flags and load average before and after.

    python -m ddpm_deploy.verify.ov_levers --onnx cifar.onnx [--int8 cifar.int8.xml] --batch 8 --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CONFIGS = {  # names without commas (--configs is comma-separated)
    "latency": {"PERFORMANCE_HINT": "LATENCY"},
    "latency-2threads": {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": 2},
    "latency-nopin": {"PERFORMANCE_HINT": "LATENCY", "ENABLE_CPU_PINNING": False},
    "latency-pin": {"PERFORMANCE_HINT": "LATENCY", "ENABLE_CPU_PINNING": True},
    "throughput-1request": {"PERFORMANCE_HINT": "THROUGHPUT"},
    "streams2-2halfbatches": {"PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": 2, "_split": 2},
}


def measure(model: str, precision: str, config: str, batch: int, repeat: int, warmup: int) -> dict:
    import openvino as ov

    from ddpm_deploy.runtime.backends.openvino import compute_precisions, precision_that_ran

    cfg = dict(CONFIGS[config])
    split = cfg.pop("_split", 1)
    cfg["INFERENCE_PRECISION_HINT"] = "bf16" if precision in ("bf16", "int8+bf16") else "f32"  # int8+bf16: the
    # int8 model with its float-kept layers (attention, norms, first/last conv, time embedding) in bf16
    core = ov.Core()
    t0 = time.perf_counter()
    compiled = core.compile_model(core.read_model(model), "CPU", cfg)
    compile_s = time.perf_counter() - t0
    shape = [d.get_length() if d.is_static else batch for d in compiled.input("x").get_partial_shape()]
    rng = np.random.default_rng(0)
    x = rng.standard_normal([batch, *shape[1:]]).astype(np.float32)
    t = rng.integers(0, 1000, batch).astype(np.int32)
    parts = np.array_split(np.arange(batch), split)
    reqs = [compiled.create_infer_request() for _ in parts]

    def call():
        if split == 1:
            reqs[0].infer({"x": x, "t": t})
            return
        for r, idx in zip(reqs, parts):
            r.start_async({"x": x[idx], "t": t[idx]})
        for r in reqs:
            r.wait()

    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeat):
        s = time.perf_counter()
        call()
        times.append((time.perf_counter() - s) * 1e3)
    counts = compute_precisions(compiled)
    ran = precision_that_ran(counts) if not precision.startswith("int8") else \
        "+".join(f"{k}:{v}" for k, v in sorted(counts.items()))
    return {"precision": precision, "config": config, "batch": batch, "ms_median": float(np.median(times)),
            "ms_min": float(np.min(times)), "compile_s": compile_s, "ran": ran,
            "streams": str(compiled.get_property("NUM_STREAMS")),
            "threads": str(compiled.get_property("INFERENCE_NUM_THREADS"))}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--onnx", required=True)
    p.add_argument("--int8", default=None, help="The NNCF int8 IR of the same model (ddpm-export --int8).")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--precisions", default="bf16,int8")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # precision|config: measure in this process
    a = p.parse_args(argv)
    if a.one:
        precision, config = a.one.split("|", 1)
        model = a.int8 if precision.startswith("int8") else a.onnx
        print(json.dumps(measure(model, precision, config, a.batch, a.repeat, a.warmup)))
        return
    from ddpm_deploy.runtime.cpu import cpu_precisions
    from ddpm_deploy.runtime.fileio import atomic_write_text
    from ddpm_deploy.verify.bench import machine_info, record_load

    if a.out is None:
        p.error("--out is required")
    if a.out.exists() and any(a.out.iterdir()):
        p.error(f"{a.out} is not empty; choose another --out")
    machine = {**machine_info(), "cpu": cpu_precisions().to_dict()}
    record_load(machine, "before")
    rows = []
    precisions = [q for q in a.precisions.split(",") if q and (not q.startswith("int8") or a.int8)]
    for config in a.configs.split(","):
        for precision in precisions:
            cmd = [sys.executable, "-m", "ddpm_deploy.verify.ov_levers", "--onnx", a.onnx, "--batch", str(a.batch),
                   "--repeat", str(a.repeat), "--warmup", str(a.warmup), "--one", f"{precision}|{config}"]
            if a.int8:
                cmd += ["--int8", a.int8]
            r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            if r.returncode != 0:
                rows.append({"precision": precision, "config": config, "batch": a.batch, "error": r.stderr[-500:]})
            else:
                rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    record_load(machine, "after")
    a.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(a.out / "results.json", json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")
    lines = [f"# OpenVINO levers at batch {a.batch}", "", f"{machine.get('cpu', {}).get('model')}; flags "
             f"{', '.join(machine['cpu']['flags'])}; load before {machine.get('load_average_before')}, after "
             f"{machine.get('load_average_after')}", "", "| precision | config | ms per ε call (median) | min | "
             "ran | streams | threads |", "|---|---|---:|---:|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['precision']} | {r['config']} | error | | | | |")
        else:
            lines.append(f"| {r['precision']} | {r['config']} | {r['ms_median']:.1f} | {r['ms_min']:.1f} | "
                         f"{r['ran']} | {r['streams']} | {r['threads']} |")
    atomic_write_text(a.out / "results.md", "\n".join(lines) + "\n")
    print(f"wrote {a.out}/results.json, results.md")


if __name__ == "__main__":
    main()
