"""`ddpm-run`: sample with the framework-free runtime (and, later, check parity and benchmark)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click

from .clitools import CONTEXT, clean_errors, latest_run, setup_logging, version_option
from .config import DataSpec, ModelCard
from .errors import ArtifactError, ConfigError, out_of_memory
from .schedule import DiffusionConfig

CTX = CONTEXT


@click.group(context_settings=CTX)
@version_option()
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
@click.option("--seed", type=int, default=0, envvar="DDPM_SEED", show_envvar=True, help="Seed; image i of seed s is the same at any batch size.")
@click.option("--start-index", type=int, default=0, help="Index of the first image (resume or shard a large job).")
@click.option("--steps", type=int, default=None,
              help="ε calls per image. DDPM: respaced ancestral sampling with K < T steps (default: all T). Other "
                   "schedulers: default 20.")
@click.option("--scheduler", default=None, metavar="NAME",
              help="ddpm (ancestral, the default), ddim, dpmsolver++, sde-dpmsolver++ or unipc; diffusers' class names "
                   "(DDIMScheduler, …) work too. See the README for which to use at which step count.")
@click.option("--scheduler-config", type=click.Path(path_type=Path), default=None,
              help="A diffusers scheduler_config.json (or a pipeline folder with scheduler/), read as diffusers reads "
                   "it: _class_name picks the scheduler; a field ddpm-deploy does not implement is refused by name. "
                   "--scheduler, --eta, --order and --option override it.")
@click.option("--eta", type=float, default=None, help="DDIM's η: 0 deterministic (default), 1 DDPM-like noise.")
@click.option("--order", type=int, default=None, help="solver_order of dpmsolver++ / unipc (1–3; default 2).")
@click.option("--option", "sched_options", multiple=True, metavar="KEY=VALUE",
              help="Any other option of the scheduler by its diffusers name, value as JSON (repeatable), e.g. "
                   "--option use_karras_sigmas=true --option timestep_spacing=trailing.")
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output directory. Default: samples/ beside the model.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu",
              help="cpu: NumPy loop + ONNX Runtime CPU. cuda: the GPU device loop (fused NVRTC step kernel) with "
                   "ONNX Runtime CUDA (needs onnxruntime-gpu and cuda-python). --engine implies cuda.")
@click.option("--backend", type=click.Choice(["onnxruntime", "openvino"]), default=None,
              help="CPU backend: onnxruntime, or openvino (pip install 'ddpm-deploy[openvino]'). Default: by the "
                   "file (.onnx: onnxruntime, .xml: openvino).")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "int8", "int8-bf16", "auto"]), default="fp32",
              help="OpenVINO only. bf16: its inference precision hint (fast only on CPUs with AVX512_BF16/AMX; "
                   "emulated and slow elsewhere); int8: the NNCF int8 model model.int8.xml beside the ONNX (ddpm-export "
                   "--onnx model.onnx --int8 writes it); int8-bf16: that model with the layers it keeps float run in "
                   "bf16 (CPUs with native bf16). auto: the fastest setting that keeps sample quality here — "
                   "OpenVINO bf16 on a CPU with native bf16 and OpenVINO installed, else fp32 — recorded with the "
                   "reason in run.json (precision_choice). See the README for each precision's measured fidelity.")
@click.option("--precision-bands", default=None, metavar="P:FIRST-LAST,...",
              help="OpenVINO: a precision per timestep band, e.g. bf16:0-99,int8-bf16:100-599,bf16:600-999 (every "
                   "timestep once; precisions as --precision); each image's ε comes from its timestep's precision. "
                   "Replaces --precision. See the README for the measured bands.")
@click.option("--cuda-graph/--no-cuda-graph", default=True, help="Capture the device loop's step in a CUDA graph "
              "where the backend allows it (results are identical either way).")
@click.option("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0, the default: one per core). "
              "Measured on 2 cores (tiny, batch 16; benchmarks/results/cpu-threads-tiny-spin): 0 is fastest idle "
              "(17.6 images/s vs 12.8 with 1 thread) and ties 1 thread with another process busy (13.5 vs 13.2), "
              "because the worker threads sleep instead of spinning between calls (DDPM_ORT_SPIN=1 restores "
              "spinning: 9.1 images/s there).")
@click.option("--graph-opt", type=click.Choice(["disable", "basic", "extended", "all"]), default="all",
              help="ONNX Runtime graph optimisation level.")
@click.option("--no-pngs", is_flag=True, help="Skip images/NNNNNN.png (grid.png and samples.npz are still written).")
@click.option("--resume", is_flag=True, help="Continue the job in --out (interrupted, failed or killed): same model, "
              "backend, precision, seed, steps and indices (checked against its run.json); finished batches are kept, the rest is sampled. "
              "Starts the job if --out holds none.")
@click.option("--overwrite", is_flag=True, help="Replace the samples already in --out (samples.npz, run.json, grid.png, "
              "images/*.png, parts/; other files stay), removed once the model and options are checked, before the "
              "first batch. Without --resume or --overwrite a folder holding samples is refused.")
@click.option("--schedule", type=click.Choice(["linear", "cosine"]), default=None,
              help="Override / supply the β schedule (for ONNX files without our metadata).")
@click.option("--beta-start", type=float, default=None, help="Override / supply β_1.")
@click.option("--beta-end", type=float, default=None, help="Override / supply β_T.")
@click.option("--num-timesteps", type=int, default=None, help="Override / supply T.")
@click.option("--variance-type", type=click.Choice(["fixed_small", "fixed_large"]), default=None,
              help="Override the sampler variance.")
@click.option("--clip/--no-clip", default=None, help="Override clipping of x̂0 to [-1, 1].")
@click.option("--shard", default=None, metavar="I/N",
              help="Sample shard I of N of the job (--num images from --start-index), into OUT/shard-I-of-N/. "
                   "Default: from SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT, else torchrun's RANK/WORLD_SIZE, else "
                   "no sharding. Merge the shards with ddpm-run merge.")
@click.option("--device-id", type=int, default=None,
              help="GPU to run on (--device cuda / --engine). Default: LOCAL_RANK (torchrun), else 0.")
@click.option("--no-progress", is_flag=True, envvar="DDPM_NO_PROGRESS", show_envvar=True, help="No progress bar.")
@click.option("-v", "--verbose", count=True, help="More logging.")
@clean_errors
def sample(onnx_path, engine, num, batch, seed, start_index, steps, scheduler, scheduler_config, eta, order,
           sched_options, out, device, backend, precision, precision_bands, cuda_graph,
           threads, graph_opt, no_pngs, resume, overwrite, schedule, beta_start, beta_end, num_timesteps, variance_type, clip, shard,
           device_id, no_progress,
           verbose):
    """Sample images: DDPM ancestral sampling (1000 steps by default), or a fast scheduler in 10–50 ε calls.

    \b
    ddpm-run sample --scheduler dpmsolver++ --steps 20     (DPM-Solver++ 2M, 20 ε calls per image)
    ddpm-run sample --scheduler ddim --steps 50 --eta 0    (DDIM)
    ddpm-run sample --scheduler-config scheduler_config.json   (a diffusers scheduler config, as is)

    \b
    CPU:  ddpm-run sample --onnx model.onnx            (NumPy step, ε from ONNX Runtime CPU)
    GPU:  ddpm-run sample --engine model.plan          (device loop, ε from TensorRT / TensorRT-RTX)
          ddpm-run sample --onnx model.onnx --device cuda   (device loop, ε from ONNX Runtime CUDA)

    Writes grid.png, images/NNNNNN.png, samples.npz (uint8 images + indices) and run.json. The same seed
    gives the same images on every backend and batch size (counter-based Philox noise).

    Nothing is lost: every finished batch is on disk at once (parts/), so after Ctrl-C (exit 130), SIGTERM (143),
    a crash or kill -9, `--resume` continues the job to the same bytes. A folder that already holds samples is
    refused unless --resume or --overwrite is given.
    """
    setup_logging(verbose)
    from contextlib import ExitStack

    from .backends.base import open_runner, resolve_model
    from .output import sample_job
    from .sampling.open import open_loop
    from .shard import device_id_from, shard_from

    from .rng import MAX_SEED, MAX_WORD

    if num <= 0 or batch <= 0:
        raise ConfigError(f"--num and --batch must be positive, found --num {num} --batch {batch}")
    if not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"--seed must be in [0, 2**64 - 1], found {seed}")
    if start_index < 0 or start_index + num - 1 > MAX_WORD - 1:
        raise ConfigError(f"--start-index and --num must keep the sample indices in [0, 2**32 - 2], found indices "
                          f"{start_index}-{start_index + num - 1}")
    if steps is not None and steps <= 0:
        raise ConfigError(f"--steps must be a positive number of sampling steps, found {steps}")
    if resume and overwrite:
        raise ConfigError("give --resume (continue the job in --out) or --overwrite (replace it), not both")
    if threads < 0:
        raise ConfigError(f"--threads must be >= 0 (0: all cores), found {threads}")
    if engine is not None and onnx_path is not None:
        raise ConfigError("give either --onnx or --engine, not both")
    if engine is not None:
        device, backend = "cuda", "tensorrt"  # a plan is a plan whatever its suffix (trtexec writes .trt too)
    model_path = Path(engine or onnx_path or latest_run() / "export" / "model.onnx")
    choice = None
    if precision == "auto":
        from .backends.base import auto_precision

        chosen_backend, chosen, why = auto_precision(model_path, device, backend)
        choice = {"asked": "auto", "backend": chosen_backend or "onnxruntime", "precision": chosen, "reason": why}
        click.echo(f"--precision auto: {why}", err=True)
        backend, precision = chosen_backend, chosen
    # the artifact and backend for --backend/--precision (int8: model.int8.xml beside the ONNX), as the API picks them
    model_path, backend, ov_precision = resolve_model(model_path, device, backend, precision)
    job = shard_from(shard)
    job_out, job_num, job_start = out, num, start_index  # as given (a shard narrows them below)
    shard_info = None
    if job is not None:
        first, end = job.range(num, start_index)
        shard_info = {"index": job.index, "count": job.count, "num_total": num}
        out = (out or model_path.parent / "samples") / job.folder()
        start_index, num = first, end - first
        click.echo(f"shard {job}: indices {first}-{end - 1} -> {out}")
    with ExitStack() as stack:
        if precision_bands is not None:
            from .backends.banded import open_banded

            if device != "cpu" or backend not in (None, "openvino") or precision not in ("fp32",):
                raise ConfigError("--precision-bands runs OpenVINO on the CPU and replaces --precision: drop "
                                  "--precision / --device cuda / --engine")
            backend = "openvino"
            runner = stack.enter_context(open_banded(model_path, precision_bands, threads))
        else:
            runner = stack.enter_context(open_runner(model_path, device, backend=backend, threads=threads,
                                                     opt_level=graph_opt, cuda_graph=cuda_graph,
                                                     precision=ov_precision, device_id=device_id_from(device_id)))
        card = _resolve_card(runner, schedule, beta_start, beta_end, num_timesteps, variance_type, clip)
        shape = (card.data.channels, card.data.image_size, card.data.image_size)
        plan = resolve_plan(card, scheduler, scheduler_config, steps, eta, order, sched_options,
                            variance_type=variance_type, clip=clip)
        try:
            loop = stack.enter_context(open_loop(runner, shape, max_batch=min(batch, num), cuda_graph=cuda_graph))
        except MemoryError as e:  # the loop's buffers for the batch
            raise out_of_memory("the host (NumPy)", min(batch, num), f"MemoryError: {e}") from None
        out = out or model_path.parent / "samples"
        def hint(error=None) -> str:  # the command that continues the job (with the smaller batch after OOM)
            b = getattr(error, "suggested_batch", None) or batch
            cmd = _resume_command(engine, onnx_path, out if job is None else (job_out or out.parent), job_num, b,
                                  seed, job_start, steps, backend, precision, device,
                                  None if job is None else f"{job.index}/{job.count}", no_pngs,
                                  scheduler_args(scheduler, scheduler_config, eta, order, sched_options))
            return cmd + (f" --precision-bands {precision_bands}" if precision_bands else "")
        bar = None
        if not no_progress:  # shown from the first step on (not before the output folder is checked)
            bar = stack.enter_context(_LazyBar(total=num * len(plan), unit="img·step", unit_scale=True,
                                               dynamic_ncols=True, desc="sample"))
        mode = "resume" if resume else "overwrite" if overwrite else "new"
        info = sample_job(runner, loop, plan, card, model_path, out, seed, start_index, num, batch,
                          write_pngs=not no_pngs, on_step=bar.update if bar is not None else None, shard=shard_info,
                          mode=mode, resume_hint=hint, echo=lambda s: click.echo(s, err=True),
                          on_skip=(lambda n: bar.update(n * len(plan))) if bar is not None else None,
                          precision_choice=choice)
    if getattr(info, "nothing_to_do", False):
        return
    total = max(info.total_seconds, 1e-9)
    med = info.timings.get("eps_ms_median") or info.timings.get("step_ms_median") or 0.0
    click.echo(f"sampled {num} images ({plan.scheduler}, {len(plan)} ε calls each, batch {batch}, {runner.name}) in "
               f"{total:.1f}s "
               f"({num / total:.2f} images/s; {med:.1f} ms/step median)")
    click.echo(f"wrote {out}/grid.png, images/, samples.npz, run.json")


class _LazyBar:
    """A tqdm bar created at its first update."""

    def __init__(self, **kw):
        self.kw, self.bar = kw, None

    def update(self, n):
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(initial=n, **self.kw)
        else:
            self.bar.update(n)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()


def _resume_command(engine, onnx_path, out, num, batch, seed, start_index, steps, backend, precision, device, shard,
                    no_pngs, sched_args=()) -> str:
    """The command that continues this job (printed when it is interrupted)."""
    import shlex

    args = ["ddpm-run", "sample"]
    if engine is not None:
        args += ["--engine", str(engine)]
    elif onnx_path is not None:
        args += ["--onnx", str(onnx_path)]
    args += ["--out", str(out), "--num", str(num), "--batch", str(batch), "--seed", str(seed)]
    if start_index:
        args += ["--start-index", str(start_index)]
    if steps is not None:
        args += ["--steps", str(steps)]
    if device != "cpu" and engine is None:
        args += ["--device", device]
    if backend not in (None, "tensorrt"):
        args += ["--backend", backend]
    if precision != "fp32":
        args += ["--precision", precision]
    if shard:
        args += ["--shard", str(shard)]
    if no_pngs:
        args.append("--no-pngs")
    return shlex.join([*args, *sched_args, "--resume"])


def scheduler_args(scheduler, scheduler_config, eta, order, sched_options) -> list[str]:
    """The scheduler options of a command line, as given (for the resume command)."""
    args: list[str] = []
    if scheduler is not None:
        args += ["--scheduler", str(scheduler)]
    if scheduler_config is not None:
        args += ["--scheduler-config", str(scheduler_config)]
    if eta is not None:
        args += ["--eta", repr(eta)]
    if order is not None:
        args += ["--order", str(order)]
    for o in sched_options:
        args += ["--option", o]
    return args


FLAG_OPTIONS = {"eta": "--eta", "solver_order": "--order"}


def parse_options(sched_options) -> dict:
    """--option KEY=VALUE pairs, values as JSON (a bare word is a string)."""
    import json

    out = {}
    for item in sched_options:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--option must be KEY=VALUE (a diffusers option name and a JSON value), found {item!r}")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def resolve_plan(card: ModelCard, scheduler, scheduler_config, steps, eta, order, sched_options,
                 variance_type=None, clip=None):
    """The StepPlan of a command line's scheduler options (the one place the CLIs build plans)."""
    from .sampling.config import DDPMConfig, SCHEDULERS, from_diffusers, make_scheduler, plan_for, read_config_file, \
        scheduler_class

    options = parse_options(sched_options)
    for key, flag, value in (("eta", "--eta", eta), ("solver_order", "--order", order)):
        if value is not None and key in options:
            raise ConfigError(f"{key} is given twice ({flag} {value} and --option {key}={options[key]}); give one")
    given = {"eta": eta, "solver_order": order, **options}
    given = {k: v for k, v in given.items() if v is not None}
    if scheduler_config is not None:
        source = read_config_file(scheduler_config)
        name = source.get("_class_name")
        if scheduler is not None:
            cls, preset = scheduler_class(scheduler)
            if name in SCHEDULERS and cls.NAME != name:
                raise ConfigError(f"--scheduler {scheduler} is {cls.NAME}, --scheduler-config {scheduler_config} is a "
                                  f"{name} config; give one of them")
            given = {**preset, **given}
        if name in SCHEDULERS:
            _checked(name, given, options)
        cfg = from_diffusers(source, card.diffusion, str(scheduler_config), **given)
    else:
        cls, _ = scheduler_class(scheduler or "ddpm")
        cfg = make_scheduler(scheduler or "ddpm", **_checked(cls.NAME, given, options))
    if isinstance(cfg, DDPMConfig):  # the flags win over a config file, as every other option does
        import dataclasses

        for key, value, flag in (("variance_type", variance_type, "--variance-type"), ("clip_sample", clip, "--clip")):
            if value is not None and key in options:
                raise ConfigError(f"{key} is given twice ({flag} and --option {key}); give one")
            if value is not None:
                cfg = dataclasses.replace(cfg, **{key: value})
    else:
        if variance_type is not None:
            raise ConfigError(f"--variance-type is an option of the ddpm scheduler, not of {cfg.NAME}")
        if clip is not None:
            if "clip_sample" not in cfg.option_names():
                raise ConfigError(f"--clip/--no-clip is not an option of {cfg.NAME} (it never clips x̂0)")
            import dataclasses

            cfg = dataclasses.replace(cfg, clip_sample=clip)
    return plan_for(card.diffusion, cfg, steps)


def _checked(name: str, given: dict, from_option=()) -> dict:
    """``given`` if the scheduler takes every option; else one error naming the flag and the scheduler."""
    from .sampling.config import scheduler_class

    cls, _ = scheduler_class(name)
    for key in given:
        if key not in cls.option_names():
            flag = f"--option {key}" if key in from_option else FLAG_OPTIONS.get(key, f"--option {key}")
            raise ConfigError(f"{flag} is not an option of {cls.NAME}; its options: {', '.join(cls.option_names())}")
    return given


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
    with OrtRunner(onnx_path) as runner:
        click.echo(f"model: {onnx_path}")
        click.echo(f"precision: {runner.precision}")
        click.echo(f"inputs: {[(i.name, i.type, i.shape) for i in runner.session.get_inputs()]}")
        click.echo(f"outputs: {[(o.name, o.type, o.shape) for o in runner.session.get_outputs()]}")
        if runner.io is not None:
            click.echo(f"io: {runner.io.describe()}")
        click.echo("ddpm config: " + (runner.card.to_json() if runner.card else "none (no ddpm-deploy metadata)"))
    from .cpu import cpu_precisions

    cpu = cpu_precisions()
    click.echo(f"this CPU: {cpu.model}; runs natively: {cpu.describe()}")


@main.command(context_settings=CTX)
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.argument("shards", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--overwrite", is_flag=True, help="Replace samples.npz, grid.png and run.json already in OUT.")
@clean_errors
def merge(out, shards, overwrite):
    """Merge shard folders of `ddpm-run sample --shard I/N` into OUT: samples.npz ordered by index (keys images,
    indices, and arr_0 for FID evaluators), grid.png and run.json listing the shards. Refuses overlapping or
    missing indices, unfinished or damaged shards and shards of different jobs (seed, model, precision, steps,
    scheduler, image shape, shard layout), all checked before anything is written; an OUT that holds samples unless
    --overwrite (which replaces only those three files). A merged folder can be merged again with more shards, and
    is read by `ddpm-run fid` like any sample dir."""
    from .shard import merge as merge_shards

    for d in shards:
        if d.resolve() == out.resolve():
            raise ConfigError(f"OUT {out} is also one of the shards; merge into another folder")
    from .outputs import Outputs

    Outputs("ddpm-run merge", [out / n for n in ("samples.npz", "grid.png", "run.json")], overwrite,
            hint="choose another OUT").claim()  # before any shard is read
    info = merge_shards(out, shards, overwrite=overwrite)
    click.echo(f"merged {len(info.shards)} shards: {info.num} images, indices {info.first_index}-"
               f"{info.first_index + info.num - 1} -> {out}/samples.npz, grid.png, run.json")


if __name__ == "__main__":
    main()
