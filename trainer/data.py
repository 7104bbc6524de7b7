"""Datasets for the trainer, as whole NumPy arrays (float32 [N, C, H, W] in [-1, 1]).

The datasets this project trains on are small (scikit-learn's digits, CIFAR-10, a folder of images), so a
dataset is one array in memory; batching, shuffling and flips happen in torch inside the trainer. This
module needs only NumPy and Pillow (scikit-learn for ``digits``); it never imports torch.

Specs accepted by :func:`load_dataset`:

``digits``
    scikit-learn's bundled ``load_digits()`` (1,797 images, 8x8, values 0..16; no download). Values are
    scaled to [-1, 1] (``v / 8 - 1``) and upscaled with Pillow's BILINEAR filter on float ("F" mode)
    images, straight from 8x8 to the target size: 16x16 by default, ``image_size`` if given. BILINEAR
    here is half-pixel-centred interpolation with the edge pixels repeated (``align_corners=False``).
    1 channel by default; ``channels=3`` repeats it.
``folder:PATH``
    Every ``.png``/``.jpg``/``.jpeg`` file under PATH (recursive, extensions case-insensitive, sorted by
    relative path). EXIF orientation is applied, the shorter side is resized to ``image_size`` (BICUBIC;
    an image already at that size is not resampled), then the centre square is cropped. Converted to RGB
    (``channels=3``, the default; alpha is dropped) or Pillow's "L" (``channels=1``). ``image_size`` is
    required.
``cifar10:PATH``
    The CIFAR-10 "python version": PATH is the ``cifar-10-batches-py`` directory (only its
    ``data_batch_*`` files are read, never ``test_batch``) or one batch file. Batches are pickles, read
    with a restricted unpickler (see :data:`_ALLOWED_GLOBALS`). Native 3x32x32.
``npz:PATH``
    A ``.npz`` holding one array, or an array under the key ``images``, ``x`` or ``arr_0`` (first found).
    Layouts: [N, H, W] (grayscale), [N, H, W, C] or [N, C, H, W] with C in {1, 3} and H == W. Value rule:
    integer arrays (uint8 or any integer dtype) must lie in 0..255; float arrays must be finite, and are
    read as [-1, 1] if any value is negative, otherwise as [0, 1] (a [-1, 1] dataset without a single
    negative value would be misread: save it as uint8 instead). Floats outside [-1, 1] are refused
    (0..255 floats are ambiguous: convert them to uint8). Native channel count by default.

For ``cifar10`` and ``npz``, ``channels=1`` from RGB uses the ITU-R 601-2 luma weights (as Pillow's "L");
``channels=3`` from grayscale repeats the channel; an ``image_size`` different from the native size
resamples float images with Pillow BICUBIC and clips the result to [-1, 1].

Every user mistake raises :class:`~ddpm_deploy.runtime.errors.DataError` naming the file and the problem.
"""

from __future__ import annotations

import importlib
import io
import logging
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ddpm_deploy.runtime.errors import DataError, lazy_import

logger = logging.getLogger(__name__)

DIGITS_SIZE = 16
CIFAR10_SIZE = 32
CIFAR10_ROW = 3 * CIFAR10_SIZE * CIFAR10_SIZE
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
NPZ_KEYS = ("images", "x", "arr_0")
VALID_CHANNELS = (1, 3)
# ITU-R 601-2 luma, the weights Pillow uses for RGB -> "L".
LUMA_WEIGHTS = (0.299, 0.587, 0.114)
# Float npz values may overshoot their range by this much (rounding) before they are refused; they are clipped.
FLOAT_RANGE_SLACK = 1e-3

SPEC_HELP = "digits, folder:PATH, cifar10:PATH, npz:PATH"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"


@dataclass(frozen=True, eq=False)
class Dataset:
    """A whole dataset in memory.

    ``images`` is float32 [N, C, H, W] in [-1, 1], C-contiguous, H == W. ``name`` records where it came
    from (``"digits"``, ``"folder:/abs/path"``, ``"cifar10:/abs/path"``, ``"npz:/abs/path"``).
    """

    images: np.ndarray
    name: str

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.images.shape[2])


def builtin_datasets() -> list[str]:
    """Names of the datasets that need no files (usable as a spec on their own)."""
    return ["digits"]


def load_dataset(spec: str, image_size: int | None = None, channels: int | None = None) -> Dataset:
    """Load the dataset named by ``spec`` (see the module docstring) as float32 [N, C, H, W] in [-1, 1].

    ``image_size`` resizes to a square of that side (required for ``folder:``); ``channels`` is 1 or 3
    (default: 1 for digits, 3 for folders and CIFAR-10, the file's own for npz).
    """
    _check_options(image_size, channels)
    prefix, path = check_dataset_spec(spec)
    if path is None:
        images, name = _load_digits(image_size, channels), "digits"
    else:
        loaders = {"folder": _load_folder, "cifar10": _load_cifar10, "npz": _load_npz}
        images = loaders[prefix](path, image_size, channels)
        name = f"{prefix}:{path}"
    images = np.ascontiguousarray(images, dtype=np.float32)
    logger.info("loaded dataset %s: %d images of %s", name, images.shape[0], "x".join(map(str, images.shape[1:])))
    return Dataset(images=images, name=name)


def check_dataset_spec(spec: str) -> tuple[str, Path | None]:
    """Parse a dataset spec without reading it: ``(kind, path)`` (path None for the built-in digits). DataError
    for an unknown kind, a missing path or a path that does not exist — checked before any output is written."""
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"Dataset spec is empty or not a string ({spec!r}). Expected one of: {SPEC_HELP}.")
    spec = spec.strip()
    if spec == "digits":
        return "digits", None
    prefix, sep, raw_path = spec.partition(":")
    if not sep or prefix not in ("folder", "cifar10", "npz"):
        raise DataError(
            f"Unknown dataset spec {spec!r}. Expected one of: {SPEC_HELP} "
            f"(built-in datasets: {', '.join(builtin_datasets())})."
        )
    if not raw_path.strip():
        raise DataError(f"Dataset spec {spec!r} has no path after '{prefix}:'. Expected {prefix}:PATH.")
    path = Path(raw_path.strip()).expanduser().resolve()
    if not path.exists():
        raise DataError(f"Dataset path {path} does not exist (from spec {spec!r}). Check the path and try again.")
    return prefix, path


# ---------------------------------------------------------------------------------------------- options


def _check_options(image_size: int | None, channels: int | None) -> None:
    if image_size is not None and (
        isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 1
    ):
        raise DataError(f"image_size must be a positive integer or None, got {image_size!r}.")
    if channels is not None and (isinstance(channels, bool) or channels not in VALID_CHANNELS):
        raise DataError(
            f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}. Pass channels=1 or channels=3."
        )


# ------------------------------------------------------------------------------------ array transforms


def _to_channels(x: np.ndarray, channels: int | None, source: str) -> np.ndarray:
    """float [N, C, H, W] with C in {1, 3} -> ``channels`` (luma for 3 -> 1, repeat for 1 -> 3)."""
    have = x.shape[1]
    if have not in VALID_CHANNELS:
        raise DataError(f"{source}: found {have} channels, expected 1 (grayscale) or 3 (RGB).")
    if channels is None or channels == have:
        return x
    if channels == 3:
        return np.repeat(x, 3, axis=1)
    w = np.asarray(LUMA_WEIGHTS, dtype=np.float32).reshape(1, 3, 1, 1)
    return (x * w).sum(axis=1, keepdims=True, dtype=np.float32)


def _resize_float(x: np.ndarray, size: int, resample: int) -> np.ndarray:
    """Resize float32 [N, C, H, W] (square) to [N, C, size, size] with Pillow on "F" images, clip to [-1, 1]."""
    from PIL import Image

    n, c, h, w = x.shape
    if h == size and w == size:
        return x
    out = np.empty((n, c, size, size), dtype=np.float32)
    for i in range(n):
        for j in range(c):
            img = Image.fromarray(np.ascontiguousarray(x[i, j], dtype=np.float32), mode="F")
            out[i, j] = np.asarray(img.resize((size, size), resample=resample), dtype=np.float32)
    return np.clip(out, -1.0, 1.0, out=out)


# ---------------------------------------------------------------------------------------------- digits


def _load_digits(image_size: int | None, channels: int | None) -> np.ndarray:
    from PIL import Image

    datasets = lazy_import("sklearn.datasets", "The 'digits' dataset", "pip install scikit-learn")
    raw = np.asarray(datasets.load_digits().images, dtype=np.float32)  # [N, 8, 8], 0..16
    x = (raw / 8.0 - 1.0)[:, None]  # [-1, 1]
    x = _resize_float(x, image_size or DIGITS_SIZE, Image.Resampling.BILINEAR)
    return _to_channels(x, channels or 1, "digits")


# ---------------------------------------------------------------------------------------------- folder


def _find_images(root: Path) -> list[Path]:
    files = [p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _load_folder(root: Path, image_size: int | None, channels: int | None) -> np.ndarray:
    from PIL import Image, ImageOps

    if not root.is_dir():
        raise DataError(f"folder:{root} is not a directory. Pass a directory of .png/.jpg/.jpeg images.")
    if image_size is None:
        raise DataError(
            f"folder:{root} needs an image size: images are resized and centre-cropped to a square of that "
            "side. Pass image_size (e.g. --image-size 32)."
        )
    files = _find_images(root)
    if not files:
        raise DataError(
            f"No images found under {root}: expected files ending in {', '.join(IMAGE_EXTENSIONS)} "
            "(case-insensitive, searched recursively). Point folder: at the directory that holds them."
        )
    channels = channels or 3
    mode = "RGB" if channels == 3 else "L"
    out = np.empty((len(files), image_size, image_size, channels), dtype=np.uint8)
    for i, f in enumerate(files):
        try:
            with Image.open(f) as img:
                img = ImageOps.exif_transpose(img)
                img = _resize_center_crop(img.convert(mode), image_size)
                arr = np.asarray(img, dtype=np.uint8)
        except Exception as e:  # anything Pillow raises on a bad file becomes one clear error
            raise DataError(
                f"Cannot read image {f}: {type(e).__name__}: {e}. The file is unreadable or corrupt; "
                "delete or replace it and try again."
            ) from e
        out[i] = arr.reshape(image_size, image_size, channels)
    return out.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0


def _resize_center_crop(img, size: int):
    """Resize the shorter side to ``size`` (BICUBIC), then crop the centre ``size`` x ``size`` square."""
    from PIL import Image

    w, h = img.size
    if w < 1 or h < 1:
        raise ValueError(f"image has no pixels ({w}x{h})")
    if min(w, h) != size:
        scale = size / min(w, h)
        new = (max(size, round(w * scale)), max(size, round(h * scale)))
        img = img.resize(new, resample=Image.Resampling.BICUBIC)
        w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


# --------------------------------------------------------------------------------------------- CIFAR-10


def _numpy_global(module: str, name: str):
    """numpy internals moved from numpy.core to numpy._core in NumPy 2; pickles name either."""
    new, old = module.replace("numpy.core.", "numpy._core."), module.replace("numpy._core.", "numpy.core.")
    for mod in (new, old):  # NumPy 2 name first: importing numpy.core there is deprecated
        try:
            return getattr(importlib.import_module(mod), name)
        except (ImportError, AttributeError):
            continue
    raise pickle.UnpicklingError(f"numpy has no {module}.{name}")  # pragma: no cover - numpy layout changed


# The only globals a CIFAR-10 batch may name. Everything else (os.system, builtins.eval, ...) is refused.
# _frombuffer is how NumPy pickles arrays under pickle protocol 5 (the default from Python 3.14); like
# _reconstruct it only builds an array from bytes.
_ALLOWED_GLOBALS = {
    **{(mod, n): n for mod in ("builtins", "__builtin__") for n in ("dict", "list", "bytes", "str", "int")},
    ("numpy.core.multiarray", "_reconstruct"): "numpy",
    ("numpy._core.multiarray", "_reconstruct"): "numpy",
    ("numpy.core.numeric", "_frombuffer"): "numpy",
    ("numpy._core.numeric", "_frombuffer"): "numpy",
    ("numpy", "ndarray"): "numpy",
    ("numpy", "dtype"): "numpy",
    # Pickle protocol 2 has no bytes opcode: Python 3 writes bytes (a batch's b'data' keys, an array's buffer) as
    # _codecs.encode(str, 'latin1'). Only that call is allowed, through _latin1_bytes (never the codec registry).
    ("_codecs", "encode"): "latin1",
}


def _latin1_bytes(text, encoding="latin1", errors="strict"):
    """The one use of ``_codecs.encode`` a protocol-2 pickle of bytes makes: ``(str, 'latin1') -> bytes``."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "iso8859-1", "iso-8859-1") \
            or errors != "strict":
        raise pickle.UnpicklingError(f"_codecs.encode({type(text).__name__}, {encoding!r}) is not a protocol-2 "
                                     f"bytes value")
    return text.encode("latin1")


class _RefusedGlobal(pickle.UnpicklingError):
    def __init__(self, module: str, name: str):
        self.qualname = f"{module}.{name}"
        super().__init__(self.qualname)


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        kind = _ALLOWED_GLOBALS.get((module, name))
        if kind is None:
            raise _RefusedGlobal(module, name)
        if kind == "numpy":
            return getattr(np, name) if module == "numpy" else _numpy_global(module, name)
        if kind == "latin1":
            return _latin1_bytes
        return {"dict": dict, "list": list, "bytes": bytes, "str": str, "int": int}[kind]


def _unpickle_restricted(path: Path):
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"Cannot read CIFAR-10 batch {path}: {e}.") from e
    try:
        return _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except _RefusedGlobal as e:
        raise DataError(
            f"Refused to load {path}: the pickle names '{e.qualname}', which a CIFAR-10 batch never contains "
            "(only dicts, lists, bytes, str, int and NumPy arrays are allowed). The file is corrupt or "
            f"malicious; re-download the python version of CIFAR-10 from {CIFAR10_URL}."
        ) from None
    except Exception as e:
        raise DataError(
            f"Cannot unpickle CIFAR-10 batch {path}: {type(e).__name__}: {e}. Expected a pickled dict from the "
            f"python version of CIFAR-10; re-download it from {CIFAR10_URL}."
        ) from e


def _read_cifar_batch(path: Path) -> np.ndarray:
    """One batch file -> uint8 [N, 3, 32, 32]."""
    obj = _unpickle_restricted(path)
    if not isinstance(obj, dict):
        raise DataError(
            f"CIFAR-10 batch {path} holds a {type(obj).__name__}, expected a dict with b'data' and b'labels'."
        )
    batch = {(k.encode() if isinstance(k, str) else k): v for k, v in obj.items()}
    missing = [k for k in (b"data", b"labels") if k not in batch]
    if missing:
        raise DataError(
            f"CIFAR-10 batch {path} lacks the key(s) {missing}; found keys {sorted(map(repr, batch))}. "
            f"Expected a dict with b'data' (uint8 [N, {CIFAR10_ROW}]) and b'labels' (python version of CIFAR-10)."
        )
    data = batch[b"data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != CIFAR10_ROW:
        found = f"{data.dtype} {list(data.shape)}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(
            f"CIFAR-10 batch {path}: b'data' is {found}, expected uint8 [N, {CIFAR10_ROW}] (3x32x32 images, "
            f"CHW order). Re-download the python version of CIFAR-10 from {CIFAR10_URL}."
        )
    labels = batch[b"labels"]
    if not hasattr(labels, "__len__") or len(labels) != data.shape[0]:
        n_labels = len(labels) if hasattr(labels, "__len__") else type(labels).__name__
        raise DataError(
            f"CIFAR-10 batch {path}: {data.shape[0]} images but {n_labels} labels; the file is corrupt. "
            f"Re-download it from {CIFAR10_URL}."
        )
    return data.reshape(-1, 3, CIFAR10_SIZE, CIFAR10_SIZE)


def _load_cifar10(path: Path, image_size: int | None, channels: int | None) -> np.ndarray:
    from PIL import Image

    if path.is_dir():
        files = sorted((p for p in path.glob("data_batch_*") if p.is_file()), key=_natural_key)
        if not files:
            found = sorted(p.name for p in path.iterdir())[:10]
            raise DataError(
                f"No CIFAR-10 training batches (data_batch_1 .. data_batch_5) in {path}; found {found}. "
                f"Point cifar10: at the extracted 'cifar-10-batches-py' directory ({CIFAR10_URL})."
            )
    else:
        files = [path]
    data = np.concatenate([_read_cifar_batch(f) for f in files])
    x = data.astype(np.float32) / 127.5 - 1.0
    x = _to_channels(x, channels or 3, f"cifar10:{path}")
    return _resize_float(x, image_size or CIFAR10_SIZE, Image.Resampling.BICUBIC)


def _natural_key(p: Path):
    stem, _, num = p.name.rpartition("_")
    return (stem, int(num) if num.isdigit() else -1, p.name)


# -------------------------------------------------------------------------------------------------- npz


def _load_npz(path: Path, image_size: int | None, channels: int | None) -> np.ndarray:
    from PIL import Image

    if not path.is_file():
        raise DataError(f"npz:{path} is not a file. Pass a .npz file made with numpy.savez.")
    try:
        npz = np.load(path, allow_pickle=False)
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise DataError(
                f"{path} is a single .npy array, expected a .npz archive. Save it with numpy.savez(path, images=x)."
            )
        with npz:
            keys = list(npz.files)
            key = keys[0] if len(keys) == 1 else next((k for k in NPZ_KEYS if k in keys), None)
            if key is None:
                raise DataError(
                    f"{path} holds {len(keys)} arrays {keys}; expected exactly one array or one named "
                    f"{' / '.join(NPZ_KEYS)}. Rename the image array to 'images'."
                )
            arr = npz[key]
    except DataError:
        raise
    except ValueError as e:
        if "allow_pickle" in str(e) or "Object arrays" in str(e):
            raise DataError(
                f"{path} holds an object array (e.g. a list of images of mismatched sizes), which needs pickle "
                "and is not loaded. Save one uint8 array [N, H, W, C] of equal-sized square images."
            ) from e
        raise DataError(f"Cannot read {path}: {e}. Expected a .npz archive made with numpy.savez.") from e
    except (OSError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise DataError(
            f"Cannot read {path}: {type(e).__name__}: {e}. The file is corrupt or not a .npz archive; "
            "expected a file written by numpy.savez."
        ) from e
    src = f"{path} (array '{key}', {arr.dtype} {list(arr.shape)})"
    x = _npz_layout(arr, src)
    if x.shape[0] == 0:
        raise DataError(f"{src} holds no images (N = 0).")
    x = _npz_values(x, src)
    x = _to_channels(x, channels, src)
    return _resize_float(x, image_size or x.shape[2], Image.Resampling.BICUBIC)


def _npz_layout(arr: np.ndarray, src: str) -> np.ndarray:
    """[N, H, W] / [N, H, W, C] / [N, C, H, W] -> [N, C, H, W], refusing non-square and bad channel counts."""
    expected = "expected [N, H, W], [N, H, W, C] or [N, C, H, W] with C in {1, 3} and H == W"
    if arr.ndim == 3:
        if arr.shape[1] != arr.shape[2]:
            raise DataError(f"{src}: images are {arr.shape[1]}x{arr.shape[2]}, not square; {expected}.")
        return arr[:, None]
    if arr.ndim != 4:
        raise DataError(f"{src}: {arr.ndim}-D array; {expected}.")
    s = arr.shape
    layouts = []
    if s[2] == s[3]:
        layouts.append(("NCHW", s[1]))
    if s[1] == s[2]:
        layouts.append(("NHWC", s[3]))
    if not layouts:
        raise DataError(f"{src}: images are not square (no two equal spatial sides); {expected}.")
    valid = [lay for lay in layouts if lay[1] in VALID_CHANNELS]
    if not valid:
        found = " or ".join(str(c) for _, c in layouts)
        raise DataError(
            f"{src}: {found} channels, expected 1 (grayscale) or 3 (RGB); {expected}. "
            "Drop the alpha channel or convert the images first."
        )
    if len(valid) > 1:
        raise DataError(f"{src}: ambiguous layout (could be NCHW or NHWC); {expected}, with H, W > 3.")
    return arr if valid[0][0] == "NCHW" else arr.transpose(0, 3, 1, 2)


def _npz_values(x: np.ndarray, src: str) -> np.ndarray:
    """Integer 0..255 or float [0, 1] / [-1, 1] -> float32 [-1, 1] (rule in the module docstring)."""
    if x.dtype == np.bool_ or not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise DataError(f"{src}: dtype {x.dtype} is not supported; expected uint8 0..255 or float in [0, 1] / [-1, 1].")
    lo, hi = x.min(), x.max()
    if np.issubdtype(x.dtype, np.integer):
        if lo < 0 or hi > 255:
            raise DataError(f"{src}: integer values span {lo}..{hi}, expected 0..255. Convert to uint8 first.")
        return x.astype(np.float32) / 127.5 - 1.0
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise DataError(f"{src}: contains NaN or Inf; expected finite values in [0, 1] or [-1, 1].")
    s = FLOAT_RANGE_SLACK
    if lo < -1 - s or hi > 1 + s:
        raise DataError(
            f"{src}: float values span [{lo:.4g}, {hi:.4g}], expected [0, 1] or [-1, 1]. For 0..255 values "
            "save uint8 (x.astype(np.uint8)); otherwise rescale to [-1, 1]."
        )
    x = x.astype(np.float32)
    if lo >= 0:  # no negative value: [0, 1]
        x = x * 2.0 - 1.0
    return np.clip(x, -1.0, 1.0)


__all__ = ["Dataset", "DataError", "builtin_datasets", "load_dataset"]
