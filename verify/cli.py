"""`ddpm-run`, whole: the runtime's commands (sample, info, merge; serve and request from ``runtime.serve.cli``) plus
the ones that judge it (parity, bench, and the FID commands of ``verify/fid_cli.py``: fid, fid-stats, fid-extractor,
fid-compare).

The console script points here, not at ``runtime.cli``, so that the runtime layer never imports the verify
layer; ``parity`` and ``bench`` import torch only when they run.
"""

from __future__ import annotations

from pathlib import Path

import click

from ddpm_deploy.runtime.cli import CTX, main
from ddpm_deploy.runtime.serve import cli as _serve_cli  # noqa: F401  (adds serve and request to `main`)
from ddpm_deploy.runtime.clitools import clean_errors, latest_run, setup_logging
from ddpm_deploy.runtime.errors import ConfigError, lazy_import

from . import fid_cli  # noqa: F401  (registers fid, fid-stats, fid-extractor and fid-compare on `main`)

__all__ = ["main"]


@main.command(context_settings=CTX)
@click.option("--checkpoint", "checkpoint", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="The PyTorch reference: a ddpm-train run dir (model.json) or a diffusers UNet2DModel dir. "
                   "Default: runs/latest.")
@click.option("--onnx", "onnx_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="ONNX model to check. Default: CHECKPOINT/export/model.onnx when it exists.")
@click.option("--engine", "engine", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="TensorRT plan (with its model.plan.json sidecar). Runs only on an NVIDIA GPU; elsewhere the "
                   "sidecar is validated and the engine levels are reported as not run.")
@click.option("--steps", type=int, default=None, help="ε calls of the L3 trajectory. Default: all T steps (DDPM), "
              "20 for the other schedulers.")
@click.option("--scheduler", default=None, metavar="NAME",
              help="L1/L3/L4 along this scheduler (ddpm, ddim, dpmsolver++, sde-dpmsolver++, unipc): L1 vs diffusers' "
                   "own scheduler class, L3 vs diffusers' scheduler driving the PyTorch model, same noise.")
@click.option("--option", "sched_options", multiple=True, metavar="KEY=VALUE",
              help="A scheduler option by its diffusers name, value as JSON (repeatable).")
@click.option("--batch", "-b", type=int, default=4, help="Samples in the L3 trajectory (and the largest L2 batch).")
@click.option("--seed", type=int, default=0, envvar="DDPM_SEED", show_envvar=True, help="Seed of the inputs and the sampling noise.")
@click.option("--weights", type=click.Choice(["ema", "raw"]), default="ema",
              help="Which weights of a ddpm-train run the ONNX was exported from.")
@click.option("--threads", type=int, default=0,
              help="PyTorch and ONNX Runtime intra-op threads (0: the libraries' defaults; 1 is fastest for small "
                   "models on a busy CPU).")
@click.option("--backend", type=click.Choice(["onnxruntime", "openvino"]), default="onnxruntime",
              help="The CPU runner L2/L3/L4 check (openvino: pip install 'ddpm-deploy[openvino]').")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu",
              help="cuda: L4 also runs the GPU device loop (fused step kernel with ONNX Runtime CUDA, and with the "
                   "plan's TensorRT runner) against the host loop on ONNX Runtime CPU.")
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where parity.json and parity.md go. Default: parity/ beside the ONNX (or in CHECKPOINT).")
@click.option("--overwrite", is_flag=True, help="Replace parity.json and parity.md already in --out (refused "
              "without it).")
@click.option("-v", "--verbose", count=True, help="More logging.")
@clean_errors
def parity(checkpoint, onnx_path, engine, steps, scheduler, sched_options, batch, seed, weights, threads, backend,
           device, out, overwrite, verbose):
    """Check every parity level the given artifacts allow and write parity.json + parity.md.

    L0 schedule tables and L1 one step (vs the paper's equations in float64 and diffusers' DDPMScheduler), L2 ε
    of the ONNX (and plan) vs PyTorch through Polygraphy's Comparator, L3 the whole sampling loop vs the PyTorch
    reference loop with the same noise, L4 the host loop's batch independence and (--device cuda) the device loop vs
    the host loop. Every level names the runner class that ran it; the runners are the ones `ddpm-run sample` uses.
    Exits non-zero if any level fails. Needs the export extra (torch): pip install 'ddpm-deploy[export]'.

    With --engine alone the ONNX checked is the one the plan was built from (its sidecar's SHA-256, found beside
    the plan or in CHECKPOINT/export/): an fp16 plan is compared with model.fp16.onnx.
    """
    setup_logging(verbose)

    lazy_import("torch", "ddpm-run parity (the PyTorch reference)", "pip install 'ddpm-deploy[export]'")
    lazy_import("polygraphy", "ddpm-run parity (Polygraphy's Comparator)", "pip install 'ddpm-deploy[export]'")
    from . import parity as parity_mod  # torch: imported only for this command

    checkpoint = Path(checkpoint) if checkpoint else latest_run()
    settings = parity_mod.ParitySettings(checkpoint=checkpoint, onnx=onnx_path, engine=engine, steps=steps,
                                         batch=batch, seed=seed, weights=weights, threads=threads, device=device,
                                         backend=backend, scheduler=scheduler, scheduler_options=tuple(sched_options))
    source = parity_mod.onnx_for(settings)
    out = out or ((source.parent if source else checkpoint) / "parity")
    outputs = parity_mod.report_outputs(out, overwrite)
    rep = parity_mod.run_parity(settings, echo=lambda m: click.echo(m, err=True))
    json_path, md_path = parity_mod.write_reports(rep, out, outputs)
    for lv in rep.levels:
        worst = f"max abs {lv['max_abs']:.3g}" if lv["max_abs"] is not None else lv["reason"]
        if "psnr_db" in lv["metrics"]:
            worst += f", PSNR {lv['metrics']['psnr_db']:.1f} dB"
        runner = f" [{lv['runner']}]" if lv["runner"] else ""
        click.echo(f"{lv['status']:>8}  {lv['level']:<14} {lv['backend']}{runner} vs {lv['reference']}: {worst}")
    click.echo(f"wrote {json_path} and {md_path}")
    if not rep.passed:
        click.echo("parity FAILED at: " + "; ".join(rep.failed), err=True)
        raise SystemExit(1)



@main.command(context_settings=CTX)
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), default=Path("benchmarks/results/latest"),
              help="Where results.json, results.md and images_per_s.png go.")
@click.option("--presets", default="tiny,ddpm-cifar10", help="Models (random weights), comma-separated.")
@click.option("--backends", default="ort-cpu,torch-eager-fp32,torch-eager-bf16,diffusers-loop",
              help="Comma-separated: ort-cpu, openvino-fp32, openvino-bf16, openvino-int8, openvino-int8-bf16, "
                   "openvino-bands (a precision per timestep band, --bands; ms per ε call averaged over 20 timesteps "
                   "spread over 0-999), torch-eager-fp32, torch-eager-bf16 (marked 'not a speed' where bf16 is "
                   "emulated: no AVX512_BF16/AMX), torch-compile-fp32, diffusers-loop.")
@click.option("--bands", default=None, metavar="P:FIRST-LAST,...",
              help="The bands of the openvino-bands rows (default bf16:0-99,int8-bf16:100-999).")
@click.option("--batches", default="1,8,64", help="Batch sizes, comma-separated.")
@click.option("--max-batch-cifar", type=int, default=64, help="Largest batch for ddpm-cifar10 (CPU time and memory).")
@click.option("--repeat", type=int, default=5, help="Timed calls per measurement (median reported).")
@click.option("--warmup", type=int, default=2, help="Untimed warm-up calls.")
@click.option("--e2e-steps", type=int, default=50, help="Steps of the end-to-end runtime run (loop overhead).")
@click.option("--schedulers", default="ddpm", show_default=True,
              help="Schedulers whose end-to-end loop the ort-cpu rows time (the loop's own cost per scheduler), "
                   "comma-separated: ddpm, ddim, dpmsolver++, sde-dpmsolver++, unipc.")
@click.option("--threads", type=int, default=0, help="Threads for every backend (0: all cores).")
@click.option("--engine-builds/--no-engine-builds", default=True,
              help="Also time TensorRT engine builds (fp32 and calibrated fp16) of each preset.")
@click.option("--overwrite", is_flag=True, help="Replace the results already in --out (refused without it).")
@clean_errors
def bench(out, presets, backends, batches, max_batch_cifar, repeat, warmup, e2e_steps, schedulers, threads,
          engine_builds, overwrite, bands):
    """Benchmark our runtime against PyTorch eager/bf16/compile and a diffusers-style loop (needs the
    [test] extra: torch, diffusers). Each measurement runs in its own process; medians after warm-up."""
    lazy_import("torch", "ddpm-run bench (its models and PyTorch baselines)", "pip install 'ddpm-deploy[test]'")
    try:
        from . import bench as harness
    except ImportError as e:
        raise ConfigError(f"ddpm-run bench needs torch and the export extra ({e}); pip install 'ddpm-deploy[test]'") from None
    split = lambda v: [x.strip() for x in v.split(",") if x.strip()]  # noqa: E731
    from ddpm_deploy.runtime.outputs import Outputs
    from ddpm_deploy.runtime.sampling.config import scheduler_class

    Outputs("ddpm-run bench", [Path(out) / n for n in ("results.json", "results.md", "images_per_s.png")], overwrite,
            hint="choose another --out").claim()
    for name in split(schedulers):
        scheduler_class(name)  # an unknown name: one error line now, not after the first model
    unknown = set(split(backends)) - set(harness.CPU_BACKENDS)
    if unknown:
        raise ConfigError(f"unknown backends {sorted(unknown)}; available: {', '.join(harness.CPU_BACKENDS)}")
    if bands is not None:
        from ddpm_deploy.runtime.backends.banded import parse_bands

        parse_bands(bands, 1000)  # a bad band: one error line now
    harness.run(Path(out), presets=tuple(split(presets)), backends=tuple(split(backends)),
                batches=tuple(int(b) for b in split(batches)), warmup=warmup, repeat=repeat, e2e_steps=e2e_steps,
                threads=threads, max_batch={"ddpm-cifar10": max_batch_cifar}, echo=click.echo,
                with_engine_builds=engine_builds, schedulers=tuple(split(schedulers)), bands=bands)
    click.echo(f"wrote {out}/results.json, results.md, images_per_s.png")


if __name__ == "__main__":
    main()
