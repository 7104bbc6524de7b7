"""Sample outputs written as batches finish (memory flat in N): images/NNNNNN.png, a streamed samples.npz,
grid.png of the first images, run.json. Every file appears whole or not at all."""

from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from .contract import RunInfo
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
        imgs = to_uint8(x, self.value_range)
        self._npy.write(np.ascontiguousarray(imgs).tobytes())
        for img, i in zip(imgs, indices):
            if self.write_pngs:
                atomic_write_bytes(self.out / "images" / f"{int(i):06d}.png", png_bytes(img))
            if len(self.grid_images) < GRID_MAX:
                self.grid_images.append(img)
        self.indices.extend(int(i) for i in indices)
        self.count += len(imgs)

    def close(self, run_info: RunInfo) -> None:
        self._npy.close()
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
