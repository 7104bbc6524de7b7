"""Real TensorRT-RTX builds of OUR exported graphs: fp32 and fp16 plans of `tiny`, and once ddpm-cifar10.
Every op of the exported graphs must be in the parser's supported-operator list."""

import json

import pytest

from ddpm_deploy.runtime.plan import read_plan_sidecar
from ddpm_deploy.verify.models import random_preset_onnx

pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT-RTX is not installed (pip install '.[trt-rtx]')")
pytestmark = pytest.mark.trt


def _export(preset: str, path):
    return random_preset_onnx(preset, path, dataset="digits")


def _build_and_check(onnx_path, plan, precision, io_dtype="float32"):
    from ddpm_deploy.export.engine import EngineSettings, build_engine, network_io, unsupported_ops

    settings = EngineSettings(batch_min=1, batch_opt=8, batch_max=32, flavour="rtx")
    assert unsupported_ops(onnx_path) == []
    io = network_io(onnx_path, settings)
    assert [i["name"] for i in io["inputs"]] == ["x", "t"] and [o["name"] for o in io["outputs"]] == ["eps"]
    assert [i["dtype"] for i in io["inputs"]] == [io_dtype, "int32"] and io["outputs"][0]["dtype"] == io_dtype
    side = build_engine(onnx_path, plan, settings)
    assert plan.stat().st_size > 0 and side.precision == precision
    assert side.profile == {"min": 1, "opt": 8, "max": 32}
    assert read_plan_sidecar(plan).plan["sha256"] == side.plan["sha256"]
    return side


@pytest.fixture(scope="module")
def tiny_fp32(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_engine")
    return _export("tiny", d / "model.onnx")


def test_tiny_fp32_plan(tiny_fp32, tmp_path):
    path, _ = tiny_fp32
    side = _build_and_check(path, tmp_path / "model.plan", "fp32")
    assert side.ddpm["data"]["image_size"] == 16


def test_tiny_fp16_plan_from_calibrated_onnx(tiny_fp32, tmp_path):
    pytest.importorskip("modelopt", reason="ModelOpt is not installed (pip install '.[fp16]')")
    from ddpm_deploy.export.fp16 import export_fp16

    path, card = tiny_fp32
    fp16, rep = export_fp16(path, tmp_path, card=card, dataset="digits")
    assert rep.passed
    side = _build_and_check(fp16, tmp_path / "model.fp16.plan", "fp16")
    assert side.onnx["path"] == "model.fp16.onnx"


@pytest.mark.slow
def test_cifar10_fp32_plan(tmp_path):
    path, _ = _export("ddpm-cifar10", tmp_path / "model.onnx")
    side = _build_and_check(path, tmp_path / "model.plan", "fp32")
    assert side.ddpm["data"] == {"channels": 3, "image_size": 32, "value_range": [-1.0, 1.0]}
    assert json.loads((tmp_path / "model.plan.json").read_text())["build"]["seconds"] > 0
