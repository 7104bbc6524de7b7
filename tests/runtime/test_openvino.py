"""The OpenVINO backend (issue 16): one runner file, picked by --backend openvino or a .xml file; parity with ONNX
Runtime at fp32 through the shipped host loop; the bf16 hint says what it really ran; NNCF int8 from ddpm-export."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from ddpm_deploy.runtime.backends.base import open_runner
from ddpm_deploy.runtime.contract import PrecisionReport
from ddpm_deploy.runtime.errors import ArtifactError
from ddpm_deploy.runtime.tolerances import L2_EPS_FP32_ATOL, L3_TRAJECTORY_FP32_ATOL, assert_close
from ddpm_deploy.verify.cli import main as run_cli

ov = pytest.importorskip("openvino", reason="OpenVINO is not installed (pip install '.[openvino]')")


@pytest.fixture()
def onnx_here(micro_onnx, tmp_path):
    path = tmp_path / "model.onnx"
    shutil.copy(micro_onnx, path)
    return path


def test_runner_matches_onnxruntime_at_fp32(micro_onnx, tmp_path):
    x = np.random.default_rng(0).standard_normal((3, 1, 8, 8)).astype(np.float32)
    t = np.array([0, 500, 999], np.int32)

    with open_runner(micro_onnx, "cpu", backend="openvino", threads=1, cache_dir=tmp_path / "cache") as r:
        got = r.eps(x, t)
        info = r.describe()
        card, shape = r.card, r.sample_shape
    want = open_runner(micro_onnx, "cpu", threads=1).eps(x, t)

    assert info["runner"] == "OpenVinoRunner" and info["precision"] == "fp32" and shape == (1, 8, 8)
    assert card is not None and card.data.image_size == 8
    assert_close("OpenVINO vs ONNX Runtime", got, want, L2_EPS_FP32_ATOL)
    assert any((tmp_path / "cache").iterdir())  # the compiled model was cached


def _conv_precisions(compiled) -> set[str]:
    """The runtime precision of every convolution in OpenVINO's execution graph (read here independently)."""
    out = set()
    for op in compiled.get_runtime_model().get_ordered_ops():
        rt = op.get_rt_info()
        if "layerType" in rt and rt["layerType"].astype(str) == "Convolution":
            out.add(rt["runtimePrecision"].astype(str))
    return out


@pytest.mark.parametrize("asked", ["fp32", "bf16"])
def test_precision_reported_is_what_the_execution_graph_ran(micro_onnx, asked, caplog):
    from ddpm_deploy.runtime.backends.openvino import cpu_supports_bf16

    with open_runner(micro_onnx, "cpu", backend="openvino", precision=asked, cache_dir=False) as r:
        reported, convs = r.precision, _conv_precisions(r.compiled)

    ran = {"bf16"} if asked == "bf16" and cpu_supports_bf16(ov.Core()) else {"f32"}
    assert convs == ran  # OpenVINO's own account of the convolutions
    assert reported == {"bf16": "bf16", "f32": "fp32"}[convs.pop()]
    assert ("no native bf16" in caplog.text) == (asked == "bf16" and reported == "fp32")


@pytest.mark.parametrize("value, bf16", [(ov.Type.bf16, True), (ov.Type.f32, False), ("bf16", True),
                                         ("f32", False), ("<Type: 'bfloat16'>", False)])
def test_hint_is_compared_as_a_type_not_as_its_text(value, bf16):
    from ddpm_deploy.runtime.backends.openvino import hint_is_bf16

    assert hint_is_bf16(value) is bf16


@pytest.mark.parametrize("counts, want", [({"bf16": 41, "f32": 2}, "bf16"), ({"f32": 59}, "fp32"),
                                          ({"f32": 50, "bf16": 9}, "fp32"), ({}, "fp32"), ({"bfloat16": 3}, "bf16")])
def test_precision_that_ran_counts_compute_layers(counts, want):
    """Both branches on any CPU: the verdict from the execution graph's counts (bf16 and AVX2-only machines)."""
    from ddpm_deploy.runtime.backends.openvino import precision_that_ran

    assert precision_that_ran(counts) == want


def test_sample_with_openvino_equals_onnxruntime(onnx_here, tmp_path):
    args = ["sample", "--onnx", str(onnx_here), "--num", "3", "--batch", "2", "--steps", "20", "--seed", "4",
            "--threads", "1", "--no-progress", "--no-pngs"]
    a = CliRunner().invoke(run_cli, [*args, "--out", str(tmp_path / "ort")])
    b = CliRunner().invoke(run_cli, [*args, "--backend", "openvino", "--out", str(tmp_path / "ov")])

    assert a.exit_code == 0 and b.exit_code == 0, a.output + b.output
    info = json.loads((tmp_path / "ov" / "run.json").read_text())
    assert (info["runner"], info["backend"], info["precision"]) == ("OpenVinoRunner", "openvino-cpu", "fp32")
    ia, ib = (np.load(tmp_path / d / "samples.npz")["images"].astype(int) for d in ("ort", "ov"))
    assert np.abs(ia - ib).max() <= 1  # fp32 vs fp32: at most a rounding boundary apart


def test_precision_options_are_checked(onnx_here, tmp_path):
    bf16_on_ort = CliRunner().invoke(run_cli, ["sample", "--onnx", str(onnx_here), "--precision", "bf16"])
    int8_missing = CliRunner().invoke(run_cli, ["sample", "--onnx", str(onnx_here), "--backend", "openvino",
                                                "--precision", "int8", "--out", str(tmp_path / "o")])

    assert bf16_on_ort.exit_code == 2 and "an OpenVINO option" in bf16_on_ort.output
    assert int8_missing.exit_code == 2 and "--int8" in int8_missing.output and "model.int8.xml" in int8_missing.output
    bad = tmp_path / "bad.xml"
    bad.write_text("<not a model/>")
    with pytest.raises(ArtifactError, match="OpenVINO cannot read this model"):
        open_runner(bad, "cpu")


def test_parity_levels_pass_with_the_openvino_runner(micro_run, micro_onnx, tmp_path):
    r = CliRunner().invoke(run_cli, ["parity", "--checkpoint", str(micro_run), "--onnx", str(micro_onnx),
                                     "--backend", "openvino", "--steps", "20", "--batch", "2", "--threads", "1",
                                     "--out", str(tmp_path)])

    assert r.exit_code == 0, r.output
    levels = {(lv["level"], lv["backend"]): lv for lv in json.loads((tmp_path / "parity.json").read_text())["levels"]}
    l2 = levels["L2 eps", "openvino-cpu (fp32)"]
    l3 = levels["L3 trajectory", "openvino-cpu (fp32) + host loop"]
    l4 = levels["L4 backend", "host loop, batch composition"]
    assert l2["status"] == "pass" and l2["runner"] == "OpenVinoRunner" and l2["max_abs"] <= L2_EPS_FP32_ATOL
    assert l3["status"] == "pass" and l3["runner"] == "OpenVinoRunner + HostLoop"
    assert l4["status"] == "pass" and l4["runner"] == "OpenVinoRunner + HostLoop"
    assert l3["max_abs"] <= L3_TRAJECTORY_FP32_ATOL


@pytest.mark.slow
def test_int8_export_then_sample(onnx_here, tmp_path):
    pytest.importorskip("nncf", reason="NNCF is not installed (pip install '.[int8]')")
    from ddpm_deploy.export.cli import main as export_cli

    r = CliRunner().invoke(export_cli, ["--onnx", str(onnx_here), "--int8", "--calib-dataset", "digits"])
    assert r.exit_code == 0, r.output
    xml = onnx_here.with_name("model.int8.xml")
    report = PrecisionReport.load(onnx_here.with_name("precision.int8.json"))
    assert xml.is_file() and xml.with_suffix(".bin").is_file() and report.precision == "int8"
    assert report.conversion["fake_quantize_nodes"] > 0 and len(report.error["buckets"]) == 10
    assert report.passed == (report.error["worst_rel_l2"] <= report.tolerance["value"])
    kept = report.conversion["conv_matmul"]["kept_float"]
    assert any("conv_in" in n for n in kept) and any("conv_out" in n for n in kept) and any("temb" in n for n in kept)
    # the element-wise ops stay float: no quantizer feeds an Add or a Multiply (the SiLU, the GroupNorm affine, the
    # residual sums), which NNCF's CPU configuration would quantize (10-16 % ε error at high t on the demo model)
    import openvino as ov

    fed = {(t.get_node().get_type_name()) for op in ov.Core().read_model(str(xml)).get_ordered_ops()
           if op.get_type_name() == "FakeQuantize" for t in op.output(0).get_target_inputs()}
    assert "Convolution" in fed and not fed & {"Add", "Multiply"}, fed

    s = CliRunner().invoke(run_cli, ["sample", "--onnx", str(onnx_here), "--backend", "openvino", "--precision", "int8",
                                     "--num", "2", "--steps", "10", "--no-progress", "--out", str(tmp_path / "s")])
    assert s.exit_code == 0, s.output
    info = json.loads((tmp_path / "s" / "run.json").read_text())
    assert info["precision"] == "int8" and info["model"].endswith("model.int8.xml")

    # int8-bf16: the same int8 model, the layers it keeps float run in bf16 where the CPU has it natively
    from ddpm_deploy.runtime.cpu import cpu_precisions

    b = CliRunner().invoke(run_cli, ["sample", "--onnx", str(onnx_here), "--backend", "openvino", "--precision",
                                     "int8-bf16", "--num", "2", "--steps", "10", "--no-progress", "--out",
                                     str(tmp_path / "b")])
    assert b.exit_code == 0, b.output
    info = json.loads((tmp_path / "b" / "run.json").read_text())
    assert info["model"].endswith("model.int8.xml")
    assert info["precision"] == ("int8+bf16" if cpu_precisions().native_bf16 else "int8")  # what ran, not the ask


# --- --precision auto ---------------------------------------------------------------------------------------------

def test_auto_precision_follows_the_cpu_flags(tmp_path):
    """auto picks OpenVINO bf16 only where bf16 is native (AVX512_BF16 or AMX-BF16) and says why; never int8."""
    from ddpm_deploy.runtime.backends.base import auto_precision

    onnx = tmp_path / "model.onnx"
    backend, precision, why = auto_precision(onnx, "cpu", None, flags=["avx2", "fma", "avx512_vnni"])
    assert (backend, precision) == (None, "fp32") and "no native bf16" in why
    for flags in (["avx2", "avx512_bf16"], ["amx_tile", "amx_bf16"]):
        backend, precision, why = auto_precision(onnx, "cpu", None, flags=flags)
        assert (backend, precision) == ("openvino", "bf16") and flags[1] in why
    assert auto_precision(onnx, "cuda", None, flags=["avx512_bf16"])[1] == "fp32"
    assert auto_precision(tmp_path / "model.int8.xml", "cpu", None, flags=["avx512_bf16"])[1] == "fp32"


def test_sample_precision_auto_records_what_ran_and_why(micro_onnx, tmp_path):
    """`ddpm-run sample --precision auto`: run.json's precision_choice says what was chosen and why, and the
    precision that ran (OpenVINO's own execution graph decides it) is the one run.json reports."""
    from click.testing import CliRunner

    from ddpm_deploy.runtime.contract import RunInfo
    from ddpm_deploy.runtime.cpu import cpu_precisions
    from ddpm_deploy.verify.cli import main

    r = CliRunner().invoke(main, ["sample", "--onnx", str(micro_onnx), "--precision", "auto", "--num", "2",
                                  "--batch", "2", "--steps", "3", "--out", str(tmp_path / "s"), "--no-progress"])
    assert r.exit_code == 0, r.output
    info = RunInfo.load(tmp_path / "s" / "run.json")
    c = info.precision_choice
    assert c["asked"] == "auto" and c["reason"] and c["ran"] == info.precision
    if cpu_precisions().native_bf16:
        assert c["backend"] == "openvino" and c["precision"] == "bf16" and info.backend == "openvino-cpu"
    else:
        assert c["precision"] == "fp32" and "no native bf16" in c["reason"]
    assert "--precision auto:" in r.output
