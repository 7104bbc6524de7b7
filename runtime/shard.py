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


def _load_shard(d: Path) -> tuple[RunInfo, np.ndarray, np.ndarray]:
    info = RunInfo.load(d / "run.json")
    if not info.complete:
        raise ArtifactError(f"{d}: an unfinished shard ({info.done_count()} of {info.num} images, {info.status}); "
                            f"finish it with `ddpm-run sample ... --resume` (the same command plus --resume) first")
    try:
        with np.load(d / "samples.npz") as z:
            images, indices = z["images"], z["indices"]
    except FileNotFoundError:
        raise ArtifactError(f"{d}: no samples.npz; is this a finished `ddpm-run sample` output?") from None
    except (OSError, KeyError, ValueError) as e:
        raise ArtifactError(f"{d}/samples.npz: unreadable or without images/indices ({e})") from None
    if len(images) != len(indices) or len(indices) != info.num:
        raise ArtifactError(f"{d}: run.json says {info.num} images, samples.npz holds {len(images)} images and "
                            f"{len(indices)} indices; sample this shard again")
    return info, images, indices


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


def merge(out: str | os.PathLike, shard_dirs: Sequence[str | os.PathLike]) -> MergeInfo:
    """Merge shard folders into OUT/samples.npz (``images``, ``indices`` and ``arr_0``, ordered by index),
    OUT/grid.png and OUT/run.json (a MergeInfo listing the shards). Refuses mixed seeds, models, step counts,
    overlapping indices and missing ones (gaps, or shards of an I/N job that are not given), naming them."""
    from .output import save_grid, write_npz

    dirs = [Path(d) for d in shard_dirs]
    if not dirs:
        raise ConfigError("give at least one shard folder to merge")
    seen: set[Path] = set()
    for d in dirs:
        if d.resolve() in seen:
            raise ConfigError(f"{d} is given twice; give each shard folder once")
        seen.add(d.resolve())
    loaded = [(d, *_load_shard(d)) for d in dirs]
    d0, ref = loaded[0][0], loaded[0][1]
    for d, info, _, _ in loaded[1:]:
        for key in ("seed", "steps", "model_sha256", "diffusion", "scheduler"):
            mine, theirs = getattr(info, key), getattr(ref, key)
            if key == "scheduler" and None in (mine, theirs):  # a run.json before v4: DDPM, linspace respacing
                from .output import is_legacy_ddpm

                if is_legacy_ddpm(mine or theirs or {}) or mine is theirs:
                    continue
            if mine != theirs:
                raise ArtifactError(f"{d}: {key} {getattr(info, key)!r} differs from {d0}'s {getattr(ref, key)!r}; "
                                    f"merge only shards of one job")
    owner: dict[int, Path] = {}
    overlaps: dict[tuple[Path, Path], list[int]] = {}
    for d, _, _, idx in loaded:
        for i in idx.tolist():
            if i in owner:
                overlaps.setdefault((owner[i], d), []).append(i)
            else:
                owner[i] = d
    if overlaps:
        (a, b), which = next(iter(overlaps.items()))
        raise ArtifactError(f"overlapping indices: {a} and {b} both hold {_ranges(which)}"
                            + (f" (and {len(overlaps) - 1} more pairs of shards overlap)" if len(overlaps) > 1 else "")
                            + "; merge each index once")
    counts = {info.shard["count"] for _, info, _, _ in loaded if info.shard}
    if len(counts) > 1:
        raise ArtifactError(f"shards of different jobs: shard counts {sorted(counts)}")
    if counts:
        n = counts.pop()
        sharded = [info for _, info, _, _ in loaded if info.shard]
        absent = sorted(set(range(n)) - {info.shard["index"] for info in sharded})
        if absent:
            info = sharded[0]
            total = info.shard["num_total"]
            job_start = info.start_index - Shard(info.shard["index"], n).range(total)[0]
            where = "; ".join(f"shard {a}/{n} holds indices {lo}-{hi - 1}"
                              for a in absent[:4] for lo, hi in [Shard(a, n).range(total, job_start)])
            raise ArtifactError(f"missing shards {', '.join(f'{a}/{n}' for a in absent)} ({where}); sample them, "
                                f"then merge again")
    lo, hi = min(owner), max(owner)
    gaps = sorted(set(range(lo, hi + 1)) - set(owner))
    if gaps:
        raise ArtifactError(f"missing indices {_ranges(gaps)} between {lo} and {hi}; sample the shard that holds "
                            f"them, then merge again")
    indices = np.concatenate([idx for _, _, _, idx in loaded])
    images = np.concatenate([img for _, _, img, _ in loaded])
    order = np.argsort(indices, kind="stable")
    images, indices = images[order], indices[order]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_npz(out / "samples.npz", {"images": images, "indices": indices, "arr_0": images})
    save_grid(out, images)
    merged = MergeInfo(
        seed=ref.seed, num=len(indices), first_index=int(lo), steps=ref.steps, num_timesteps=ref.num_timesteps,
        precision=ref.precision, diffusion=ref.diffusion, model_sha256=ref.model_sha256, scheduler=ref.scheduler,
        shards=[{"dir": str(d), "shard": info.shard, "start_index": info.start_index, "num": info.num,
                 "backend": info.backend, "total_seconds": info.total_seconds,
                 "run_json_sha256": sha256_file(d / "run.json")} for d, info, _, _ in loaded],
        sampling_seconds=float(sum(info.total_seconds for _, info, _, _ in loaded)))
    merged.save(out / "run.json")
    return merged
