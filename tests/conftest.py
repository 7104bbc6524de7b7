"""Shared fixtures: tiny seeded models trained by the tests themselves (no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import train_run

os.environ.setdefault("DDPM_NO_PROGRESS", "1")


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
