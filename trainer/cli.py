"""`ddpm-train`: train a DDPM ε-model and write a run directory."""

from __future__ import annotations

import dataclasses
import signal
import time
from pathlib import Path

import click

from ddpm_deploy.runtime.clitools import CONTEXT, clean_errors, point_latest, runs_dir, setup_logging, version_option
from ddpm_deploy.runtime.config import ModelCard
from ddpm_deploy.runtime.errors import ConfigError
from ddpm_deploy.runtime.schedule import DiffusionConfig

from .config import TrainConfig, parse_override
from .presets import PRESETS, get_preset
from .unet import UNetConfig


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
def main(preset, dataset, channels, out, resume, schedule, num_timesteps, variance_type, overrides, list_presets,
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
    from .data import load_dataset
    from .train import DistEnv, Trainer

    if resume:
        run_dir = out or (runs_dir() / "latest")
        card = ModelCard.load(Path(run_dir) / "model.json")
        ucfg = UNetConfig.from_dict({k: v for k, v in card.architecture.items() if k != "type"})
        tcfg = TrainConfig.from_dict(card.training)
        dcfg = card.diffusion
        dataset = dataset or card.training.get("dataset", "digits")
        preset = card.training.get("preset", preset)
        run_dir = Path(run_dir).resolve()
    else:
        p = get_preset(preset)
        ucfg, tcfg = p.unet, p.train
        dataset = dataset or p.dataset
        dcfg = DiffusionConfig(schedule=schedule, num_timesteps=num_timesteps, variance_type=variance_type)
        if channels:
            ucfg = dataclasses.replace(ucfg, in_channels=int(channels))
    # explicit flags, then --set overrides
    tcfg = dataclasses.replace(tcfg, **{k: v for k, v in train_flags.items() if v is not None})
    objs = {"unet": ucfg, "train": tcfg}
    for item in overrides:
        which, key, val = parse_override(objs, item)
        objs[which] = dataclasses.replace(objs[which], **{key: val})
    ucfg, tcfg = objs["unet"], objs["train"]
    if resume and (ucfg.to_dict() != UNetConfig.from_dict({k: v for k, v in card.architecture.items() if k != "type"}).to_dict()):
        raise ConfigError("--resume cannot change the architecture of an existing run")

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
                      env=env)
    if bar is not None:
        bar.n = trainer.step
        bar.refresh()

    def on_signal(signum, frame):
        trainer.stop_requested = True
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
        click.echo(f"resume with: ddpm-train --resume --out {run_dir}")
        raise SystemExit(130)


if __name__ == "__main__":
    main()
