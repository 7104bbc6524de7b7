"""Tests for ddpm_deploy.trainer.data: every spec, every layout, every user mistake."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ddpm_deploy.runtime.errors import DataError
from ddpm_deploy.trainer.data import Dataset, builtin_datasets, load_dataset

# ---------------------------------------------------------------------------------------------- helpers


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _save_image(path: Path, arr: np.ndarray, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, **kwargs)
    return path


def _cifar_batch(n: int, seed: int, label: bytes = b"training batch") -> dict:
    rng = _rng(seed)
    return {
        b"batch_label": label,
        b"labels": [int(v) for v in rng.integers(0, 10, n)],
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [f"img_{seed}_{i}.png".encode() for i in range(n)],
    }


def _write_pickle(path: Path, obj, protocol: int = 4) -> Path:
    # Protocol 4 keeps bytes as bytes opcodes and arrays as numpy ..._reconstruct, like the real files.
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


@pytest.fixture
def cifar_dir(tmp_path: Path) -> Path:
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    _write_pickle(root / "data_batch_1", _cifar_batch(5, seed=1))
    _write_pickle(root / "data_batch_2", _cifar_batch(7, seed=2))
    _write_pickle(root / "test_batch", _cifar_batch(3, seed=3, label=b"testing batch"))
    (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"airplane"]}, protocol=4))
    return root


class _CallsGetcwd:
    def __reduce__(self):
        return (os.getcwd, ())


class _CallsPrint:
    def __reduce__(self):
        return (print, ("PWNED",))


def _load_error(spec: str, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        load_dataset(spec, **kwargs)
    return str(info.value)


# ---------------------------------------------------------------------------------------------- digits


def test_builtin_datasets_lists_digits():
    assert builtin_datasets() == ["digits"]


def test_digits_shape_range_and_content():
    ds = load_dataset("digits")

    assert isinstance(ds, Dataset)
    assert ds.name == "digits"
    assert ds.images.shape == (1797, 1, 16, 16)
    assert ds.images.dtype == np.float32
    assert ds.images.min() == -1.0 and ds.images.max() == 1.0
    assert ds.images.std() > 0.1
    assert len(ds) == 1797 and ds.channels == 1 and ds.image_size == 16


def test_digits_is_bilinear_upscale_of_sklearn_digits():
    from sklearn.datasets import load_digits

    raw = load_digits().images[0].astype(np.float32) / 8.0 - 1.0

    img = load_dataset("digits").images[0, 0]

    # 2x half-pixel-centred bilinear: the corner pixel repeats, interior pixels mix 3/4 + 1/4.
    assert img[0, 0] == pytest.approx(raw[0, 0], abs=1e-6)
    expected = 0.5625 * raw[0, 0] + 0.1875 * (raw[0, 1] + raw[1, 0]) + 0.0625 * raw[1, 1]
    assert img[1, 1] == pytest.approx(expected, abs=1e-5)
    # Averaging each 2x2 block of the 2x upscale returns close to the source image.
    blocks = img.reshape(8, 2, 8, 2).mean(axis=(1, 3))
    assert np.abs(blocks - raw).max() < 0.5


def test_digits_resize_and_three_channels():
    ds = load_dataset("digits", image_size=32, channels=3)

    assert ds.images.shape == (1797, 3, 32, 32)
    assert ds.images.min() >= -1.0 and ds.images.max() <= 1.0
    np.testing.assert_array_equal(ds.images[:, 0], ds.images[:, 2])


# ---------------------------------------------------------------------------------------------- folder


def test_folder_mixed_sizes_and_formats(tmp_path: Path):
    rng = _rng(1)
    _save_image(tmp_path / "b.png", rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))
    _save_image(tmp_path / "sub" / "a.JPG", rng.integers(0, 256, (40, 24, 3), dtype=np.uint8), quality=95)
    _save_image(tmp_path / "sub" / "deep" / "c.jpeg", rng.integers(0, 256, (16, 16), dtype=np.uint8))
    _save_image(tmp_path / "d.PNG", rng.integers(0, 256, (12, 12, 4), dtype=np.uint8))  # RGBA
    (tmp_path / "notes.txt").write_text("not an image")
    _save_image(tmp_path / "e.gif", rng.integers(0, 256, (16, 16), dtype=np.uint8))  # ignored extension

    ds = load_dataset(f"folder:{tmp_path}", image_size=16)

    assert ds.images.shape == (4, 3, 16, 16)
    assert ds.images.dtype == np.float32
    assert ds.images.min() >= -1.0 and ds.images.max() <= 1.0
    assert ds.name == f"folder:{tmp_path.resolve()}"


def test_folder_order_is_sorted_by_relative_path(tmp_path: Path):
    for i, name in enumerate(["b.png", "a/z.png", "a.png"]):
        _save_image(tmp_path / name, np.full((4, 4, 3), 10 * (i + 1), dtype=np.uint8))

    ds = load_dataset(f"folder:{tmp_path}", image_size=4)

    # Sorted: "a.png" (30), "a/z.png" (20), "b.png" (10).
    values = np.round((ds.images[:, 0, 0, 0] + 1) * 127.5)
    np.testing.assert_array_equal(values, [30, 20, 10])


def test_folder_center_crop_without_resize_keeps_exact_pixels(tmp_path: Path):
    # 8 rows x 16 columns, each column has its own value; shorter side already 8 -> crop columns 4..11.
    cols = (np.arange(16, dtype=np.uint8) * 16)[None, :, None]
    img = np.broadcast_to(cols, (8, 16, 3)).copy()
    _save_image(tmp_path / "wide.png", img)

    ds = load_dataset(f"folder:{tmp_path}", image_size=8)

    got = np.round((ds.images[0] + 1) * 127.5).astype(np.int64)
    expected = np.broadcast_to((np.arange(4, 12) * 16)[None, None, :], (3, 8, 8))
    np.testing.assert_array_equal(got, expected)


def test_folder_resize_then_center_crop(tmp_path: Path):
    # 32 rows x 64 columns: white 32x32 centre square on black. Shorter side 32 -> 8: image becomes 8x16,
    # the centre 8x8 crop is the white square.
    img = np.zeros((32, 64, 3), dtype=np.uint8)
    img[:, 16:48] = 255
    _save_image(tmp_path / "tall.png", np.ascontiguousarray(img.transpose(1, 0, 2)))  # 64 rows x 32 columns
    _save_image(tmp_path / "wide.png", img)

    ds = load_dataset(f"folder:{tmp_path}", image_size=8)

    assert ds.images.shape == (2, 3, 8, 8)
    # Interior is white; only the outermost ring may blend with black through the bicubic filter.
    assert ds.images[:, :, 1:-1, 1:-1].min() > 0.95
    assert ds.images.mean() > 0.8


def test_folder_grayscale_vs_rgb(tmp_path: Path):
    rgb = np.zeros((6, 6, 3), dtype=np.uint8)
    rgb[..., 0] = 200
    rgb[..., 1] = 100
    rgb[..., 2] = 50
    _save_image(tmp_path / "x.png", rgb)

    color = load_dataset(f"folder:{tmp_path}", image_size=6)
    gray = load_dataset(f"folder:{tmp_path}", image_size=6, channels=1)

    assert color.images.shape == (1, 3, 6, 6)
    assert gray.images.shape == (1, 1, 6, 6)
    np.testing.assert_allclose((color.images[0, :, 0, 0] + 1) * 127.5, [200, 100, 50], atol=1e-3)
    luma = 200 * 0.299 + 100 * 0.587 + 50 * 0.114  # Pillow's "L"
    assert (gray.images[0, 0, 0, 0] + 1) * 127.5 == pytest.approx(luma, abs=1.0)


def test_folder_grayscale_file_to_rgb_repeats(tmp_path: Path):
    _save_image(tmp_path / "g.png", _rng(2).integers(0, 256, (5, 5), dtype=np.uint8))

    ds = load_dataset(f"folder:{tmp_path}", image_size=5)

    np.testing.assert_array_equal(ds.images[0, 0], ds.images[0, 1])
    np.testing.assert_array_equal(ds.images[0, 0], ds.images[0, 2])


def test_folder_requires_image_size(tmp_path: Path):
    _save_image(tmp_path / "x.png", np.zeros((4, 4, 3), dtype=np.uint8))

    msg = _load_error(f"folder:{tmp_path}")

    assert "image_size" in msg and str(tmp_path) in msg


def test_folder_empty(tmp_path: Path):
    (tmp_path / "readme.txt").write_text("nothing here")

    msg = _load_error(f"folder:{tmp_path}", image_size=8)

    assert "No images found" in msg and str(tmp_path) in msg and ".png" in msg


def test_folder_path_is_a_file(tmp_path: Path):
    f = _save_image(tmp_path / "x.png", np.zeros((4, 4, 3), dtype=np.uint8))

    msg = _load_error(f"folder:{f}", image_size=4)

    assert "not a directory" in msg and str(f) in msg


@pytest.mark.parametrize("content", [b"", b"this is not a png", None], ids=["empty", "garbage", "truncated"])
def test_folder_corrupt_image_names_the_file(tmp_path: Path, content):
    _save_image(tmp_path / "good.png", np.zeros((8, 8, 3), dtype=np.uint8))
    bad = tmp_path / "bad.png"
    if content is None:
        _save_image(bad, _rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8))
        bad.write_bytes(bad.read_bytes()[:200])
    else:
        bad.write_bytes(content)

    msg = _load_error(f"folder:{tmp_path}", image_size=8)

    assert str(bad) in msg and "unreadable or corrupt" in msg


def test_folder_corrupt_jpeg_names_the_file(tmp_path: Path):
    bad = _save_image(tmp_path / "photo.jpg", _rng(4).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    bad.write_bytes(bad.read_bytes()[:300])

    msg = _load_error(f"folder:{tmp_path}", image_size=8)

    assert str(bad) in msg


# --------------------------------------------------------------------------------------------- CIFAR-10


def test_cifar_dir_reads_only_training_batches(cifar_dir: Path):
    b1 = pickle.loads((cifar_dir / "data_batch_1").read_bytes())[b"data"]
    b2 = pickle.loads((cifar_dir / "data_batch_2").read_bytes())[b"data"]

    ds = load_dataset(f"cifar10:{cifar_dir}")

    assert ds.images.shape == (12, 3, 32, 32)  # 5 + 7, test_batch (3) left out
    assert ds.name == f"cifar10:{cifar_dir.resolve()}"
    expected = np.concatenate([b1, b2]).reshape(-1, 3, 32, 32).astype(np.float32) / 127.5 - 1
    np.testing.assert_array_equal(ds.images, expected)


def test_cifar_chw_order(tmp_path: Path):
    batch = _cifar_batch(1, seed=5)
    row = np.zeros(3072, dtype=np.uint8)
    row[:1024] = 255  # red plane first
    batch[b"data"] = row[None]
    f = _write_pickle(tmp_path / "data_batch_1", batch)

    ds = load_dataset(f"cifar10:{f}")

    assert np.all(ds.images[0, 0] == 1.0) and np.all(ds.images[0, 1:] == -1.0)


def test_cifar_single_file_grayscale_and_resize(cifar_dir: Path):
    ds = load_dataset(f"cifar10:{cifar_dir / 'test_batch'}", image_size=16, channels=1)

    assert ds.images.shape == (3, 1, 16, 16)
    assert ds.images.min() >= -1.0 and ds.images.max() <= 1.0


def test_cifar_grayscale_is_luma(cifar_dir: Path):
    rgb = load_dataset(f"cifar10:{cifar_dir}").images
    gray = load_dataset(f"cifar10:{cifar_dir}", channels=1).images

    expected = 0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]
    np.testing.assert_allclose(gray[:, 0], expected, atol=1e-5)


def test_cifar_accepts_numpy1_module_names(tmp_path: Path):
    # Real CIFAR files were written by NumPy 1 and name numpy.core.multiarray._reconstruct.
    raw = pickle.dumps(_cifar_batch(2, seed=6), protocol=3)
    assert b"cnumpy._core.multiarray\n_reconstruct\n" in raw
    f = tmp_path / "data_batch_1"
    f.write_bytes(raw.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n"))

    ds = load_dataset(f"cifar10:{f}")

    assert ds.images.shape == (2, 3, 32, 32)


def test_cifar_accepts_protocol5(tmp_path: Path):
    f = _write_pickle(tmp_path / "data_batch_1", _cifar_batch(2, seed=7), protocol=5)

    assert load_dataset(f"cifar10:{f}").images.shape == (2, 3, 32, 32)


def test_cifar_accepts_protocol2_written_by_python3(tmp_path: Path):
    # Protocol 2 has no bytes opcode: Python 3 writes bytes as _codecs.encode(str, 'latin1').
    batch = _cifar_batch(3, seed=13)
    f = _write_pickle(tmp_path / "data_batch_1", batch, protocol=2)
    assert b"_codecs\nencode" in f.read_bytes()

    ds = load_dataset(f"cifar10:{f}")

    (tmp_path / "p4").mkdir()
    p4 = _write_pickle(tmp_path / "p4" / "data_batch_1", batch)
    np.testing.assert_array_equal(ds.images, load_dataset(f"cifar10:{p4}").images)


class _CallsCodecs:
    def __init__(self, *args):
        self.args = args

    def __reduce__(self):
        import _codecs

        return (_codecs.encode, self.args)


@pytest.mark.parametrize("args", [("eA==", "base64"), ("x", "zlib"), (b"x", "latin1"), ("x", "latin1", "ignore")],
                         ids=["base64", "zlib", "bytes-arg", "errors-arg"])
def test_cifar_protocol2_codecs_only_for_latin1_bytes(tmp_path: Path, args):
    batch = _cifar_batch(2, seed=14)
    batch[b"batch_label"] = _CallsCodecs(*args)
    f = _write_pickle(tmp_path / "data_batch_1", batch, protocol=2)

    msg = _load_error(f"cifar10:{f}")

    assert "Cannot unpickle" in msg and "is not a protocol-2 bytes value" in msg and str(f) in msg


@pytest.mark.parametrize("payload", [_CallsGetcwd(), _CallsPrint()], ids=["os.getcwd", "builtins.print"])
def test_cifar_malicious_pickle_is_refused(tmp_path: Path, capsys, payload):
    batch = _cifar_batch(2, seed=8)
    batch[b"batch_label"] = payload
    f = _write_pickle(tmp_path / "data_batch_1", batch)

    msg = _load_error(f"cifar10:{tmp_path}")

    assert "Refused" in msg and str(f) in msg
    assert ("getcwd" in msg) or ("print" in msg)
    assert "PWNED" not in capsys.readouterr().out


def test_cifar_eval_from_builtins_is_refused(tmp_path: Path):
    f = tmp_path / "data_batch_1"
    f.write_bytes(b"cbuiltins\neval\n(V1+1\ntR.")

    msg = _load_error(f"cifar10:{f}")

    assert "builtins.eval" in msg and str(f) in msg


def test_cifar_wrong_keys(tmp_path: Path):
    f = _write_pickle(tmp_path / "data_batch_1", {b"pixels": np.zeros((1, 3072), np.uint8), b"labels": [0]})

    msg = _load_error(f"cifar10:{tmp_path}")

    assert str(f) in msg and "b'data'" in msg and "pixels" in msg


def test_cifar_wrong_data_size(tmp_path: Path):
    batch = _cifar_batch(2, seed=9)
    batch[b"data"] = np.zeros((2, 3000), dtype=np.uint8)
    f = _write_pickle(tmp_path / "data_batch_1", batch)

    msg = _load_error(f"cifar10:{tmp_path}")

    assert str(f) in msg and "3072" in msg and "3000" in msg


def test_cifar_labels_count_mismatch(tmp_path: Path):
    batch = _cifar_batch(3, seed=10)
    batch[b"labels"] = [0]
    f = _write_pickle(tmp_path / "data_batch_1", batch)

    msg = _load_error(f"cifar10:{f}")

    assert str(f) in msg and "labels" in msg


def test_cifar_not_a_dict(tmp_path: Path):
    f = _write_pickle(tmp_path / "data_batch_1", [1, 2, 3])

    msg = _load_error(f"cifar10:{f}")

    assert str(f) in msg and "expected a dict" in msg


def test_cifar_corrupt_pickle(tmp_path: Path):
    f = tmp_path / "data_batch_1"
    f.write_bytes(pickle.dumps(_cifar_batch(2, seed=11), protocol=4)[:100])

    msg = _load_error(f"cifar10:{f}")

    assert str(f) in msg and "Cannot unpickle" in msg


def test_cifar_dir_without_batches(tmp_path: Path):
    _write_pickle(tmp_path / "test_batch", _cifar_batch(2, seed=12))

    msg = _load_error(f"cifar10:{tmp_path}")

    assert str(tmp_path) in msg and "data_batch" in msg and "test_batch" in msg


# -------------------------------------------------------------------------------------------------- npz


def _npz(tmp_path: Path, name: str = "d.npz", **arrays) -> Path:
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


_NHWC = (0, 3, 1, 2)
_SAME = (0, 1, 2, 3)


@pytest.mark.parametrize(
    "shape, to_nchw, expected",
    [
        ((4, 8, 8, 3), _NHWC, (4, 3, 8, 8)),
        ((4, 3, 8, 8), _SAME, (4, 3, 8, 8)),
        ((4, 8, 8), None, (4, 1, 8, 8)),
        ((4, 8, 8, 1), _NHWC, (4, 1, 8, 8)),
        ((4, 1, 8, 8), _SAME, (4, 1, 8, 8)),
    ],
    ids=["NHWC", "NCHW", "NHW", "NHWC-gray", "NCHW-gray"],
)
def test_npz_uint8_layouts(tmp_path: Path, shape, to_nchw, expected):
    arr = _rng(20).integers(0, 256, shape, dtype=np.uint8)
    path = _npz(tmp_path, images=arr)

    ds = load_dataset(f"npz:{path}")

    assert ds.images.shape == expected
    assert ds.name == f"npz:{path.resolve()}"
    nchw = arr[:, None] if to_nchw is None else arr.transpose(to_nchw)
    np.testing.assert_allclose(ds.images, nchw.astype(np.float32) / 127.5 - 1, atol=1e-6)


def test_npz_nhwc_pixel_placement(tmp_path: Path):
    arr = np.zeros((1, 4, 4, 3), dtype=np.uint8)
    arr[0, 1, 2] = (255, 0, 255)
    path = _npz(tmp_path, x=arr)

    img = load_dataset(f"npz:{path}").images[0]

    np.testing.assert_array_equal(img[:, 1, 2], [1, -1, 1])
    assert (img == -1).sum() == 3 * 16 - 2


def test_npz_float_ranges(tmp_path: Path):
    rng = _rng(21)
    sym = rng.uniform(-1, 1, (3, 6, 6, 3)).astype(np.float32)
    unit = rng.uniform(0, 1, (3, 6, 6, 3)).astype(np.float64)

    a = load_dataset(f"npz:{_npz(tmp_path, 'sym.npz', images=sym)}").images
    b = load_dataset(f"npz:{_npz(tmp_path, 'unit.npz', arr_0=unit)}").images

    np.testing.assert_allclose(a, sym.transpose(0, 3, 1, 2), atol=1e-6)
    np.testing.assert_allclose(b, unit.transpose(0, 3, 1, 2) * 2 - 1, atol=1e-6)
    assert a.dtype == b.dtype == np.float32


def test_npz_picks_known_key_among_several(tmp_path: Path):
    path = _npz(tmp_path, labels=np.arange(2), images=np.zeros((2, 4, 4), np.uint8))

    assert load_dataset(f"npz:{path}").images.shape == (2, 1, 4, 4)


def test_npz_channels_and_resize(tmp_path: Path):
    path = _npz(tmp_path, images=_rng(22).integers(0, 256, (2, 8, 8), dtype=np.uint8))

    ds = load_dataset(f"npz:{path}", image_size=12, channels=3)

    assert ds.images.shape == (2, 3, 12, 12)
    assert ds.images.min() >= -1 and ds.images.max() <= 1
    np.testing.assert_array_equal(ds.images[:, 0], ds.images[:, 1])


@pytest.mark.parametrize(
    "arr, needle",
    [
        (np.zeros((2, 8, 6, 3), np.uint8), "not square"),
        (np.zeros((2, 8, 6), np.uint8), "not square"),
        (np.zeros((2, 8, 8, 4), np.uint8), "4 channels"),
        (np.zeros((2, 2, 8, 8), np.uint8), "2 channels"),
        (np.zeros((2, 3, 3, 3), np.uint8), "ambiguous"),
        (np.zeros((8, 8), np.uint8), "2-D"),
        (np.zeros((0, 8, 8), np.uint8), "no images"),
        (np.full((2, 4, 4), 300, np.int32), "0..255"),
        (np.full((2, 4, 4), -3, np.int16), "0..255"),
        (np.full((2, 4, 4), 200.0, np.float32), "0..255"),
        (np.full((2, 4, 4), -1.5, np.float32), "[-1, 1]"),
        (np.full((2, 4, 4), np.nan, np.float32), "NaN"),
        (np.zeros((2, 4, 4), np.bool_), "dtype bool"),
        (np.zeros((2, 4, 4), np.complex64), "dtype complex64"),
    ],
    ids=[
        "nhwc-nonsquare", "nhw-nonsquare", "rgba", "2ch", "ambiguous", "2d", "empty",
        "int-high", "int-neg", "float-255", "float-low", "nan", "bool", "complex",
    ],
)
def test_npz_bad_arrays(tmp_path: Path, arr, needle):
    path = _npz(tmp_path, images=arr)

    msg = _load_error(f"npz:{path}")

    assert needle in msg and str(path) in msg


def test_npz_several_arrays_without_known_key(tmp_path: Path):
    path = _npz(tmp_path, a=np.zeros((2, 4, 4), np.uint8), b=np.zeros(2))

    msg = _load_error(f"npz:{path}")

    assert str(path) in msg and "'a'" in msg and "images" in msg


def test_npz_object_array_of_mismatched_sizes(tmp_path: Path):
    ragged = np.empty(2, dtype=object)
    ragged[0], ragged[1] = np.zeros((4, 4), np.uint8), np.zeros((5, 5), np.uint8)
    path = tmp_path / "ragged.npz"
    np.savez(path, images=ragged)

    msg = _load_error(f"npz:{path}")

    assert str(path) in msg and "mismatched sizes" in msg


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04garbage", b"just text"], ids=["empty", "bad-zip", "text"])
def test_npz_corrupt_file(tmp_path: Path, content):
    path = tmp_path / "bad.npz"
    path.write_bytes(content)

    msg = _load_error(f"npz:{path}")

    assert str(path) in msg


def test_npz_given_npy(tmp_path: Path):
    path = tmp_path / "arr.npy"
    np.save(path, np.zeros((2, 4, 4), np.uint8))

    msg = _load_error(f"npz:{path}")

    assert str(path) in msg and ".npz" in msg


def test_npz_path_is_a_directory(tmp_path: Path):
    msg = _load_error(f"npz:{tmp_path}")

    assert str(tmp_path) in msg and "not a file" in msg


# ------------------------------------------------------------------------------------------ spec errors


@pytest.mark.parametrize("spec", ["mnist", "imagenet:/data", "Digits", ""])
def test_unknown_spec_lists_valid_ones(spec):
    msg = _load_error(spec)

    assert "digits" in msg and "folder:PATH" in msg and "cifar10:PATH" in msg and "npz:PATH" in msg


@pytest.mark.parametrize("prefix", ["folder", "cifar10", "npz"])
def test_missing_path(tmp_path: Path, prefix):
    missing = tmp_path / "nope"

    msg = _load_error(f"{prefix}:{missing}", image_size=8)

    assert str(missing) in msg and "does not exist" in msg


@pytest.mark.parametrize("prefix", ["folder", "cifar10", "npz"])
def test_spec_without_path(prefix):
    msg = _load_error(f"{prefix}:")

    assert f"{prefix}:PATH" in msg


@pytest.mark.parametrize("channels", [0, 2, 4, True])
def test_bad_channels(channels):
    msg = _load_error("digits", channels=channels)

    assert "channels" in msg and "1" in msg and "3" in msg


@pytest.mark.parametrize("size", [0, -4, 2.5, True])
def test_bad_image_size(size):
    msg = _load_error("digits", image_size=size)

    assert "image_size" in msg


def test_module_does_not_import_torch(tmp_path: Path):
    # The package's __init__ may import torch (other trainer modules need it); this module must not add it.
    path = _npz(tmp_path, images=np.zeros((2, 4, 4), np.uint8))
    code = (
        "import sys, ddpm_deploy.trainer\n"
        "before = 'torch' in sys.modules\n"
        "from ddpm_deploy.trainer.data import load_dataset\n"
        f"load_dataset({'npz:' + str(path)!r})\n"
        "assert before or 'torch' not in sys.modules, 'trainer.data imported torch'\n"
    )

    subprocess.run([sys.executable, "-c", code], check=True)
