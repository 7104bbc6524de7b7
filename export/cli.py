"""`ddpm-export`: run dir → model.onnx (→ model.fp16.onnx → model.plan)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import click

from ddpm_deploy.runtime.clitools import CONTEXT, clean_errors, latest_run, setup_logging, version_option
from ddpm_deploy.runtime.errors import ArtifactError, ConfigError

log = logging.getLogger(__name__)


def export_onnx_from_run(run_dir: Path, out_dir: Path, raw: bool = False, echo=lambda s: None) -> tuple[Path, dict]:
    """Export the run's EMA (or raw) weights to out_dir/model.onnx and verify it against PyTorch."""
    from ddpm_deploy.trainer.checkpoint import load_model

    from .onnx_export import export_verified

    model, card, step = load_model(run_dir, "raw" if raw else "ema")
    echo(f"exporting the {'raw' if raw else 'EMA'} weights of step {step} from {run_dir}")
    onnx_path, report = export_verified(model, card, out_dir, "PyTorch", {
        "run_dir": str(run_dir), "weights": "raw" if raw else "ema", "step": step}, echo)
    return onnx_path, report


DEFAULT_ENGINE = "__out__/model.plan"


@click.command(context_settings=CONTEXT)
@version_option()
@click.argument("run_dir", required=False, type=click.Path(path_type=Path))
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output directory. Default: RUN_DIR/export/.")
@click.option("--raw", is_flag=True, help="Export the raw weights instead of the EMA weights.")
@click.option("--from-diffusers", "from_diffusers", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Export a diffusers UNet2DModel directory instead of a run (config.json + "
                   "diffusion_pytorch_model.safetensors, scheduler_config.json beside it or one level up, e.g. a "
                   "local copy of google/ddpm-cifar10-32). Default --out: DIR/export/.")
@click.option("--fp16", is_flag=True, help="Also write model.fp16.onnx: mixed precision decided from calibration data "
              "(ModelOpt AutoCast), with precision.json; fails if the fp16 ε error exceeds its tolerance.")
@click.option("--calib-dataset", default=None, help="Dataset for fp16 calibration (same specs as ddpm-train "
              "--dataset). Default: the one the model was trained on.")
@click.option("--engine", "engine", is_flag=False, flag_value=DEFAULT_ENGINE, default=None, metavar="[PATH]",
              type=click.Path(dir_okay=False), help="Also build a TensorRT plan (from the fp16 ONNX with --fp16, else "
              "fp32) and its model.plan.json sidecar. Without PATH: OUT/model.plan.")
@click.option("--trt-flavour", type=click.Choice(["auto", "tensorrt", "rtx"]), default="auto",
              help="tensorrt (>= 10, NVIDIA's wheel) or rtx (tensorrt-rtx-cu13-bindings); auto tries tensorrt first.")
@click.option("--batch-min", type=int, default=1, help="Engine optimisation profile: smallest batch.")
@click.option("--batch-opt", type=int, default=8, help="Engine optimisation profile: batch to tune for.")
@click.option("--batch-max", type=int, default=64, help="Engine optimisation profile: largest batch.")
@click.option("--workspace-mb", type=int, default=4096, help="Builder workspace memory limit (MiB).")
@click.option("--opt-level", type=click.IntRange(0, 5), default=3, help="Builder optimisation level.")
@click.option("--timing-cache", type=click.Path(dir_okay=False), default=None,
              help="Timing cache file, read and updated across builds (TensorRT; a no-op for TensorRT-RTX).")
@click.option("--version-compatible", is_flag=True, help="Build a version-compatible engine (TensorRT lean runtime).")
@click.option("--tf32", is_flag=True, help="Allow TF32 tactics for fp32 layers (faster on Ampere and newer; ε moves "
              "by ~1e-3). Off by default, so an fp32 plan matches ONNX Runtime fp32 within the parity tolerance.")
@click.option("--triton-repo", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also write a Triton Inference Server model repository (model `ddpm`, Python backend) here. "
                   "RUN_DIR may be an ONNX file or a plan: then only the repository is written (no torch needed).")
@click.option("--triton-kind", type=click.Choice(["cpu", "gpu"]), default=None,
              help="Triton instance kind: cpu (ONNX Runtime CPU) or gpu (ONNX Runtime CUDA, or the plan). "
                   "Default: gpu for a plan, else cpu.")
@click.option("--triton-instances", type=int, default=1, help="Triton model instances (instance_group count).")
@click.option("--triton-max-batch", type=int, default=None,
              help="Dynamic batching's largest batch. Default: the plan's profile max, else 16.")
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
@clean_errors
def main(run_dir, out, raw, from_diffusers, fp16, calib_dataset, engine, trt_flavour, batch_min, batch_opt, batch_max,
         workspace_mb, opt_level, timing_cache, version_compatible, tf32, triton_repo, triton_kind, triton_instances,
         triton_max_batch, verbose):
    """Export a trained run to ONNX, and optionally to fp16 mixed precision and a TensorRT engine.

    \b
      ddpm-export                          runs/latest -> runs/latest/export/model.onnx
      ddpm-export --fp16                   + model.fp16.onnx, precision.json
      ddpm-export --fp16 --engine          + model.plan, model.plan.json (TensorRT or TensorRT-RTX)

    RUN_DIR defaults to runs/latest (the last ddpm-train run). The ONNX model has inputs x float32
    [B,C,H,W] and t int32 [B], output eps float32 [B,C,H,W], a dynamic batch axis, and the DDPM config
    as JSON in its metadata (key ddpm_deploy.config). Right after export it is run in ONNX Runtime and
    compared with the PyTorch checkpoint; the comparison is saved as export_report.json.

    With --from-diffusers DIR, a diffusers UNet2DModel (ε-prediction, DDPMScheduler config) is exported with
    the same contract and metadata, and verified against the diffusers model in PyTorch.
    """
    setup_logging(verbose)
    if run_dir is not None and Path(run_dir).suffix.lower() in (".onnx", ".plan", ".engine"):
        if triton_repo is None:
            raise ConfigError(f"{run_dir} is a model file: give --triton-repo DIR to write a Triton repository for it "
                              f"(export and engine builds start from a run dir)")
        _write_triton(Path(run_dir), triton_repo, triton_kind, triton_instances, triton_max_batch)
        return
    settings = None
    if engine is not None:  # validate the profile before spending minutes on export and calibration
        from .engine import EngineSettings

        settings = EngineSettings(batch_min=batch_min, batch_opt=batch_opt, batch_max=batch_max,
                                  workspace_mb=workspace_mb, opt_level=opt_level, timing_cache=timing_cache,
                                  version_compatible=version_compatible, flavour=trt_flavour, tf32=tf32)
    if from_diffusers is not None:
        if run_dir is not None or raw:
            raise ConfigError("--from-diffusers exports a diffusers directory: give no RUN_DIR and no --raw with it")
        from ddpm_deploy.export.from_diffusers import export_diffusers

        out = out or (Path(from_diffusers) / "export")
        out.mkdir(parents=True, exist_ok=True)
        export_diffusers(from_diffusers, out, echo=click.echo)
    else:
        run_dir = Path(run_dir) if run_dir else latest_run()
        if not run_dir.exists():
            raise ArtifactError(f"{run_dir}: run directory not found; train one with ddpm-train or pass RUN_DIR")
        out = out or (run_dir / "export")
        out.mkdir(parents=True, exist_ok=True)
        export_onnx_from_run(run_dir, out, raw=raw, echo=click.echo)
    onnx_path = out / "model.onnx"
    if fp16:
        from .fp16 import export_fp16

        t0 = time.perf_counter()
        onnx_path, rep = export_fp16(onnx_path, out, dataset=calib_dataset)
        err, nodes = rep.error, rep.conversion["nodes"]
        click.echo(f"wrote {onnx_path} in {time.perf_counter() - t0:.1f}s: {nodes['fp16']} nodes fp16, "
                   f"{nodes['fp32']} kept fp32 (reasons in precision.json); ε rel L2 vs fp32 ≤ "
                   f"{err['worst_rel_l2']:.2e} over {len(err['buckets'])} timestep buckets (tolerance {err['tolerance']:g})")
    if settings is not None:
        from .engine import build_engine

        plan = out / "model.plan" if engine == DEFAULT_ENGINE else Path(engine)
        side = build_engine(onnx_path, plan, settings)
        click.echo(f"wrote {plan} ({side.plan['bytes'] / 1e6:.1f} MB, {side.precision}, "
                   f"{side.trt['flavour']} {side.trt['version']}, batch {batch_min}/{batch_opt}/{batch_max}) "
                   f"in {side.build['seconds']:.1f}s, and {plan}.json")
    if triton_repo is not None:
        use_plan = settings is not None and triton_kind == "gpu"
        _write_triton(plan if use_plan else onnx_path, triton_repo, triton_kind, triton_instances, triton_max_batch)


def _write_triton(model: Path, repo: Path, kind: str | None, instances: int, max_batch: int | None) -> None:
    """The Triton model repository for ``model`` (runtime.serve.repository; no torch)."""
    from ddpm_deploy.runtime.serve.repository import RepoSettings, write_repository

    plan = model.suffix.lower() in (".plan", ".engine")
    write_repository(model, repo, RepoSettings(instances=instances, kind=kind or ("gpu" if plan else "cpu"),
                                               max_batch=max_batch))
    click.echo(f"wrote Triton model repository {repo}/ddpm (config.pbtxt, 1/model.py, 1/{model.name}); serve it with "
               f"ddpm-run serve --repo {repo}")


if __name__ == "__main__":
    main()
