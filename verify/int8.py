"""CPU path to beat PyTorch bf16 autocast at batch 8 on ddpm-cifar10: ONNX Runtime int8 (QDQ, static,
calibrated on forward-process x_t over the timesteps). Reports speed and parity cost against fp32.

    .venv/bin/python -m ddpm_deploy.verify.int8 --out benchmarks/results/cpu-int8

Random weights (speed does not care); the parity cost is ε relative L2 vs the fp32 ONNX per timestep bucket,
on forward-process inputs — an int8 model is only worth shipping where that cost is acceptable.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/cpu-int8"))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--calib", type=int, default=16, help="calibration timesteps (one image each + pure noise)")
    args = ap.parse_args()

    import onnxruntime as ort
    import torch
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from ddpm_deploy.export.fp16 import calibration_batch
    from ddpm_deploy.runtime.config import DataSpec, ModelCard
    from ddpm_deploy.runtime.contract import BenchResults
    from ddpm_deploy.runtime.fileio import atomic_write_text
    from ddpm_deploy.runtime.schedule import DiffusionConfig
    from ddpm_deploy.runtime.tolerances import compare
    from ddpm_deploy.trainer.data import load_dataset
    from ddpm_deploy.verify.bench import _model, _onnx_for, load_text, machine_info, record_load

    args.out.mkdir(parents=True, exist_ok=True)
    load = record_load({}, "before")
    card = ModelCard(DiffusionConfig(), DataSpec(3, 32))
    images = load_dataset("digits", image_size=32, channels=3).images
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        fp32 = _onnx_for("ddpm-cifar10", work)
        pre = work / "pre.onnx"
        feeds = calibration_batch(card, images, n_timesteps=args.calib, per_t=1, seed=0)

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.items = iter([{"x": feeds["x"][i:i + 1], "t": feeds["t"][i:i + 1]} for i in range(len(feeds["t"]))])

            def get_next(self):
                return next(self.items, None)

        int8 = work / "int8.onnx"
        cwd = os.getcwd()
        os.chdir(work)  # ORT's quantization tools leave temporary files in the working directory
        try:
            quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
            t0 = time.perf_counter()
            quantize_static(str(pre), str(int8), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            op_types_to_quantize=["Conv", "MatMul", "Gemm"])
            quant_s = time.perf_counter() - t0
        finally:
            os.chdir(cwd)

        def session(p):
            so = ort.SessionOptions()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            return ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"])

        s32, s8 = session(fp32), session(int8)
        g = np.random.default_rng(1)
        x = g.standard_normal((args.batch, 3, 32, 32)).astype(np.float32)
        t = np.full(args.batch, 500, np.int32)

        def med(fn):
            fn()
            fn()
            ts = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
            return statistics.median(ts) * 1e3

        ms32 = med(lambda: s32.run(["eps"], {"x": x, "t": t}))
        ms8 = med(lambda: s8.run(["eps"], {"x": x, "t": t}))
        m, _ = _model("ddpm-cifar10")
        torch.set_num_threads(2)
        xt, tt = torch.from_numpy(x), torch.from_numpy(t)

        def bf16():
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                m(xt, tt)

        ms_bf16 = med(bf16)
        # parity cost: forward-process inputs over 10 buckets, 2 samples each
        rows = []
        T = 1000
        for k in range(10):
            lo, hi = k * T // 10, (k + 1) * T // 10 - 1
            tv = np.array([lo, hi], np.int32)
            x0 = images[g.integers(0, len(images), 2)]
            from ddpm_deploy.runtime.schedule import Schedule

            xb = Schedule(card.diffusion).q_sample(x0, tv, g.standard_normal(x0.shape).astype(np.float32))
            xb = xb.astype(np.float32)
            a = s8.run(["eps"], {"x": xb, "t": tv})[0]
            b = s32.run(["eps"], {"x": xb, "t": tv})[0]
            c = compare(f"int8 vs fp32 t in [{lo},{hi}]", a, b, 1e-2, metric="rel_l2")
            rows.append({"t_min": lo, "t_max": hi, "rel_l2": c.rel_l2, "max_abs": c.max_abs})
    doc = {"model": "ddpm-cifar10 (random weights)", "batch": args.batch, "repeat": args.repeat,
           "quantize_seconds": quant_s, "ms_per_step": {"ort-fp32": ms32, "ort-int8-qdq": ms8, "torch-bf16-autocast": ms_bf16},
           "int8_eps_rel_l2_by_bucket": rows, "int8_worst_rel_l2": max(r["rel_l2"] for r in rows)}
    machine = record_load({**machine_info(), **load}, "after")
    BenchResults(machine=machine, date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), command="python -m "
                 "ddpm_deploy.verify.int8", statistic="median", warmup=2, repeat=args.repeat,
                 results=[doc]).save(args.out / "results.json")
    md = [f"ddpm-cifar10, batch {args.batch}, median of {args.repeat}, ms per step ({load_text(machine)}):", "",
          "| backend | ms/step | vs torch bf16 |", "|---|---:|---:|"]
    for k, v in doc["ms_per_step"].items():
        md.append(f"| {k} | {v:.1f} | {v / ms_bf16:.2f} |")
    buckets = ", ".join("%.2g" % r["rel_l2"] for r in rows)
    md += ["", f"int8 ε relative L2 vs fp32, worst timestep bucket: {doc['int8_worst_rel_l2']:.3g} (buckets: {buckets})"]
    atomic_write_text(args.out / "results.md", "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
