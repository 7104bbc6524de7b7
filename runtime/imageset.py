"""Read a set of images to judge: a samples.npz, a sample dir of ``ddpm-run sample``, or a folder of images.

Always uint8 [N, H, W, C] (C 1 or 3) at the images' own size: FID's resize to 299 happens later, once
(``runtime.inception``). Needs only NumPy and Pillow.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .contract import MergeInfo, RunInfo, load_samples_record
from .errors import ArtifactError, DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
SAMPLES_FILE = "samples.npz"


@dataclass(eq=False)
class ImageSet:
    images: np.ndarray            # uint8 [N, H, W, C]
    source: str                   # what was read (path)
    run: RunInfo | MergeInfo | None = None  # run.json beside samples.npz (sample, request or merge), if any
    indices: np.ndarray | None = None  # the samples' global indices (samples.npz), if any

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(int(v) for v in self.images.shape[1:])


def read_image_set(path: str | os.PathLike) -> ImageSet:
    """A samples.npz (key ``images``, uint8 [N, H, W, C]), a directory holding one (a sample dir; its run.json is
    read too), or a directory of .png/.jpg/.jpeg images (recursive, sorted; all of one size)."""
    p = Path(path)
    if p.is_dir() and (p / SAMPLES_FILE).is_file():
        return _read_npz(p / SAMPLES_FILE)
    if p.is_file() and p.suffix.lower() == ".npz":
        return _read_npz(p)
    if p.is_dir():
        return _read_folder(p)
    if not p.exists():
        raise ArtifactError(f"{p}: no such file or directory; expected a samples.npz, a sample dir of ddpm-run sample "
                            "or a folder of images")
    raise ArtifactError(f"{p}: expected a samples.npz, a sample dir of ddpm-run sample or a folder of images, found "
                        f"a {p.suffix or 'suffix-less'} file")


def _read_npz(f: Path) -> ImageSet:
    try:
        with np.load(f, allow_pickle=False) as z:
            if "images" not in z.files:
                what = " (a FID statistics file: pass it as --ref)" if "header" in z.files else ""
                raise ArtifactError(f"{f}: expected an array 'images' (uint8 [N, H, W, C], as ddpm-run sample writes), "
                                    f"found {z.files}{what}")
            images = z["images"]
            indices = z["indices"] if "indices" in z.files else None
    except ArtifactError:
        raise
    except (OSError, ValueError, EOFError, TypeError, zipfile.BadZipFile) as e:  # TypeError: a .npy (no `with`)
        raise ArtifactError(f"{f}: not a readable .npz ({e}); expected samples.npz of ddpm-run sample") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3) or len(images) == 0:
        raise DataError(f"{f}: 'images' must be uint8 [N, H, W, C] with N > 0 and C 1 or 3, found {images.dtype} "
                        f"{list(images.shape)}")
    run_json = f.parent / "run.json"
    run = load_samples_record(run_json) if run_json.is_file() else None
    if run is not None and not run.complete:
        raise ArtifactError(f"{f}: an unfinished sampling job ({run.done_count()} of {run.num} images, {run.status}; "
                            f"run.json); finish it with `ddpm-run sample ... --resume --out {f.parent}` first")
    return ImageSet(images=images, source=str(f), run=run, indices=indices)


def _read_folder(root: Path) -> ImageSet:
    from PIL import Image

    files = sorted((q for q in root.rglob("*") if q.suffix.lower() in IMAGE_EXTENSIONS and q.is_file()),
                   key=lambda q: q.relative_to(root).as_posix())
    if not files:
        raise DataError(f"no images under {root}: expected {', '.join(IMAGE_EXTENSIONS)} files (searched recursively) "
                        f"or a {SAMPLES_FILE}")
    arrays = []
    for q in files:
        try:
            with Image.open(q) as img:
                arr = np.asarray(img.convert("L" if img.mode in ("L", "LA", "1", "I", "I;16", "F") else "RGB"))
        except Exception as e:
            raise DataError(f"cannot read image {q}: {type(e).__name__}: {e}; delete or replace it") from None
        arr = arr[..., None] if arr.ndim == 2 else arr
        if arrays and arr.shape != arrays[0].shape:
            raise DataError(f"{q} is {arr.shape[1]}x{arr.shape[0]}x{arr.shape[2]} but {files[0]} is "
                            f"{arrays[0].shape[1]}x{arrays[0].shape[0]}x{arrays[0].shape[2]}; the images of a set must "
                            "share one size and channel count (resize them, or use the dataset spec folder:PATH with "
                            "--image-size)")
        arrays.append(arr)
    return ImageSet(images=np.stack(arrays).astype(np.uint8, copy=False), source=str(root))
