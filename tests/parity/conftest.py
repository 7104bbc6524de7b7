"""Fixtures of the parity suite: one torch thread, a diffusers model in the google/ddpm-cifar10-32 layout."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")


@pytest.fixture(autouse=True, scope="module")
def _torch_threads(one_torch_thread):
    """Every parity module runs with one PyTorch thread (tests/conftest.py)."""


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
