"""`ddpm-train`: train a DDPM ε-model and write a run directory."""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from pathlib import Path

import click

from ddpm_deploy.runtime.clitools import CONTEXT, clean_errors, point_latest, runs_dir, setup_logging, version_option
from ddpm_deploy.runtime.errors import ArtifactError, ConfigError, lazy_import
from ddpm_deploy.runtime.schedule import DiffusionConfig

from .config import TRAIN_FIELDS, TrainConfig, check_field, parse_override
from .presets import PRESETS, get_preset

TRAIN_INSTALL = "pip install 'ddpm-deploy[train]'"


def require_train_extra(feature: str = "ddpm-train") -> None:
    """MissingDependencyError naming the [train] extra when torch or safetensors is not installed (base install)."""
    for module in ("torch", "safetensors", "sklearn", "matplotlib"):
        lazy_import(module, feature, TRAIN_INSTALL)


@click.command(context_settings=CONTEXT)
@version_option()
@click.option("--preset", default="tiny", type=click.Choice(sorted(PRESETS)), help="Model and training preset.")
@click.option("--dataset", default=None, help="digits (built in), folder:PATH, cifar10:PATH (cifar-10-batches-py), "
              "npz:PATH. Default: the preset's.")
@click.option("--channels", type=click.Choice(["1", "3"]), default=None,
              help="Image channels for folder/cifar/npz data (1 = grayscale). Default: the preset's.")
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Run directory. Default: runs/<preset>-<dataset>-<time>, with runs/latest pointing at it.")
@click.option("--resume", is_flag=True, help="Continue the run in --out (default runs/latest) from its last checkpoint.")
@click.option("--resume-from", "resume_from", default=None, metavar="checkpoints/step_N",
              help="Continue from this checkpoint of the run instead of the last one (implies --resume); e.g. when "
                   "the last checkpoint is corrupt.")
@click.option("--steps", type=int, default=None, help="Total optimisation steps. Default: the preset's.")
@click.option("--batch-size", type=int, default=None, help="Global batch size (split across torchrun ranks).")
@click.option("--lr", type=float, default=None, help="Adam learning rate (after warm-up).")
@click.option("--warmup-steps", type=int, default=None, help="Linear learning-rate warm-up steps.")
@click.option("--grad-clip", type=float, default=None, help="Gradient-norm clip (0 disables).")
@click.option("--ema-decay", type=float, default=None, help="EMA decay of the weights; short runs want ~0.995.")
@click.option("--flip/--no-flip", default=None, help="Random horizontal flips.")
@click.option("--bf16/--no-bf16", default=None, help="bfloat16 autocast for the UNet (the timestep embedding stays fp32).")
@click.option("--seed", type=int, default=None, help="Seed; every step's randomness derives from (seed, step).")
@click.option("--sample-every", type=int, default=None, help="Write a sample grid every N steps and at the end (0: never).")
@click.option("--save-every", type=int, default=None, help="Checkpoint every N steps.")
@click.option("--keep", type=int, default=None, help="Checkpoints kept in checkpoints/.")
@click.option("--log-every", type=int, default=None, help="Append to loss.jsonl every N steps.")
@click.option("--schedule", type=click.Choice(["linear", "cosine"]), default="linear", help="β schedule.")
@click.option("--num-timesteps", type=int, default=1000, help="Diffusion steps T.")
@click.option("--variance-type", type=click.Choice(["fixed_small", "fixed_large"]), default="fixed_small",
              help="Sampler variance stored with the model: β̃_t (fixed_small) or β_t (fixed_large).")
@click.option("--set", "overrides", multiple=True, metavar="FIELD=VALUE",
              help="Override any preset field (UNet or training), e.g. --set ch=64 --set attn_resolutions=8,4.")
@click.option("--list-presets", is_flag=True, help="List presets and exit.")
@click.option("--no-progress", is_flag=True, envvar="DDPM_NO_PROGRESS", show_envvar=True, help="No progress bar.")
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
@clean_errors
def main(preset, dataset, channels, out, resume, resume_from, schedule, num_timesteps, variance_type, overrides, list_presets,
         no_progress, verbose, **train_flags):
    """Train a DDPM ε-prediction UNet (Ho et al. 2020) and write a run directory.

    \b
    Examples:
      ddpm-train --preset tiny --dataset digits --steps 3000
      ddpm-train --preset ddpm-cifar10 --dataset cifar10:data/cifar-10-batches-py --bf16
      torchrun --nproc-per-node 2 -m ddpm_deploy.trainer.cli --preset tiny --out runs/ddp
      ddpm-train --resume --out runs/my-run --steps 6000
    """
    setup_logging(verbose)
    if list_presets:
        for name, p in sorted(PRESETS.items()):
            click.echo(f"{name:14s} {p.description}  [dataset: {p.dataset}]")
        return
    resume = resume or resume_from is not None
    if resume:  # a run's preset, schedule and channels are in its model.json; a flag would be silently ignored
        ctx = click.get_current_context()
        given = [f"--{n.replace('_', '-')}" for n in ("preset", "channels", "schedule", "num_timesteps",
                                                      "variance_type")
                 if ctx.get_parameter_source(n) not in (None, click.core.ParameterSource.DEFAULT)]
        if given:
            raise ConfigError(f"--resume continues a run as its model.json describes it; {', '.join(given)} cannot "
                              f"change it (train a new run with another --out instead)")
    # every option is checked before anything is read or written
    for k, v in train_flags.items():
        if v is not None:
            check_field(f"--{k.replace('_', '-')}", v, TRAIN_FIELDS[k])
    if out is not None and out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: expected a run directory, found a file")
    if not resume:
        try:
            dcfg = DiffusionConfig(schedule=schedule, num_timesteps=num_timesteps, variance_type=variance_type)
        except ConfigError as e:
            raise ConfigError(f"--num-timesteps {num_timesteps}: {e}") from None
    if not resume and out is not None and (out / "model.json").exists():
        raise ConfigError(f"{out} already holds a run; use --resume to continue it or choose another --out")
    from .data import check_dataset_spec

    require_train_extra("ddpm-train --resume" if resume else "ddpm-train")
    from . import checkpoint as ckpt
    from .data import load_dataset
    from .train import DistEnv

    if resume:
        run_dir = Path(out or (runs_dir() / "latest"))
        if not run_dir.is_dir():
            raise ArtifactError(f"--resume: run directory {run_dir} not found (train one with ddpm-train, or give "
                                f"--out RUN_DIR)")
        card, ucfg = ckpt.load_card(run_dir)
        arch0 = ucfg
        tcfg = TrainConfig.from_dict(card.training, where=str(run_dir / ckpt.MODEL_JSON))
        dcfg = card.diffusion
        if dataset is not None and dataset != card.training.get("dataset"):
            click.echo(f"warning: --resume continues on {dataset}; the run was trained on "
                       f"{card.training.get('dataset')!r} (model.json will record {dataset})", err=True)
        dataset = dataset or card.training.get("dataset", "digits")
        if not isinstance(dataset, str):
            raise ConfigError(f"{run_dir / ckpt.MODEL_JSON}: training.dataset must be a dataset spec string, "
                              f"found {dataset!r}; give --dataset")
        preset = card.training.get("preset", preset)
        run_dir = run_dir.resolve()
    else:
        p = get_preset(preset)
        ucfg, tcfg = p.unet, p.train
        dataset = dataset or p.dataset
        if channels:
            ucfg = dataclasses.replace(ucfg, in_channels=int(channels))
    # explicit flags, then --set overrides
    tcfg = dataclasses.replace(tcfg, **{k: v for k, v in train_flags.items() if v is not None})
    objs = {"unet": ucfg, "train": tcfg}
    updates: dict[str, dict] = {"unet": {}, "train": {}}
    for item in overrides:  # all parsed first, then applied together (no half-updated config is judged)
        which, key, val = parse_override(objs, item)
        updates[which][key] = val
    for which, kw in updates.items():
        try:
            objs[which] = dataclasses.replace(objs[which], **kw)
        except ConfigError as e:
            raise ConfigError(f"--set {', '.join(f'{k}={v}' for k, v in kw.items())}: {e}") from None
    ucfg, tcfg = objs["unet"], objs["train"]
    if resume and ucfg.to_dict() != arch0.to_dict():
        raise ConfigError("--resume cannot change the architecture of an existing run")
    check_dataset_spec(dataset)

    data = load_dataset(dataset, image_size=ucfg.image_size, channels=ucfg.in_channels)
    env = DistEnv()
    if not resume:
        if out is None:
            tag = dataset.split(":")[0]
            run_dir = runs_dir() / f"{preset}-{tag}-{time.strftime('%Y%m%d-%H%M%S')}"
        else:
            run_dir = out
        run_dir = env.broadcast(str(run_dir))  # every torchrun rank uses rank 0's name
        if (Path(run_dir) / "model.json").exists():
            raise ConfigError(f"{run_dir} already holds a run; use --resume to continue it or choose another --out")
    created = not Path(run_dir).exists()
    lock = None
    try:
        if env.is_main:  # one training process per run dir (torchrun's other ranks share rank 0's)
            lock = _lock_run_dir(Path(run_dir))
        _train(run_dir, ucfg, tcfg, dcfg, data, preset, resume, resume_from, env, no_progress, out)
    except BaseException:
        if created and env.is_main:
            _remove_empty(Path(run_dir))
        raise
    finally:
        if lock is not None:
            os.close(lock)


def _lock_run_dir(run_dir: Path) -> int:
    """An exclusive flock on the run dir itself (released by the kernel when the process ends, kill -9 included):
    a second `ddpm-train` on the same run dir (a second --resume, say) is refused instead of interleaving its
    checkpoints and loss.jsonl with the first's."""
    from ddpm_deploy.runtime.fileio import lock_folder

    run_dir.mkdir(parents=True, exist_ok=True)
    fd = lock_folder(run_dir)
    if fd is None:
        raise ConfigError(f"{run_dir} is in use by another ddpm-train (training or resuming this run); wait for it to "
                          f"finish or stop it first")
    return fd


def _remove_empty(d: Path) -> None:
    """A failed command leaves no empty folder behind."""
    try:
        d.rmdir()
    except OSError:
        pass


def _train(run_dir, ucfg, tcfg, dcfg, data, preset, resume, resume_from, env, no_progress, out):
    from .train import Trainer

    bar = None
    if not no_progress and env.is_main:
        from tqdm import tqdm

        bar = tqdm(total=tcfg.steps, unit="step", dynamic_ncols=True, desc="train")

    def on_step(info):
        if bar is not None:
            bar.n = info.step
            bar.set_postfix(loss=f"{info.loss:.4f}", lr=f"{info.lr:.1e}")
            bar.refresh()

    trainer = Trainer(run_dir, ucfg, tcfg, dcfg, data.images, data.name, preset=preset, resume=resume, callback=on_step,
                      env=env, resume_from=resume_from, warn=lambda m: click.echo(f"warning: {m}", err=True))
    if bar is not None:
        bar.n = trainer.step
        bar.refresh()

    received = []

    def on_signal(signum, frame):
        trainer.stop_requested = True
        received.append(signum)
        click.echo(f"\n{signal.Signals(signum).name}: saving a checkpoint at the end of this step…", err=True)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        res = trainer.run()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if bar is not None:
            bar.close()
        trainer.env.close()
    if not trainer.env.is_main:
        return
    if out is None and not resume:
        point_latest(run_dir)
    click.echo(
        f"{'interrupted' if res.interrupted else 'trained'} {res.step}/{tcfg.steps} steps in {res.seconds:.1f}s "
        f"({res.steps_per_s:.2f} steps/s, {res.images_per_s:.0f} images/s), final loss {res.final_loss:.4f}"
    )
    click.echo(f"run dir: {run_dir}")
    if res.samples:
        click.echo(f"samples: {res.samples[-1]}")
    if res.interrupted:
        signum = int(received[0] if received else signal.SIGINT)
        click.echo(f"resume with: ddpm-train --resume --out {run_dir}")
        click.echo(f"error: interrupted by {signal.Signals(signum).name} at step {res.step}/{tcfg.steps}; checkpoint "
                   f"step_{res.step:08d} saved; resume with: ddpm-train --resume --out {run_dir}", err=True)
        raise SystemExit(128 + signum)


if __name__ == "__main__":
    main()
