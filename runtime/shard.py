"""Sharded batch jobs: which slice of a job this process samples, and merging the shards' outputs.

A job of ``num`` images from ``start_index`` is cut into ``count`` contiguous slices; shard ``i`` samples
indices ``[start + i·num//count, start + (i+1)·num//count)``. Because the noise is keyed by (seed, index), the
merged shards equal one unsharded run bit for bit.

The shard comes from ``--shard I/N``, else from Slurm job arrays (``SLURM_ARRAY_TASK_ID`` −
``SLURM_ARRAY_TASK_MIN``, ``SLURM_ARRAY_TASK_COUNT``), else from torchrun (``RANK``, ``WORLD_SIZE``). The GPU is
``--device-id``, else ``LOCAL_RANK``, else 0.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .contract import MergeInfo, RunInfo
from .errors import ArtifactError, ConfigError
from .fileio import sha256_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    def __post_init__(self):
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ConfigError(f"shard must be I/N with 0 <= I < N, found {self.index}/{self.count}")

    def range(self, num: int, start_index: int = 0) -> tuple[int, int]:
        """[first, end) global indices of this shard of a ``num``-image job starting at ``start_index``."""
        lo = start_index + self.index * num // self.count
        hi = start_index + (self.index + 1) * num // self.count
        if hi <= lo:
            raise ConfigError(f"shard {self} of a {num}-image job has no images; use at most {num} shards")
        return lo, hi

    def folder(self) -> str:
        w = len(str(self.count - 1))
        return f"shard-{self.index:0{w}d}-of-{self.count}"

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise ConfigError(f"environment variable {key}={env[key]!r}: expected an integer") from None


def shard_from(option: str | None, env: Mapping[str, str] = os.environ) -> Shard | None:
    """The shard of this process: ``--shard I/N``, else Slurm array variables, else torchrun's; None: no sharding."""
    if option:
        try:
            i, n = (int(v) for v in option.split("/"))
        except ValueError:
            raise ConfigError(f"--shard must be I/N (e.g. 0/4), found {option!r}") from None
        return Shard(i, n)
    if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        lo = _int(env, "SLURM_ARRAY_TASK_MIN") if "SLURM_ARRAY_TASK_MIN" in env else 0
        return Shard(_int(env, "SLURM_ARRAY_TASK_ID") - lo, _int(env, "SLURM_ARRAY_TASK_COUNT"))
    if "RANK" in env and "WORLD_SIZE" in env and _int(env, "WORLD_SIZE") > 1:
        return Shard(_int(env, "RANK"), _int(env, "WORLD_SIZE"))
    return None


def device_id_from(option: int | None, env: Mapping[str, str] = os.environ) -> int:
    """``--device-id``, else torchrun's ``LOCAL_RANK``, else 0."""
    if option is not None:
        return int(option)
    return _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0


@dataclass
class _Input:
    """One folder given to merge: its record (a shard's RunInfo, or a MergeInfo of an earlier merge), its images and
    indices, and the (shard, start_index, num) of every shard it holds."""
    dir: Path
    info: "RunInfo | MergeInfo"
    images: np.ndarray
    indices: np.ndarray
    parts: list[tuple[dict | None, int, int]]


def _load_shard(d: Path) -> _Input:
    import zipfile

    from .contract import load_samples_record

    if not (d / "run.json").is_file():
        raise ArtifactError(f"{d}: no run.json; expected the folder of a finished `ddpm-run sample` (or an earlier "
                            f"merge)")
    info = load_samples_record(d / "run.json")
    if not info.complete:
        raise ArtifactError(f"{d}: an unfinished shard ({info.done_count()} of {info.num} images, {info.status}); "
                            f"finish it with `ddpm-run sample ... --resume` (the same command plus --resume) first")
    try:
        with np.load(d / "samples.npz", allow_pickle=False) as z:
            images, indices = z["images"], z["indices"]
    except FileNotFoundError:
        raise ArtifactError(f"{d}: no samples.npz; is this a finished `ddpm-run sample` output?") from None
    except (OSError, KeyError, ValueError, EOFError, TypeError, zipfile.BadZipFile, zipfile.LargeZipFile) as e:
        raise ArtifactError(f"{d}/samples.npz: unreadable or without images/indices ({type(e).__name__}: {e}); "
                            f"sample this shard again") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ArtifactError(f"{d}/samples.npz: images must be uint8 [N, H, W, C] with C 1 or 3 (as ddpm-run sample "
                            f"writes), found {images.dtype} {list(images.shape)}; sample this shard again")
    if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer):
        raise ArtifactError(f"{d}/samples.npz: indices must be integers [N], found {indices.dtype} "
                            f"{list(indices.shape)}; sample this shard again")
    if len(images) != len(indices) or len(indices) != info.num:
        raise ArtifactError(f"{d}: run.json says {info.num} images, samples.npz holds {len(images)} images and "
                            f"{len(indices)} indices; sample this shard again")
    expect = np.arange(info.start_index, info.start_index + info.num)
    if not np.array_equal(np.sort(indices), expect) or len(np.unique(indices)) != len(indices):
        raise ArtifactError(f"{d}: samples.npz holds indices {_ranges(indices.tolist())}, but run.json says "
                            f"{info.start_index}-{info.start_index + info.num - 1}; sample this shard again")
    if isinstance(info, MergeInfo):
        parts = [(s.get("shard"), int(s.get("start_index", 0)), int(s.get("num", 0))) for s in info.shards]
    else:
        parts = [(info.shard, info.start_index, info.num)]
    return _Input(d, info, images, indices, parts)


def _ranges(values: Sequence[int], limit: int = 8) -> str:
    v = sorted(set(int(x) for x in values))
    spans, i = [], 0
    while i < len(v):
        j = i
        while j + 1 < len(v) and v[j + 1] == v[j] + 1:
            j += 1
        spans.append(str(v[i]) if i == j else f"{v[i]}-{v[j]}")
        i = j + 1
    return ", ".join(spans[:limit]) + (f" (+{len(spans) - limit} more ranges)" if len(spans) > limit else "")


def merge(out: str | os.PathLike, shard_dirs: Sequence[str | os.PathLike], overwrite: bool = False) -> MergeInfo:
    """Merge shard folders into OUT/samples.npz (``images``, ``indices`` and ``arr_0``, ordered by index),
    OUT/grid.png and OUT/run.json (a MergeInfo listing the shards). Refuses mixed seeds, models, step counts,
    overlapping indices and missing ones (gaps, or shards of an I/N job that are not given), naming them."""
    from .output import save_grid_file, write_npz
    from .outputs import Outputs

    dirs = [Path(d) for d in shard_dirs]
    if not dirs:
        raise ConfigError("give at least one shard folder to merge")
    seen: set[Path] = set()
    for d in dirs:
        if d.resolve() in seen:
            raise ConfigError(f"{d} is given twice; give each shard folder once")
        seen.add(d.resolve())
    loaded = [_load_shard(d) for d in dirs]
    first = loaded[0]
    d0, ref = first.dir, first.info
    for inp in loaded[1:]:
        d, info = inp.dir, inp.info
        for key in ("seed", "steps", "num_timesteps", "model_sha256", "precision", "diffusion", "scheduler"):
            mine, theirs = getattr(info, key), getattr(ref, key)
            if key == "scheduler" and None in (mine, theirs):  # a run.json before v4: DDPM, linspace respacing
                from .output import is_legacy_ddpm

                if is_legacy_ddpm(mine or theirs or {}) or mine is theirs:
                    continue
            if mine != theirs:
                raise ArtifactError(f"{d}: {key} {getattr(info, key)!r} differs from {d0}'s {getattr(ref, key)!r}; "
                                    f"merge only shards of one job")
        if inp.images.shape[1:] != first.images.shape[1:]:
            raise ArtifactError(f"{d}: images of shape {list(inp.images.shape[1:])} (H, W, C), but {d0}'s are "
                                f"{list(first.images.shape[1:])}; merge only shards of one job")
    owner: dict[int, Path] = {}
    overlaps: dict[tuple[Path, Path], list[int]] = {}
    for inp in loaded:
        for i in inp.indices.tolist():
            if i in owner:
                overlaps.setdefault((owner[i], inp.dir), []).append(i)
            else:
                owner[i] = inp.dir
    if overlaps:
        (a, b), which = next(iter(overlaps.items()))
        raise ArtifactError(f"overlapping indices: {a} and {b} both hold {_ranges(which)}"
                            + (f" (and {len(overlaps) - 1} more pairs of shards overlap)" if len(overlaps) > 1 else "")
                            + "; merge each index once")
    sharded = [(inp.dir, sh, start, num) for inp in loaded for sh, start, num in inp.parts if sh]
    jobs = {(sh["count"], sh["num_total"]) for _, sh, _, _ in sharded}
    if len(jobs) > 1:
        raise ArtifactError("shards of different jobs: " + ", ".join(f"{n} shards of {t} images"
                                                                   for n, t in sorted(jobs)) + "; merge one job")
    if sharded:
        n, total = jobs.pop()
        seen_shards: dict[int, Path] = {}
        for d, sh, _, _ in sharded:
            if sh["index"] in seen_shards:
                raise ArtifactError(f"{seen_shards[sh['index']]} and {d} are both shard {sh['index']}/{n} by their "
                                    f"run.json; merge each shard once (one of them belongs to another job)")
            seen_shards[sh["index"]] = d
        starts = {}
        for d, sh, start, num in sharded:  # each shard holds exactly its slice of one I/N job
            job_start = start - Shard(sh["index"], n).range(total)[0]
            lo, hi = Shard(sh["index"], n).range(total, job_start)
            if (start, num) != (lo, hi - lo):
                raise ArtifactError(f"{d}: shard {sh['index']}/{n} holds indices {start}-{start + num - 1}, but "
                                    f"shard {sh['index']}/{n} of a {total}-image job holds {hi - lo} images; "
                                    f"its run.json was not written by ddpm-run sample --shard")
            starts.setdefault(job_start, d)
        if len(starts) > 1:
            (s1, a), (s2, b) = list(starts.items())[:2]
            raise ArtifactError(f"shards of different jobs: {a} belongs to a job starting at index {s1}, {b} to one "
                                f"starting at {s2} (--start-index); merge one job")
        job_start = next(iter(starts))
        absent = sorted(set(range(n)) - {sh["index"] for _, sh, _, _ in sharded})
        if absent:
            where = "; ".join(f"shard {a}/{n} holds indices {lo}-{hi - 1}"
                              for a in absent[:4] for lo, hi in [Shard(a, n).range(total, job_start)])
            raise ArtifactError(f"missing shards {', '.join(f'{a}/{n}' for a in absent)} ({where}); sample them, "
                                f"then merge again")
    lo, hi = min(owner), max(owner)
    gaps = sorted(set(range(lo, hi + 1)) - set(owner))
    if gaps:
        raise ArtifactError(f"missing indices {_ranges(gaps)} between {lo} and {hi}; sample the shard that holds "
                            f"them, then merge again")
    indices = np.concatenate([inp.indices for inp in loaded])
    images = np.concatenate([inp.images for inp in loaded])
    order = np.argsort(indices, kind="stable")
    images, indices = images[order], indices[order]
    out = Path(out)
    shard_list = []
    for inp in loaded:
        if isinstance(inp.info, MergeInfo):
            shard_list.extend(inp.info.shards)
        else:
            info = inp.info
            shard_list.append({"dir": str(inp.dir), "shard": info.shard, "start_index": info.start_index,
                               "num": info.num, "backend": info.backend, "total_seconds": info.total_seconds,
                               "run_json_sha256": sha256_file(inp.dir / "run.json")})
    merged = MergeInfo(
        seed=ref.seed, num=len(indices), first_index=int(lo), steps=ref.steps, num_timesteps=ref.num_timesteps,
        precision=ref.precision, diffusion=ref.diffusion, model_sha256=ref.model_sha256, scheduler=ref.scheduler,
        shards=shard_list, sampling_seconds=float(sum(inp.info.total_seconds for inp in loaded)))
    names = ("samples.npz", "grid.png", "run.json")
    with Outputs("ddpm-run merge", [out / n for n in names], overwrite=overwrite) as w:
        write_npz(w.stage(out / "samples.npz"), {"images": images, "indices": indices, "arr_0": images})
        grid = w.stage(out / "grid.png")
        save_grid_file(grid, images)
        merged.save(w.stage(out / "run.json"))
    return merged
