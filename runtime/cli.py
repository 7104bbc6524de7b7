"""`ddpm-run`: sample with the framework-free runtime (and, later, check parity and benchmark)."""

from __future__ import annotations

import dataclasses
import platform
import time
from pathlib import Path

import click
import numpy as np

from .clitools import clean_errors, latest_run, setup_logging
from .config import DataSpec, ModelCard
from .errors import ArtifactError, ConfigError
from .schedule import DiffusionConfig, Schedule

CTX = {"help_option_names": ["-h", "--help"], "show_default": True}


@click.group(context_settings=CTX)
def main():
    """Run DDPM models without a deep-learning framework: NumPy + ONNX Runtime on CPUs; TensorRT or ONNX
    Runtime CUDA with a fused NVRTC step kernel on NVIDIA GPUs. Also: parity checks and benchmarks."""


def _resolve_card(runner, schedule, beta_start, beta_end, num_timesteps, variance_type, clip) -> ModelCard:
    card = runner.card
    flags = dict(schedule=schedule, beta_start=beta_start, beta_end=beta_end, num_timesteps=num_timesteps,
                 variance_type=variance_type, clip_denoised=clip)
    given = {k: v for k, v in flags.items() if v is not None}
    if card is None:
        if not {"schedule", "num_timesteps"} <= set(given):
            raise ArtifactError(
                f"{runner.path}: has no ddpm-deploy metadata (key ddpm_deploy.config), so the diffusion schedule is "
                f"unknown; export it with ddpm-export, or give --schedule and --num-timesteps (and --beta-start, "
                f"--beta-end, --variance-type, --clip/--no-clip as needed)"
            )
        c, h, w = runner.sample_shape
        if None in (c, h, w) or h != w:
            raise ArtifactError(f"{runner.path}: input x must have static square C,H,W; found {runner.sample_shape}")
        return ModelCard(diffusion=DiffusionConfig(**given), data=DataSpec(c, h), source="onnx-without-metadata")
    if given:
        return dataclasses.replace(card, diffusion=dataclasses.replace(card.diffusion, **given))
    return card


@main.command(context_settings=CTX)
@click.option("--onnx", "onnx_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="ONNX model from ddpm-export. Default: runs/latest/export/model.onnx (unless --engine).")
@click.option("--engine", "engine", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="TensorRT / TensorRT-RTX plan (with its model.plan.json sidecar): the GPU device loop.")
@click.option("--num", "-n", type=int, default=64, help="Number of images.")
@click.option("--batch", "-b", type=int, default=16, help="Images per model call.")
@click.option("--seed", type=int, default=0, envvar="DDPM_SEED", help="Seed; image i of seed s is the same at any batch size.")
@click.option("--start-index", type=int, default=0, help="Index of the first image (resume or shard a large job).")
@click.option("--steps", type=int, default=None, help="Respaced sampling with K < T steps. Default: all T steps.")
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output directory. Default: samples/ beside the model.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu",
              help="cpu: NumPy loop + ONNX Runtime CPU. cuda: the GPU device loop (fused NVRTC step kernel) with "
                   "ONNX Runtime CUDA (needs onnxruntime-gpu and cuda-python). --engine implies cuda.")
@click.option("--cuda-graph/--no-cuda-graph", default=True, help="Capture the device loop's step in a CUDA graph "
              "where the backend allows it (results are identical either way).")
@click.option("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: all cores).")
@click.option("--graph-opt", type=click.Choice(["disable", "basic", "extended", "all"]), default="all",
              help="ONNX Runtime graph optimisation level.")
@click.option("--no-pngs", is_flag=True, help="Skip images/NNNNNN.png (grid.png and samples.npz are still written).")
@click.option("--schedule", type=click.Choice(["linear", "cosine"]), default=None,
              help="Override / supply the β schedule (for ONNX files without our metadata).")
@click.option("--beta-start", type=float, default=None, help="Override / supply β_1.")
@click.option("--beta-end", type=float, default=None, help="Override / supply β_T.")
@click.option("--num-timesteps", type=int, default=None, help="Override / supply T.")
@click.option("--variance-type", type=click.Choice(["fixed_small", "fixed_large"]), default=None,
              help="Override the sampler variance.")
@click.option("--clip/--no-clip", default=None, help="Override clipping of x̂0 to [-1, 1].")
@click.option("--no-progress", is_flag=True, envvar="DDPM_NO_PROGRESS", help="No progress bar.")
@click.option("-v", "--verbose", count=True, help="More logging.")
@clean_errors
def sample(onnx_path, engine, num, batch, seed, start_index, steps, out, device, cuda_graph, threads, graph_opt,
           no_pngs, schedule, beta_start, beta_end, num_timesteps, variance_type, clip, no_progress, verbose):
    """Sample images with ancestral sampling.

    \b
    CPU:  ddpm-run sample --onnx model.onnx            (NumPy step, ε from ONNX Runtime CPU)
    GPU:  ddpm-run sample --engine model.plan          (device loop, ε from TensorRT / TensorRT-RTX)
          ddpm-run sample --onnx model.onnx --device cuda   (device loop, ε from ONNX Runtime CUDA)

    Writes grid.png, images/NNNNNN.png, samples.npz (uint8 images + indices) and run.json. The same seed
    gives the same images on every backend and batch size (counter-based Philox noise).
    """
    setup_logging(verbose)
    from contextlib import ExitStack

    from .output import SampleWriter
    from .sampler import LoopTimings
    from .sampler import sample as run_loop

    if num <= 0 or batch <= 0:
        raise ConfigError(f"--num and --batch must be positive, found --num {num} --batch {batch}")
    if start_index < 0 or seed < 0:
        raise ConfigError(f"--start-index and --seed must be >= 0, found {start_index}, {seed}")
    if engine is not None and onnx_path is not None:
        raise ConfigError("give either --onnx or --engine, not both")
    gpu_loop = engine is not None or device == "cuda"
    model_path = engine or onnx_path or latest_run() / "export" / "model.onnx"
    with ExitStack() as stack:
        if gpu_loop:
            from .device.loop import DeviceSampler, DeviceTimings, GpuContext

            gpu = stack.enter_context(GpuContext(0))
            if engine is not None:
                from .backends.trt import TrtRunner

                runner = stack.enter_context(TrtRunner(engine, gpu, cuda_graph=cuda_graph))
            else:
                from .backends.ort_cuda import OrtCudaRunner

                runner = stack.enter_context(OrtCudaRunner(model_path, gpu, cuda_graph=cuda_graph, opt_level=graph_opt))
        else:
            from .backends.ort import OrtRunner

            runner = stack.enter_context(OrtRunner(model_path, device="cpu", threads=threads, opt_level=graph_opt))
        card = _resolve_card(runner, schedule, beta_start, beta_end, num_timesteps, variance_type, clip)
        shape = (card.data.channels, card.data.image_size, card.data.image_size)
        if hasattr(runner, "check_shape"):
            runner.check_shape(shape)
        sched = Schedule(card.diffusion, steps=steps)
        out = out or Path(model_path).parent / "samples"
        timings = DeviceTimings() if gpu_loop else LoopTimings()
        if gpu_loop:
            dev = stack.enter_context(DeviceSampler(runner, sched, shape, max_batch=min(batch, num), gpu=gpu,
                                                    cuda_graph=cuda_graph))
        writer = SampleWriter(out, num, shape, card.data.value_range, write_pngs=not no_pngs)
        bar = None
        if not no_progress:
            from tqdm import tqdm

            bar = stack.enter_context(tqdm(total=num * len(sched), unit="img·step", unit_scale=True,
                                           dynamic_ncols=True, desc="sample"))
        t0 = time.perf_counter()
        try:
            for lo in range(0, num, batch):
                idx = np.arange(start_index + lo, start_index + min(lo + batch, num), dtype=np.int64)
                cb = (lambda done, total, n=len(idx): bar.update(n)) if bar is not None else None
                if gpu_loop:
                    x, tm = dev.sample(seed, idx, callback=cb)
                    timings.extend(tm)
                else:
                    x = run_loop(runner, sched, shape, seed, idx, callback=cb, timings=timings)
                writer.add(x, idx)
        except BaseException:
            writer.abort()
            raise
        total = time.perf_counter() - t0
        precision = getattr(runner, "precision", None) or ("fp16" if ".fp16." in Path(model_path).name else "fp32")
        info = {
            "seed": seed, "num": num, "batch": batch, "start_index": start_index, "steps": len(sched),
            "num_timesteps": card.diffusion.num_timesteps, "backend": runner.name, "loop": "device" if gpu_loop
            else "host", "precision": precision, "model": str(model_path), "diffusion": card.diffusion.to_dict(),
            "total_seconds": total, "images_per_second": num / total, "timings": timings.summary(),
            "host": {"machine": platform.machine(), "processor": platform.processor(),
                     "python": platform.python_version()},
        }
        writer.close(info)
    med = info["timings"].get("eps_ms_median") or info["timings"].get("step_ms_median") or 0.0
    click.echo(f"sampled {num} images ({len(sched)} steps, batch {batch}, {runner.name}) in {total:.1f}s "
               f"({num / total:.2f} images/s; {med:.1f} ms/step median)")
    click.echo(f"wrote {out}/grid.png, images/, samples.npz, run.json")


@main.command(context_settings=CTX)
@click.option("--onnx", "onnx_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="ONNX model to describe.")
@click.option("--engine", "engine", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="TensorRT plan to describe: its sidecar, and whether this GPU and TensorRT can run it.")
@clean_errors
def info(onnx_path, engine):
    """Print what an artifact holds (DDPM config, inputs, outputs) and, for a plan, whether it runs here."""
    if engine is not None:
        from .device.info import engine_info, format_engine_info

        inf = engine_info(engine)
        click.echo(format_engine_info(inf))
        if not inf.get("runnable", False):
            raise SystemExit(1)
        return
    from .backends.ort import OrtRunner

    onnx_path = onnx_path or latest_run() / "export" / "model.onnx"
    runner = OrtRunner(onnx_path)
    click.echo(f"model: {onnx_path}")
    click.echo(f"inputs: {[(i.name, i.type, i.shape) for i in runner.session.get_inputs()]}")
    click.echo(f"outputs: {[(o.name, o.type, o.shape) for o in runner.session.get_outputs()]}")
    click.echo("ddpm config: " + (runner.card.to_json() if runner.card else "none (no ddpm-deploy metadata)"))


@main.command(context_settings=CTX)
@click.option("--checkpoint", "checkpoint", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="The PyTorch reference: a ddpm-train run dir (model.json) or a diffusers UNet2DModel dir. "
                   "Default: runs/latest.")
@click.option("--onnx", "onnx_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="ONNX model to check. Default: CHECKPOINT/export/model.onnx when it exists.")
@click.option("--engine", "engine", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="TensorRT plan (with its model.plan.json sidecar). Runs only on an NVIDIA GPU; elsewhere the "
                   "sidecar is validated and the engine levels are reported as not run.")
@click.option("--steps", type=int, default=None, help="Respaced L3 trajectory with K steps. Default: all T steps.")
@click.option("--batch", "-b", type=int, default=4, help="Samples in the L3 trajectory (and the largest L2 batch).")
@click.option("--seed", type=int, default=0, envvar="DDPM_SEED", help="Seed of the inputs and the sampling noise.")
@click.option("--weights", type=click.Choice(["ema", "raw"]), default="ema",
              help="Which weights of a ddpm-train run the ONNX was exported from.")
@click.option("--threads", type=int, default=0,
              help="PyTorch and ONNX Runtime intra-op threads (0: the libraries' defaults; 1 is fastest for small "
                   "models on a busy CPU).")
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where parity.json and parity.md go. Default: parity/ beside the ONNX (or in CHECKPOINT).")
@click.option("-v", "--verbose", count=True, help="More logging.")
@clean_errors
def parity(checkpoint, onnx_path, engine, steps, batch, seed, weights, threads, out, verbose):
    """Check every parity level the given artifacts allow and write parity.json + parity.md.

    L0 schedule tables and L1 one step (vs the paper's equations in float64 and diffusers' DDPMScheduler), L2 ε
    of the ONNX (and plan) vs PyTorch through Polygraphy's Comparator, L3 the whole sampling loop vs the PyTorch
    reference loop with the same noise, L4 GPU backends vs CPU. Exits non-zero if any level fails. Needs the
    export extra (torch): pip install 'ddpm-deploy[export]'.
    """
    setup_logging(verbose)
    from .errors import lazy_import

    lazy_import("torch", "ddpm-run parity (the PyTorch reference)", "pip install 'ddpm-deploy[export]'")
    lazy_import("polygraphy", "ddpm-run parity (Polygraphy's Comparator)", "pip install polygraphy")
    from ddpm_deploy.export import parity as parity_mod  # torch: imported only for this command

    checkpoint = Path(checkpoint) if checkpoint else latest_run()
    settings = parity_mod.ParitySettings(checkpoint=checkpoint, onnx=onnx_path, engine=engine, steps=steps,
                                         batch=batch, seed=seed, weights=weights, threads=threads)
    rep = parity_mod.run_parity(settings, echo=lambda m: click.echo(m, err=True))
    out = out or ((onnx_path.parent if onnx_path else checkpoint) / "parity")
    json_path, md_path = parity_mod.write_reports(rep, out)
    for lv in rep["levels"]:
        worst = f"max abs {lv['max_abs']:.3g}" if lv["max_abs"] is not None else lv["reason"]
        if "psnr_db" in lv["metrics"]:
            worst += f", PSNR {lv['metrics']['psnr_db']:.1f} dB"
        click.echo(f"{lv['status']:>8}  {lv['level']:<14} {lv['backend']} vs {lv['reference']}: {worst}")
    click.echo(f"wrote {json_path} and {md_path}")
    if not rep["passed"]:
        click.echo("parity FAILED at: " + "; ".join(rep["failed"]), err=True)
        raise SystemExit(1)



@main.command(context_settings=CTX)
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), default=Path("benchmarks/results/latest"),
              help="Where results.json, results.md and images_per_s.png go.")
@click.option("--presets", default="tiny,ddpm-cifar10", help="Models (random weights), comma-separated.")
@click.option("--backends", default="ort-cpu,torch-eager-fp32,torch-eager-bf16,diffusers-loop",
              help="Comma-separated: ort-cpu, torch-eager-fp32, torch-eager-bf16, torch-compile-fp32, diffusers-loop.")
@click.option("--batches", default="1,8,64", help="Batch sizes, comma-separated.")
@click.option("--max-batch-cifar", type=int, default=64, help="Largest batch for ddpm-cifar10 (CPU time and memory).")
@click.option("--repeat", type=int, default=5, help="Timed calls per measurement (median reported).")
@click.option("--warmup", type=int, default=2, help="Untimed warm-up calls.")
@click.option("--e2e-steps", type=int, default=50, help="Steps of the end-to-end runtime run (loop overhead).")
@click.option("--threads", type=int, default=0, help="Threads for every backend (0: all cores).")
@clean_errors
def bench(out, presets, backends, batches, max_batch_cifar, repeat, warmup, e2e_steps, threads):
    """Benchmark our runtime against PyTorch eager/bf16/compile and a diffusers-style loop (needs the
    [test] extra: torch, diffusers). Each measurement runs in its own process; medians after warm-up."""
    try:
        from ddpm_deploy.export import bench as harness
    except ImportError as e:
        raise ConfigError(f"ddpm-run bench needs torch and the export extra ({e}); pip install 'ddpm-deploy[test]'") from None
    split = lambda v: [x.strip() for x in v.split(",") if x.strip()]  # noqa: E731
    unknown = set(split(backends)) - set(harness.CPU_BACKENDS)
    if unknown:
        raise ConfigError(f"unknown backends {sorted(unknown)}; available: {', '.join(harness.CPU_BACKENDS)}")
    harness.run(Path(out), presets=tuple(split(presets)), backends=tuple(split(backends)),
                batches=tuple(int(b) for b in split(batches)), warmup=warmup, repeat=repeat, e2e_steps=e2e_steps,
                threads=threads, max_batch={"ddpm-cifar10": max_batch_cifar}, echo=click.echo)
    click.echo(f"wrote {out}/results.json, results.md, images_per_s.png")

if __name__ == "__main__":
    main()
