"""ONNX export: I/O contract, metadata, verification against PyTorch, both presets, CLI errors."""

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from ddpm_deploy.export.cli import main as export_cli
from ddpm_deploy.export.onnx_export import FP32_EXPORT_ATOL, read_card, save_onnx, verify
from ddpm_deploy.runtime.backends.ort import OrtRunner
from ddpm_deploy.runtime.schedule import DiffusionConfig
from ddpm_deploy.verify.models import random_preset_model, random_preset_onnx


def test_exported_model_contract(micro_onnx):
    m = onnx.load(str(micro_onnx))
    assert [i.name for i in m.graph.input] == ["x", "t"]
    assert [o.name for o in m.graph.output] == ["eps"]
    x, t = m.graph.input
    assert x.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert t.type.tensor_type.elem_type == onnx.TensorProto.INT32
    assert x.type.tensor_type.shape.dim[0].dim_param == "batch"
    assert [d.dim_value for d in x.type.tensor_type.shape.dim[1:]] == [1, 8, 8]
    assert max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) >= 17
    onnx.checker.check_model(m, full_check=True)
    card = read_card(m)
    assert card.diffusion == DiffusionConfig() and card.data.image_size == 8
    report = json.loads((micro_onnx.parent / "export_report.json").read_text())
    assert report["verify_fp32"]["passed"] and report["verify_fp32"]["max_abs"] <= FP32_EXPORT_ATOL
    assert {c["t"] for c in report["verify_fp32"]["cases"]} == {0, 1, 500, 999}
    assert {c["batch"] for c in report["verify_fp32"]["cases"]} == {1, 3}


def test_dynamic_batch_runs_in_onnxruntime(micro_onnx):
    r = OrtRunner(micro_onnx)
    for b in (1, 5, 17):
        out = r.eps(np.zeros((b, 1, 8, 8), np.float32), np.zeros(b, np.int32))
        assert out.shape == (b, 1, 8, 8)


def test_raw_and_ema_exports_differ(micro_run, tmp_path):
    r1 = CliRunner().invoke(export_cli, [str(micro_run), "--out", str(tmp_path / "ema")])
    r2 = CliRunner().invoke(export_cli, [str(micro_run), "--out", str(tmp_path / "raw"), "--raw"])
    assert r1.exit_code == 0 and r2.exit_code == 0, r1.output + r2.output
    x = np.random.default_rng(0).standard_normal((2, 1, 8, 8)).astype(np.float32)
    t = np.array([10, 900], np.int32)
    a = OrtRunner(tmp_path / "ema" / "model.onnx").eps(x, t)
    b = OrtRunner(tmp_path / "raw" / "model.onnx").eps(x, t)
    assert np.abs(a - b).max() > 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["tiny", "ddpm-cifar10"])
def test_presets_export_and_verify_at_full_size(preset, tmp_path):
    model, cfg = random_preset_model(preset)
    path, card = random_preset_onnx(preset, tmp_path / "m.onnx")
    rep = verify(path, model, card)
    assert rep.passed, rep.to_dict()
    assert rep.max_abs > 0  # a real comparison of non-zero outputs


def test_verify_catches_a_perturbed_weight(micro_run, micro_onnx, tmp_path):
    from ddpm_deploy.trainer.checkpoint import load_model

    model, card, _ = load_model(micro_run)
    m = onnx.load(str(micro_onnx))
    init = max(m.graph.initializer, key=lambda i: np.prod(i.dims))
    arr = onnx.numpy_helper.to_array(init).copy()
    arr.flat[0] += 0.5
    init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
    bad = save_onnx(m, tmp_path / "bad.onnx")
    rep = verify(bad, model, card)
    assert not rep.passed and rep.max_abs > FP32_EXPORT_ATOL


def test_export_cli_missing_run_dir_is_clean(tmp_path):
    r = CliRunner().invoke(export_cli, [str(tmp_path / "nope")])
    assert r.exit_code == 2 and "run directory not found" in r.output


def test_export_cli_corrupt_weights_is_clean(micro_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(micro_run, run)
    (run / "weights.safetensors").write_bytes(b"garbage")
    r = CliRunner().invoke(export_cli, [str(run)])
    assert r.exit_code == 2 and "weights.safetensors" in r.output and "Traceback" not in r.output
