"""`ddpm-export`: run dir → model.onnx (→ model.fp16.onnx → model.plan); or, with no torch, ONNX → plan."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import time
from pathlib import Path

import click

from ddpm_deploy.runtime.clitools import CONTEXT, clean_errors, latest_run, setup_logging, version_option
from ddpm_deploy.runtime.errors import ArtifactError, ConfigError, DataError, MissingDependencyError, lazy_import

log = logging.getLogger(__name__)


def export_onnx_from_run(run_dir: Path, out_dir: Path, raw: bool = False, echo=lambda s: None,
                         checkpoint: str | None = None) -> tuple[Path, dict]:
    """Export the run's EMA (or raw) weights (of its last step, or of ``checkpoint``) to out_dir/model.onnx and
    verify it against PyTorch."""
    from ddpm_deploy.trainer.checkpoint import load_model

    from .onnx_export import export_verified

    model, card, step = load_model(run_dir, "raw" if raw else "ema", weights_file(run_dir, checkpoint))
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    echo(f"exporting the {'raw' if raw else 'EMA'} weights of step {step} from {run_dir}")
    onnx_path, report = export_verified(model, card, out_dir, "PyTorch", {
        "run_dir": str(run_dir), "weights": "raw" if raw else "ema", "step": step}, echo)
    return onnx_path, report


def weights_file(run_dir: Path, checkpoint: str | None) -> Path | None:
    """The weights of ``--checkpoint SPEC`` (checkpoints/step_N, step_N or N), or None: the run's last."""
    if checkpoint is None:
        return None
    from ddpm_deploy.trainer.checkpoint import WEIGHTS, find_checkpoint

    return find_checkpoint(Path(run_dir), checkpoint, flag="--checkpoint") / WEIGHTS


def export_diffusers_from_run(run_dir: Path, out: Path, raw: bool = False, checkpoint: str | None = None,
                              scheduler=None, overwrite: bool = False, echo=lambda s: None) -> list[Path]:
    """The run's EMA (or raw) weights as a diffusers DDPMPipeline folder (``to_diffusers.write_pipeline``)."""
    from ddpm_deploy.trainer.checkpoint import MODEL_JSON, load_model

    from .to_diffusers import write_pipeline

    model, card, step = load_model(run_dir, "raw" if raw else "ema", weights_file(run_dir, checkpoint))
    echo(f"mapping the {'raw' if raw else 'EMA'} weights of step {step} from {run_dir} to a diffusers UNet2DModel")
    return write_pipeline(model.state_dict(), card, out, scheduler, overwrite, str(Path(run_dir) / MODEL_JSON), echo)


EXTRAS = {  # what each way of exporting needs: (modules, the extra that installs them)
    "run": (("torch", "safetensors", "onnx"), "export"),
    "diffusers": (("torch", "onnx", "diffusers"), "diffusers"),
    "diffusers-out": (("torch", "safetensors", "diffusers"), "diffusers"),
    "onnx": (("onnx",), "engine"),
    "fp16": (("onnx", "modelopt"), "fp16"),
    "int8": (("onnx", "openvino", "nncf"), "int8"),
}


def require_extra(needs: list[str], feature: str) -> None:
    """MissingDependencyError naming the ddpm-deploy extras to install (all of them, in one line), checked before
    any output is written."""
    extras = [EXTRAS[w][1] for w in needs]
    if len(extras) > 1 and "engine" in extras:  # [fp16] and [int8] include [engine]
        extras.remove("engine")
    for w in needs:
        for m in EXTRAS[w][0]:
            if importlib.util.find_spec(m) is None:
                hint = f"pip install 'ddpm-deploy[{','.join(dict.fromkeys(extras))}]'"
                raise MissingDependencyError(m, feature, hint)


@contextlib.contextmanager
def output_guard(*dirs: Path):
    """A failed export leaves no empty output folder behind, and a fault of the machine (full disk, I/O error)
    becomes one line naming the folder and what was kept (files are written whole or not at all)."""
    dirs = tuple(dict.fromkeys(Path(d) for d in dirs if d is not None))
    before = {d: (set(d.iterdir()) if d.is_dir() else None) for d in dirs}
    try:
        yield
    except BaseException as e:
        for d, had in before.items():
            if had is None and d.is_dir() and not any(d.iterdir()):
                d.rmdir()
        if isinstance(e, OSError) and not isinstance(e, FileNotFoundError):
            new = sorted(p.name for d, had in before.items() if d.is_dir() for p in d.iterdir()
                         if had is None or p not in had)
            kept = (f"written before the fault and kept: {', '.join(new)}" if new else "nothing of this export was "
                    "written") + "; files that were there before are unchanged"
            where = e.filename or (dirs[0] if dirs else "")
            raise OSError(e.errno, f"{e.strerror or e} while exporting ({kept})", str(where)) from None
        raise


def _looks_like_run_dir(path: Path) -> bool:
    return path.is_dir() or (path / "model.json").exists() or Path(path).name in ("latest",)


class ExportCommand(click.Command):
    """Refuses the old spelling `--engine PATH`: `--engine` is a flag now, so a path after it would silently
    become RUN_DIR (or be swallowed as the plan path by older versions)."""

    def parse_args(self, ctx, args):
        for flag, nxt in zip(args, args[1:]):
            if flag == "--engine" and not nxt.startswith("-"):
                what = "a run directory" if _looks_like_run_dir(Path(nxt)) else "a path"
                click.echo(f"error: `--engine {nxt}`: --engine is a flag and takes no value, but {what} follows it. "
                           f"To export a run and build its plan write `ddpm-export {nxt} --engine`; to choose where "
                           f"the plan goes write `--engine --engine-out PATH`", err=True)
                ctx.exit(2)
        return super().parse_args(ctx, args)


class _ProgressBar:
    """TensorRT's build phases as a tqdm bar: the top-level phase's steps, the innermost phase as its label."""

    def __init__(self):
        from tqdm import tqdm

        self._tqdm, self.bar, self.stack = tqdm, None, []

    def phase_start(self, name, parent, num_steps):
        self.stack.append(name)
        if parent is None and self.bar is None:
            self.bar = self._tqdm(total=max(num_steps, 1), desc="engine build", unit="step", dynamic_ncols=True)
        if self.bar is not None:
            self.bar.set_postfix_str(name[:40])

    def step(self, name, step):
        if self.bar is not None and self.stack and name == self.stack[0]:
            self.bar.update(1)
        return True

    def phase_finish(self, name):
        if name in self.stack:
            self.stack.remove(name)
        if not self.stack and self.bar is not None:
            self.bar.close()
            self.bar = None


@click.command(cls=ExportCommand, context_settings=CONTEXT)
@version_option()
@click.argument("run_dir", required=False, type=click.Path(path_type=Path))
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output directory. Default: RUN_DIR/export/ (with --onnx: the ONNX file's folder).")
@click.option("--raw", is_flag=True, help="Export the raw weights instead of the EMA weights.")
@click.option("--checkpoint", "checkpoint", default=None, metavar="STEP",
              help="Export an older checkpoint of RUN_DIR: checkpoints/step_N, step_N or N (the last --keep are "
                   "kept by ddpm-train). Default: the run's last weights.")
@click.option("--diffusers-out", "diffusers_out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write RUN_DIR's model as a diffusers DDPMPipeline folder instead of an ONNX: model_index.json, "
                   "unet/config.json + unet/diffusion_pytorch_model.safetensors (a UNet2DModel with our weights), "
                   "scheduler/scheduler_config.json. Load it with DDPMPipeline.from_pretrained(DIR). Needs "
                   "'ddpm-deploy[diffusers]'.")
@click.option("--diffusers-scheduler", "diffusers_scheduler", default=None, metavar="NAME|JSON",
              help="The scheduler written to the --diffusers-out folder: ddpm, ddim, dpmsolver++, sde-dpmsolver++ or "
                   "a diffusers scheduler_config.json (on the run's forward process). Default: the run's DDPM "
                   "schedule (its variance type and clipping) with diffusers' 'leading' respacing.")
@click.option("--from-diffusers", "from_diffusers", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Export a diffusers UNet2DModel directory instead of a run (config.json + "
                   "diffusion_pytorch_model.safetensors, scheduler_config.json beside it or one level up, e.g. a "
                   "local copy of google/ddpm-cifar10-32). Default --out: DIR/export/.")
@click.option("--onnx", "onnx_in", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Start from this ONNX file (from ddpm-export) instead of a run: everything downstream of it "
                   "(--fp16/--precision, --engine, --adopt-plan) without torch or the training run.")
@click.option("--fp16", is_flag=True, help="Same as --precision fp16.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default=None,
              help="fp16: also write model.fp16.onnx, mixed precision decided from calibration data (ModelOpt "
                   "AutoCast), with precision.json; fails if the ε error exceeds its tolerance in any timestep "
                   "bucket. bf16: the same as model.bf16.onnx + precision.bf16.json. The engine is built from it. "
                   "Default: fp32 only.")
@click.option("--int8", is_flag=True, help="Also write model.int8.xml/.bin: OpenVINO int8 by NNCF post-training "
              "quantization calibrated over timesteps (embedding, time projections, norms, attention and the first/"
              "last conv kept float), with precision.int8.json (ε error per timestep bucket). Sample with "
              "ddpm-run sample --backend openvino --precision int8. Needs 'ddpm-deploy[openvino,int8]'.")
@click.option("--calib-dataset", default=None, help="Dataset for fp16 calibration (same specs as ddpm-train "
              "--dataset). Default: the one named in the model's metadata.")
@click.option("--engine", "engine", is_flag=True, help="Also build a TensorRT plan (from the fp16 ONNX with --fp16, "
              "else fp32) and its model.plan.json sidecar, at --engine-out.")
@click.option("--engine-out", type=click.Path(path_type=Path), default=None,
              help="Where the plan goes (the sidecar is PATH.json). Default: OUT/model.plan.")
@click.option("--adopt-plan", type=click.Path(path_type=Path), default=None,
              help="Write the sidecar of a plan built elsewhere (e.g. by trtexec) from --onnx, after checking the "
                   "ONNX, the plan's header and well-formedness (and, on a GPU, its I/O and batch profile). Give the "
                   "profile it was built with as --batch-min/--batch-opt/--batch-max.")
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
@click.option("--compute-capability", "compute_capability", multiple=True, metavar="CC",
              help="TensorRT-RTX target GPU, e.g. 8.9 (repeat for several). Default: portable to 8.6, 8.9 and 12.0. "
                   "7.5 (Turing) and 12.1 must be asked for; 8.0/9.0/10.0 (A100/H100/B200) are not supported by "
                   "TensorRT-RTX.")
@click.option("--triton-repo", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also write a Triton Inference Server model repository (model `ddpm`, Python backend) here. "
                   "RUN_DIR may be an ONNX file or a plan: then only the repository is written (no torch needed).")
@click.option("--triton-kind", type=click.Choice(["cpu", "gpu"]), default=None,
              help="Triton instance kind: cpu (ONNX Runtime CPU) or gpu (ONNX Runtime CUDA, or the plan). "
                   "Default: gpu for a plan, else cpu.")
@click.option("--triton-instances", type=int, default=1, help="Triton model instances (instance_group count).")
@click.option("--triton-max-batch", type=int, default=None,
              help="Largest batch: the dynamic batcher's (ddpm) and the step-level loop's slots (ddpm_stream). "
                   "Default: the plan's profile max, else 16.")
@click.option("--triton-steps", type=int, default=None,
              help="The repository's default ε calls for requests without steps (default: T for ddpm, else 20).")
@click.option("--triton-scheduler", default=None, metavar="NAME|JSON",
              help="The repository's default scheduler for requests without one: ddpm (default), ddim, dpmsolver++, "
                   "sde-dpmsolver++, unipc, JSON {\"scheduler\": NAME, \"options\": {...}}, or a diffusers "
                   "scheduler_config.json (its content goes into the repository).")
@click.option("--triton-batching", type=click.Choice(["step", "request"]), default=None,
              help="Default: step. step: add ddpm_stream, the step-level model (a decoupled model whose loop admits requests into "
                   "free slots at every ε call; reached by gRPC streaming and HTTP's generate endpoints: `ddpm-run "
                   "request` uses it), beside ddpm for plain HTTP/gRPC infer clients. request: ddpm only (Triton's "
                   "dynamic batcher batches whole requests). docs/scaling.md says when each helps.")
@click.option("--triton-precision", default=None, metavar="PRECISION|BANDS",
              help="CPU serving precision (OpenVINO), as ddpm-run sample's --precision/--precision-bands: bf16, int8, "
                   "int8-bf16, auto, or bands such as bf16:0-99,int8-bf16:100-999; the int8 model beside the ONNX goes "
                   "into the repository. Default: fp32 on ONNX Runtime.")
@click.option("--triton-queue", type=int, default=None,
              help="Step-level: requests that may wait for a slot; past it a request is refused at once with "
                   "'the server is busy' (gRPC UNAVAILABLE). Default: 64.")
@click.option("--overwrite", is_flag=True, help="Replace outputs that exist (model.onnx, export_report.json, the "
              "precision models and reports, the plan and its sidecar, the Triton models). Without it an export "
              "that would replace a file refuses before doing anything; with it only the files this export writes "
              "are replaced, other files stay (for --triton-repo: other versions and files of ddpm/ddpm_sampler/"
              "ddpm_stream).")
@click.option("--no-progress", is_flag=True, envvar="DDPM_NO_PROGRESS", show_envvar=True,
              help="No engine-build progress bar.")
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
@clean_errors
def main(run_dir, out, raw, checkpoint, diffusers_out, diffusers_scheduler, from_diffusers, onnx_in, fp16, precision, int8, calib_dataset, engine, engine_out, adopt_plan,
         trt_flavour, batch_min, batch_opt, batch_max, workspace_mb, opt_level, timing_cache, version_compatible, tf32,
         compute_capability, triton_repo, triton_kind, triton_instances, triton_max_batch, triton_steps,
         triton_scheduler, triton_batching, triton_queue, triton_precision, overwrite, no_progress, verbose):
    """Export a trained run to ONNX, and optionally to fp16 mixed precision and a TensorRT engine.

    \b
      ddpm-export                          runs/latest -> runs/latest/export/model.onnx
      ddpm-export RUN_DIR --fp16           + model.fp16.onnx, precision.json
      ddpm-export RUN_DIR --fp16 --engine  + model.plan, model.plan.json (TensorRT or TensorRT-RTX)
      ddpm-export --onnx model.onnx --engine [--engine-out m.plan]     on the serving machine: no torch needed
      ddpm-export --onnx model.onnx --adopt-plan m.plan --batch-max 256  sidecar for a plan built by trtexec
      ddpm-export RUN_DIR --overwrite      export again over an earlier export (refused without it)
      ddpm-export RUN_DIR --diffusers-out DIR   a diffusers DDPMPipeline folder (UNet2DModel + scheduler)
      ddpm-export RUN_DIR --checkpoint step_N   an older checkpoint of the run

    RUN_DIR defaults to runs/latest (the last ddpm-train run). The ONNX model has inputs x float32
    [B,C,H,W] and t int32 [B], output eps float32 [B,C,H,W], a dynamic batch axis, and the DDPM config
    as JSON in its metadata (key ddpm_deploy.config). Right after export it is run in ONNX Runtime and
    compared with the PyTorch checkpoint; the comparison is saved as export_report.json.

    With --diffusers-out DIR the run (EMA weights; --raw, --checkpoint) is written as a diffusers DDPMPipeline
    folder instead; a config or weight with no UNet2DModel equivalent is refused by name.

    With --from-diffusers DIR, a diffusers UNet2DModel (ε-prediction, DDPMScheduler config) is exported with
    the same contract and metadata, and verified against the diffusers model in PyTorch.

    A plan is tied to one TensorRT version and GPU architecture, so build it where it will run: install
    'ddpm-deploy[engine]' plus a TensorRT flavour there and run `ddpm-export --onnx model.onnx --engine`.
    """
    setup_logging(verbose)
    for flag, value in (("--triton-instances", triton_instances), ("--triton-max-batch", triton_max_batch),
                        ("--triton-steps", triton_steps), ("--triton-queue", triton_queue)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be >= 1, found {value}")
    if triton_repo is None and (triton_kind is not None or triton_max_batch is not None or triton_instances != 1
                                or triton_steps is not None or triton_scheduler is not None
                                or triton_queue is not None or triton_batching is not None
                                or triton_precision is not None):
        raise ConfigError("--triton-kind/--triton-instances/--triton-max-batch/--triton-steps/--triton-scheduler/"
                          "--triton-batching/--triton-queue/--triton-precision describe a Triton repository; add "
                          "--triton-repo DIR")
    from ddpm_deploy.runtime.serve.repository import DEFAULT_BATCHING

    triton_batching = triton_batching or DEFAULT_BATCHING
    if triton_queue is not None and triton_batching != "step":
        raise ConfigError("--triton-queue bounds the step-level model's wait queue; it needs --triton-batching step")
    if diffusers_scheduler is not None and diffusers_out is None:
        raise ConfigError("--diffusers-scheduler names the scheduler of a diffusers folder; add --diffusers-out DIR")
    if checkpoint is not None and (onnx_in is not None or from_diffusers is not None):
        raise ConfigError("--checkpoint chooses a checkpoint of a ddpm-train run (RUN_DIR); it does not apply to "
                          "--onnx or --from-diffusers")
    if diffusers_out is not None:
        _export_diffusers_folder(run_dir, diffusers_out, raw, checkpoint, diffusers_scheduler, overwrite, {
            "--out": out, "--from-diffusers": from_diffusers, "--onnx": onnx_in, "--fp16": fp16,
            "--precision": precision, "--int8": int8, "--engine": engine, "--adopt-plan": adopt_plan,
            "--triton-repo": triton_repo, "--calib-dataset": calib_dataset})
        return
    triton = None
    if triton_repo is not None:
        from ddpm_deploy.runtime.serve.repository import check_target

        check_target(triton_repo, overwrite)  # before any work
        if triton_scheduler is not None and not triton_scheduler.lstrip().startswith("{") and \
                Path(triton_scheduler).is_file():
            import json

            from ddpm_deploy.runtime.sampling.config import read_config_file

            triton_scheduler = json.dumps(read_config_file(triton_scheduler))  # the config, not a path
        triton = dict(repo=triton_repo, kind=triton_kind, instances=triton_instances, max_batch=triton_max_batch,
                      steps=triton_steps, scheduler=triton_scheduler, overwrite=overwrite, batching=triton_batching,
                      queue=triton_queue, precision=triton_precision or "fp32")
        from ddpm_deploy.runtime.serve.repository import RepoSettings

        try:  # the precision's form and kind now, before any work
            RepoSettings(kind=triton_kind or "cpu", precision=triton.get("precision"))
        except ConfigError as e:
            raise ConfigError(f"--triton-precision: {e}") from None
    if run_dir is not None and Path(run_dir).suffix.lower() in (".onnx", ".plan", ".engine", ".trt"):
        if triton_repo is None:
            raise ConfigError(f"{run_dir} is a model file: give --triton-repo DIR to write a Triton repository for it, "
                              f"or --onnx {run_dir} for engine builds and precisions (RUN_DIR is a ddpm-train run)")
        _write_triton(Path(run_dir), **triton)
        return
    precision_given = precision
    precision = precision or ("fp16" if fp16 else "fp32")
    if fp16 and precision not in ("fp16",):
        raise ConfigError(f"--fp16 and --precision {precision} disagree; give one of them")
    sources = [name for name, given in (("RUN_DIR", run_dir is not None), ("--from-diffusers", from_diffusers),
                                        ("--onnx", onnx_in)) if given]
    if len(sources) > 1:
        raise ConfigError(f"give one model source, found {' and '.join(sources)}: RUN_DIR (a ddpm-train run), "
                          "--from-diffusers DIR or --onnx FILE (give no RUN_DIR with the other two)")
    if engine_out is not None and not engine and adopt_plan is None:
        raise ConfigError("--engine-out names where the plan goes; add --engine to build one")
    for flag, path in (("--engine-out", engine_out), ("--adopt-plan", adopt_plan)):
        if path is not None and _looks_like_run_dir(path):
            raise ConfigError(f"{flag} {path}: expected a plan file path, found a directory (a run dir?); plans are "
                              f"files such as {path / 'model.plan'}")
    if adopt_plan is not None and (onnx_in is None or engine or fp16 or int8):
        raise ConfigError("--adopt-plan needs --onnx (the ONNX the plan was built from) and takes no --engine, --fp16 "
                          "or --int8: it writes the sidecar of an existing plan (--precision: what the plan was built "
                          "as, e.g. fp16 for trtexec --fp16)")
    # every option is checked before any output exists
    if calib_dataset is not None:
        if precision == "fp32" and not int8:
            raise ConfigError(f"--calib-dataset {calib_dataset}: calibration data is used only with --fp16, "
                              f"--precision fp16|bf16 or --int8")
        from ddpm_deploy.trainer.data import check_dataset_spec

        try:
            check_dataset_spec(calib_dataset)
        except DataError as e:
            raise DataError(f"--calib-dataset: {e}") from None
    if raw and onnx_in is not None:
        raise ConfigError("--raw chooses the weights of a ddpm-train run; it does not apply to --onnx")
    if raw and from_diffusers is not None:
        raise ConfigError("--from-diffusers exports a diffusers directory: --raw applies to ddpm-train runs")
    needs = ["onnx" if onnx_in is not None else "diffusers" if from_diffusers is not None else "run"]
    feature = ("ddpm-export --onnx" if onnx_in is not None else "ddpm-export --from-diffusers"
               if from_diffusers is not None else "ddpm-export from a ddpm-train run")
    if precision in ("fp16", "bf16"):
        needs.append("fp16")
        feature += f" --precision {precision}"
    if int8:
        needs.append("int8")
        feature += " --int8"
    require_extra(needs, feature)
    settings = None
    if engine or adopt_plan is not None:  # validate the profile before spending minutes on export and calibration
        lazy_import("onnx", "Building and adopting TensorRT plans", "pip install 'ddpm-deploy[engine]'")
        from ddpm_deploy.runtime.backends.trt import load_tensorrt

        from .engine import EngineSettings

        settings = EngineSettings(batch_min=batch_min, batch_opt=batch_opt, batch_max=batch_max,
                                  workspace_mb=workspace_mb, opt_level=opt_level, timing_cache=timing_cache,
                                  version_compatible=version_compatible, flavour=trt_flavour, tf32=tf32,
                                  compute_capabilities=compute_capability)
        if engine:
            load_tensorrt(trt_flavour, "ddpm-export --engine")
    if onnx_in is not None:
        from .onnx_io import check_ddpm_onnx

        check_ddpm_onnx(onnx_in)
    from ddpm_deploy.runtime.outputs import Outputs
    from ddpm_deploy.runtime.plan import sidecar_path

    if adopt_plan is not None:
        from .engine import adopt_plan as adopt

        with Outputs("ddpm-export --adopt-plan", [sidecar_path(adopt_plan)], overwrite) as w:
            side = adopt(adopt_plan, onnx_in, settings, precision=precision_given, write=w.stage)
        click.echo(f"adopted {adopt_plan} ({side.trt['flavour']} {side.trt['version']}, {side.precision}, batch "
                   f"{batch_min}/{batch_opt}/{batch_max}; checked on a GPU: {side.build['verified_on_gpu'] or 'no'}); "
                   f"wrote {adopt_plan}.json")
        for u in side.build.get("unchecked") or []:
            click.echo(f"not checked here: {u}", err=True)
        return
    if onnx_in is not None:
        out = out or onnx_in.parent
    elif from_diffusers is not None:
        out = out or (Path(from_diffusers) / "export")
    else:
        run_dir = Path(run_dir) if run_dir else latest_run()
        if not run_dir.exists():
            raise ArtifactError(f"{run_dir}: run directory not found; train one with ddpm-train or pass RUN_DIR")
        out = out or (run_dir / "export")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: expected a folder, found a file")
    Outputs("ddpm-export", _targets(out, onnx_in is None, precision, int8, settings is not None and (engine_out or
                                    out / "model.plan")), overwrite, hint="choose another --out").claim()
    plan_dir = (engine_out or out / "model.plan").parent if settings is not None else None
    with output_guard(out, plan_dir, triton_repo):
        _export(run_dir, out, raw, from_diffusers, onnx_in, precision, int8, calib_dataset, settings, engine_out,
                no_progress, triton, batch_min, batch_opt, batch_max, checkpoint)


def _export_diffusers_folder(run_dir, out: Path, raw: bool, checkpoint, scheduler, overwrite: bool,
                             others: dict) -> None:
    """``--diffusers-out``: the run as a DDPMPipeline folder, and nothing else."""
    given = [flag for flag, value in others.items() if value]
    if given:
        raise ConfigError(f"--diffusers-out writes only a diffusers folder from RUN_DIR; {', '.join(given)} "
                          f"belong{'s' if len(given) == 1 else ''} to an ONNX export: run ddpm-export again without "
                          f"--diffusers-out for {'it' if len(given) == 1 else 'them'}")
    if run_dir is not None and Path(run_dir).suffix.lower() in (".onnx", ".plan", ".engine", ".trt"):
        raise ConfigError(f"--diffusers-out: {run_dir} is a model file; RUN_DIR must be a ddpm-train run (the "
                          f"UNet2DModel is made from its PyTorch weights)")
    require_extra(["diffusers-out"], "ddpm-export --diffusers-out")
    run_dir = Path(run_dir) if run_dir else latest_run()
    if not run_dir.is_dir():
        raise ArtifactError(f"{run_dir}: run directory not found; train one with ddpm-train or pass RUN_DIR")
    from ddpm_deploy.runtime.outputs import Outputs

    from .to_diffusers import targets

    Outputs("ddpm-export --diffusers-out", targets(out), overwrite, hint="choose another --diffusers-out").claim()
    with output_guard(out):
        export_diffusers_from_run(run_dir, out, raw, checkpoint, scheduler, overwrite, echo=click.echo)


def _targets(out: Path, onnx: bool, precision: str, int8: bool, plan) -> list[Path]:
    """Every file an export writes (refused if one exists, unless --overwrite)."""
    from ddpm_deploy.runtime.plan import sidecar_path

    paths = [out / "model.onnx", out / "export_report.json"] if onnx else []
    if precision in ("fp16", "bf16"):
        paths += [out / f"model.{precision}.onnx", out / ("precision.json" if precision == "fp16" else
                                                         f"precision.{precision}.json")]
    if int8:
        paths += [out / "model.int8.xml", out / "model.int8.bin", out / "precision.int8.json"]
    if plan:
        paths += [Path(plan), sidecar_path(plan)]
    return paths


def _export(run_dir, out, raw, from_diffusers, onnx_in, precision, int8, calib_dataset, settings, engine_out,
            no_progress, triton, batch_min, batch_opt, batch_max, checkpoint=None):
    if onnx_in is not None:
        out.mkdir(parents=True, exist_ok=True)
        onnx_path = onnx_in
    elif from_diffusers is not None:
        from .from_diffusers import export_diffusers

        export_diffusers(from_diffusers, out, echo=click.echo)
        onnx_path = out / "model.onnx"
    else:
        export_onnx_from_run(run_dir, out, raw=raw, echo=click.echo, checkpoint=checkpoint)
        onnx_path = out / "model.onnx"
    if precision in ("fp16", "bf16"):
        from .fp16 import export_fp16, precision_json_name

        t0 = time.perf_counter()
        onnx_path, rep = export_fp16(onnx_path, out, dataset=calib_dataset, precision=precision)
        err, nodes = rep.error, rep.conversion["nodes"]
        click.echo(f"wrote {onnx_path} in {time.perf_counter() - t0:.1f}s: {nodes[precision]} nodes {precision}, "
                   f"{nodes['fp32']} kept fp32 (reasons in {precision_json_name(precision)}); ε rel L2 vs fp32 ≤ "
                   f"{err['worst_rel_l2']:.2e} over {len(err['buckets'])} timestep buckets (tolerance {err['tolerance']:g})")
    if int8:
        from .int8 import INT8_JSON_NAME, export_int8

        t0 = time.perf_counter()
        fp32_onnx = onnx_in if onnx_in is not None else out / "model.onnx"
        xml, rep = export_int8(fp32_onnx, out, dataset=calib_dataset)
        click.echo(f"wrote {xml} in {time.perf_counter() - t0:.1f}s ({rep.conversion['fake_quantize_nodes']} quantizers, "
                   f"{len(rep.conversion['conv_matmul']['kept_float'])} conv/matmul kept float); ε rel L2 vs fp32 ≤ "
                   f"{rep.error['worst_rel_l2']:.3g} per timestep bucket ({'within' if rep.passed else 'above'} the fp16 "
                   f"tolerance {rep.error['tolerance']:g}; judge int8 by sample fidelity, README), in {INT8_JSON_NAME}")
    if settings is not None:
        from .engine import build_engine

        plan = engine_out or out / "model.plan"
        side = build_engine(onnx_path, plan, settings, progress=None if no_progress else _ProgressBar())
        targets = ", ".join(side.build.get("compute_capabilities") or []) or "8.6, 8.9, 12.0 (default)"
        where = f"compute capability {targets}" if side.trt["flavour"] == "rtx" else "the GPU it was built on"
        click.echo(f"wrote {plan} ({side.plan['bytes'] / 1e6:.1f} MB, {side.precision}, "
                   f"{side.trt['flavour']} {side.trt['version']}, batch {batch_min}/{batch_opt}/{batch_max}) "
                   f"in {side.build['seconds']:.1f}s, and {plan}.json; runs on {where}")
    if triton is not None:
        use_plan = settings is not None and triton["kind"] == "gpu"
        _write_triton(plan if use_plan else onnx_path, **triton)


def _write_triton(model: Path, repo: Path, kind: str | None, instances: int, max_batch: int | None,
                  steps: int | None = None, scheduler: str | None = None, overwrite: bool = False,
                  batching: str | None = None, queue: int | None = None, precision: str = "fp32") -> None:
    """The Triton model repository for ``model`` (runtime.serve.repository; no torch)."""
    from ddpm_deploy.runtime.serve.repository import DEFAULT_BATCHING, DEFAULT_QUEUE, RepoSettings, write_repository

    batching = batching or DEFAULT_BATCHING

    plan = model.suffix.lower() in (".plan", ".engine", ".trt")
    write_repository(model, repo, RepoSettings(instances=instances, kind=kind or ("gpu" if plan else "cpu"),
                                               max_batch=max_batch, default_steps=steps, default_scheduler=scheduler,
                                               batching=batching, queue_size=DEFAULT_QUEUE if queue is None else queue,
                                               precision=precision),
                     overwrite=overwrite)
    stream = " and ddpm_stream (config.pbtxt, 1/model.py: step-level batching)" if batching == "step" else ""
    click.echo(f"wrote Triton model repository {repo}: ddpm (config.pbtxt, the model clients call) and ddpm_sampler "
               f"(config.pbtxt, 1/model.py, 1/{model.name}){stream}; serve it with ddpm-run serve --repo {repo}")


if __name__ == "__main__":
    main()
