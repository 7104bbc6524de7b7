"""Fixtures of the parity suite: one torch thread, a diffusers model in the google/ddpm-cifar10-32 layout."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Small models on a shared 2-core CPU: one PyTorch thread is ~100× faster than two busy-waiting ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_diffusers_dir(tmp_path_factory) -> Path:
    """google/ddpm-cifar10-32's block structure at a fraction of the width, flat layout, seeded weights."""
    from parity.google_ddpm import TINY_WIDTH, save_google_layout

    return save_google_layout(tmp_path_factory.mktemp("tiny_diffusers"), TINY_WIDTH)


@pytest.fixture(scope="session")
def tiny_diffusers_onnx(tiny_diffusers_dir, tmp_path_factory) -> Path:
    from ddpm_deploy.export.from_diffusers import export_diffusers

    path, _ = export_diffusers(tiny_diffusers_dir, tmp_path_factory.mktemp("tiny_diffusers_export"))
    return path
