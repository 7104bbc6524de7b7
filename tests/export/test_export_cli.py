"""`ddpm-export --fp16 --engine` end to end on the CPU (TensorRT-RTX builds the plan), and the GPU-only
commands' clean refusals on a machine without a GPU."""

import json

import pytest
from click.testing import CliRunner

from ddpm_deploy.export.cli import main as export_cli
from ddpm_deploy.verify.cli import main as run_cli

rtx = pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT-RTX is not installed (pip install '.[trt-rtx]')")
pytest.importorskip("modelopt", reason="ModelOpt is not installed (pip install '.[fp16]')")


@pytest.fixture(scope="module")
def exported(micro_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli_export")
    r = CliRunner().invoke(export_cli, [str(micro_run), "--out", str(out), "--fp16", "--engine",
                                        "--batch-min", "1", "--batch-opt", "4", "--batch-max", "16"])
    assert r.exit_code == 0, r.output
    return out, r.output


@pytest.mark.trt
def test_fp16_engine_chain_writes_every_artifact(exported):
    out, output = exported
    for name in ("model.onnx", "export_report.json", "model.fp16.onnx", "precision.json", "model.plan",
                 "model.plan.json"):
        assert (out / name).is_file(), name
    side = json.loads((out / "model.plan.json").read_text())
    assert side["precision"] == "fp16" and side["onnx"]["path"] == "model.fp16.onnx"
    assert side["profile"] == {"min": 1, "opt": 4, "max": 16}
    assert side["trt"]["flavour"] == "rtx"
    prec = json.loads((out / "precision.json").read_text())
    assert prec["passed"] and prec["error"]["worst_rel_l2"] <= prec["tolerance"]["value"]
    assert "ε rel L2 vs fp32" in output and "model.plan" in output


@pytest.mark.trt
def test_info_engine_reports_sidecar_and_why_it_cannot_run_here(exported):
    out, _ = exported
    r = CliRunner().invoke(run_cli, ["info", "--engine", str(out / "model.plan")])
    assert "batch profile: min/opt/max = 1/4/16" in r.output
    # On a machine without a GPU the plan cannot run, and the command says so with a non-zero exit.
    import ctypes.util

    if ctypes.util.find_library("cuda") is None:
        assert r.exit_code == 1 and "runnable here: no" in r.output


def test_engine_sampling_without_gpu_is_a_clean_error(exported, tmp_path):
    import ctypes.util

    if ctypes.util.find_library("cuda") is not None:
        pytest.skip("this machine has a CUDA driver; the GPU tests cover sampling from a plan")
    out, _ = exported
    r = CliRunner().invoke(run_cli, ["sample", "--engine", str(out / "model.plan"), "--num", "2",
                                     "--out", str(tmp_path / "s")])
    assert r.exit_code == 2 and "libcuda" in r.output and "Traceback" not in r.output


def test_bad_profile_fails_before_export(micro_run, tmp_path):
    r = CliRunner().invoke(export_cli, [str(micro_run), "--out", str(tmp_path), "--engine", "--batch-min", "8",
                                        "--batch-opt", "4"])
    assert r.exit_code == 2 and "batch" in r.output
    assert not (tmp_path / "model.onnx").exists()
