"""Sample outputs written as batches finish (memory flat in N): images/NNNNNN.png, a streamed samples.npz,
grid.png of the first images, run.json. Every file appears whole or not at all."""

from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from .contract import Artifact
from .errors import ConfigError
from .fileio import atomic_write_bytes
from .imageio import grid_scale, make_grid, png_bytes, save_png, to_uint8

GRID_MAX = 64


class SampleWriter:
    def __init__(self, out_dir: str | os.PathLike, num: int, sample_shape: tuple[int, int, int],
                 value_range=(-1.0, 1.0), write_pngs: bool = True):
        self.out = Path(out_dir)
        try:
            (self.out / "images").mkdir(parents=True, exist_ok=True)
            probe = tempfile.NamedTemporaryFile(dir=self.out, prefix=".probe", delete=True)
            probe.close()
        except OSError as e:
            raise ConfigError(f"cannot write to output directory {self.out}: {e.strerror}; choose another --out") from None
        c, h, w = sample_shape
        self.num, self.value_range, self.write_pngs = num, value_range, write_pngs
        self.count = 0
        self.grid_images: list[np.ndarray] = []
        self.indices: list[int] = []
        self._tmp = self.out / f".samples.npz.{os.getpid()}.tmp"
        self._zip = zipfile.ZipFile(self._tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        self._npy = self._zip.open("images.npy", "w", force_zip64=True)
        header = {"descr": "|u1", "fortran_order": False, "shape": (num, h, w, c)}
        np.lib.format.write_array_header_2_0(self._npy, header)
        self.scale = grid_scale(h)

    def add(self, x: np.ndarray, indices) -> None:
        """Add float images [B, C, H, W] in the model's value range."""
        self.add_uint8(to_uint8(x, self.value_range), indices)

    def add_uint8(self, imgs: np.ndarray, indices) -> None:
        """Add images that are already uint8 [B, H, W, C] (served images, merged shards)."""
        self._npy.write(np.ascontiguousarray(imgs).tobytes())
        for img, i in zip(imgs, indices):
            if self.write_pngs:
                atomic_write_bytes(self.out / "images" / f"{int(i):06d}.png", png_bytes(img))
            if len(self.grid_images) < GRID_MAX:
                self.grid_images.append(img)
        self.indices.extend(int(i) for i in indices)
        self.count += len(imgs)

    def close(self, run_info: Artifact) -> None:
        """Finish samples.npz (+ ``indices``), grid.png and run.json."""
        self._npy.close()
        if self.count != self.num:
            self.abort()
            raise ConfigError(f"expected {self.num} images for {self.out}, received {self.count}")
        with self._zip.open("indices.npy", "w") as f:
            np.lib.format.write_array(f, np.asarray(self.indices, dtype=np.int64))

        self._zip.close()
        os.replace(self._tmp, self.out / "samples.npz")
        if self.grid_images:
            save_png(self.out / "grid.png", make_grid(np.stack(self.grid_images)), scale=self.scale)
        run_info.save(self.out / "run.json")

    def abort(self) -> None:
        try:
            self._npy.close()
            self._zip.close()
        except Exception:
            pass
        self._tmp.unlink(missing_ok=True)


def write_npz(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> Path:
    """An uncompressed .npz of ``arrays`` (streamed into a temporary file, then renamed: whole or not at all)."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as z:
            for key, arr in arrays.items():
                with z.open(f"{key}.npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, np.ascontiguousarray(arr), allow_pickle=False)
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return p


def save_grid(out_dir: str | os.PathLike, images: np.ndarray) -> None:
    """grid.png of the first 64 images [N, H, W, C] uint8."""
    if len(images):
        save_png(Path(out_dir) / "grid.png", make_grid(images[:GRID_MAX]), scale=grid_scale(images.shape[1]))


def sample_job(runner, sampler, card, model_path, out_dir, seed: int, start_index: int, num: int, batch: int,
               write_pngs: bool = True, on_step=None, shard: dict | None = None):
    """Sample indices ``start_index`` … ``start_index + num − 1`` in batches of ``batch`` into ``out_dir``
    (``SampleWriter``; aborted, leaving nothing half-written, on any exception) and write run.json. ``on_step(n)``
    after every step of a batch of n images. Returns the RunInfo written. Used by ``ddpm-run sample`` and
    ``fid-compare`` alike."""
    import platform
    import time

    from .contract import RunInfo
    from .fileio import sha256_file

    shape = (card.data.channels, card.data.image_size, card.data.image_size)
    timings = sampler.new_timings()
    writer = SampleWriter(out_dir, num, shape, card.data.value_range, write_pngs=write_pngs)
    t0 = time.perf_counter()
    try:
        for lo in range(0, num, batch):
            idx = np.arange(start_index + lo, start_index + min(lo + batch, num), dtype=np.int64)
            cb = (lambda done, total, n=len(idx): on_step(n)) if on_step is not None else None
            x, tm = sampler.sample(seed, idx, callback=cb)
            timings.extend(tm)
            writer.add(x, idx)
    except BaseException:
        writer.abort()
        raise
    total = time.perf_counter() - t0
    info = RunInfo(
        seed=seed, num=num, batch=batch, start_index=start_index, steps=len(sampler.schedule),
        num_timesteps=card.diffusion.num_timesteps, backend=runner.name, runner=type(runner).__name__,
        loop=sampler.loop, precision=runner.precision, model=str(model_path), diffusion=card.diffusion.to_dict(),
        total_seconds=total, images_per_second=num / total, timings=timings.summary(),
        host={"machine": platform.machine(), "processor": platform.processor(), "python": platform.python_version()},
        model_sha256=sha256_file(model_path), shard=shard,
    )
    writer.close(info)
    return info
