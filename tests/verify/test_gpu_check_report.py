"""verify.gpu_check's CPU-runnable parts: the placement count (on ONNX Runtime's CPU provider) and the report
table, so that the GPU run (15 device minutes a session) cannot fail on formatting."""

from __future__ import annotations

import numpy as np
import pytest

from ddpm_deploy.verify import gpu_check


def test_placement_counts_the_shape_nodes_the_fixed_batch_folds(random_micro_onnx, tmp_path):
    pytest.importorskip("onnx")

    row = gpu_check.placement(random_micro_onnx, None, 4, tmp_path, "fp32", device="cpu")

    assert "error" not in row, row
    assert row["dynamic"]["shape_nodes"] > 0 and row["fixed"]["shape_nodes"] == 0, row
    assert row["dynamic"]["memcpy"] == row["fixed"]["memcpy"] == 0  # the CPU provider inserts none
    assert row["fixed"]["nodes"] < row["dynamic"]["nodes"]


def test_report_formats_every_kind_of_row():
    bench = [
        {"backend": "ORT CUDA fp16 placement", "dynamic": {"nodes": 363, "memcpy": 6, "shape_nodes": 37},
         "fixed": {"nodes": 286, "memcpy": 0, "shape_nodes": 0}},
        {"backend": "ORT CUDA fp32 graph", "load_s": 2.0, "eps_ms": 30.0, "step_ms": 30.2, "overhead": 0.007,
         "graph": "backend", "steps": 100, "eps_rel_l2": 0.0, "eps_reference": "ORT CUDA fp32 graph"},
        {"backend": "ORT CUDA fp16 graph", "load_s": 2.0, "eps_ms": 10.0, "step_ms": 10.2, "overhead": 0.02,
         "graph": "backend", "steps": 1000, "eps_rel_l2": 1.5e-3, "eps_reference": "ORT CUDA fp32 graph"},
        {"backend": "ORT CUDA fp16 no graph", "load_s": 2.0, "eps_ms": 10.0, "step_ms": 10.5, "overhead": 0.05,
         "graph": "off", "steps": 100},
        {"backend": "torch.compile fp16 autocast", "eps_ms": 15.0},
        {"backend": "ORT CUDA fp16 ε + step in our graph", "load_s": 2.0, "eps_ms": 10.0, "step_ms": 9.9,
         "overhead": -0.01, "graph": "captured", "steps": 100, "x0_graph_vs_plain_max_abs": 0.0,
         "capture_error": None},
        {"backend": "TensorRT fp16", "error": "ArtifactError: cannot run on NVIDIA H100"},
    ]
    tests = [{"test": "test_a", "outcome": "passed", "detail": "", "properties": {"max_abs": 1e-5}, "seconds": 1.0}]

    text = gpu_check.report({"name": "NVIDIA H100", "compute_capability": (9, 0)}, tests, bench, 256)

    assert "dynamic batch: 363 nodes, 6 Memcpy, 37 shape; fixed batch: 286 nodes, 0 Memcpy, 0 shape" in text
    assert "2.00% ok" in text and "5.00% >3%" in text
    assert "error: ArtifactError: cannot run on NVIDIA H100" in text and "max_abs=1e-05" in text
    assert "torch.compile fp16 autocast" in text and "15.00" in text
    assert "x0 after 100 steps, our graph vs plain runs (same session): max abs 0.00e+00" in text
    assert "1.5e-03" in text and "(ε rel L2: vs ORT CUDA fp32 graph, the same x" in text


def test_ort_unet_fusions_make_the_cuda_ops_and_keep_our_io(random_micro_onnx, tmp_path):
    """The fused model only runs on the CUDA provider (GroupNorm, NhwcConv): here its structure and I/O."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime.transformers.optimizer")
    import collections

    out = gpu_check.ort_unet_fusions(random_micro_onnx, tmp_path / "fused16.onnx")

    model = onnx.load(str(out))
    ops = collections.Counter(n.op_type for n in model.graph.node)
    assert ops["NhwcConv"] > 0 and ops["GroupNorm"] + ops["SkipGroupNorm"] > 0 and ops["Conv"] == 0, dict(ops)
    assert ops["InstanceNormalization"] == 0, dict(ops)
    io = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]}
    assert io == {"x": onnx.TensorProto.FLOAT, "t": onnx.TensorProto.INT32, "eps": onnx.TensorProto.FLOAT}
    dtypes = collections.Counter(i.data_type for i in model.graph.initializer)
    assert dtypes[onnx.TensorProto.FLOAT16] > dtypes[onnx.TensorProto.FLOAT], dtypes  # fp16 inside
    assert {p.key: p.value for p in model.metadata_props}.get("ddpm_deploy.precision") == "fp16"
    assert not list(tmp_path.glob("*.tmp"))


def test_eps_errors_compare_every_stored_row_with_the_fp32_graph_row():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=1000).astype(np.float32)
    rows = [{"backend": gpu_check.REFERENCE_ROW}, {"backend": "ORT CUDA fp16 graph"}, {"backend": "torch eager fp32"}]
    store = {gpu_check.REFERENCE_ROW: ref, "ORT CUDA fp16 graph": ref + 0.01 * rng.normal(size=1000).astype(np.float32)}

    gpu_check.add_eps_errors(rows, store)

    assert rows[0]["eps_rel_l2"] == 0.0 and 0.005 < rows[1]["eps_rel_l2"] < 0.02
    assert "eps_rel_l2" not in rows[2]  # stored nothing: no number
    assert rows[1]["eps_reference"] == gpu_check.REFERENCE_ROW


def test_gpu_check_main_runs_every_row_on_the_stand_ins(tmp_path, monkeypatch):
    """The whole benchmark of scripts/gpu_check.sh, end to end, on stand-ins (no GPU here): the host stand-in
    driver (kernels built by the C++ compiler) as the GPU, ONNX Runtime's CPU provider as the CUDA provider, and a
    small 3x32x32 UNet as ddpm-cifar10. What it proves: every row runs or fails into its own error row, the
    outputs are written, and main() returns — so the one GPU run is not lost to a bug in this script."""
    pytest.importorskip("torch")
    pytest.importorskip("onnx")
    import json

    import hostsim

    from ddpm_deploy.runtime.backends import ort_cuda
    from ddpm_deploy.runtime.device import kernels
    from ddpm_deploy.trainer.config import UNetConfig
    from ddpm_deploy.verify.models import random_unet_onnx

    try:
        kernels.nvrtc_version()
    except Exception as e:
        pytest.skip(f"NVRTC is not available: {e}")
    if hostsim.host_compiler() is None:
        pytest.skip("no host C++ compiler for the host build of the kernels")

    class OnCpuProvider(ort_cuda.OrtCudaRunner):
        ort_device = "cpu"

    small = UNetConfig(image_size=32, in_channels=3, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,),
                       dropout=0.0, norm_groups=4)

    def export_preset(out, half):
        return random_unet_onnx(small, out / "small.onnx")[0]

    monkeypatch.setattr(ort_cuda, "OrtCudaRunner", OnCpuProvider)
    monkeypatch.setattr(gpu_check, "export_preset", export_preset)
    out, work, calibrated = tmp_path / "out", tmp_path / "work", tmp_path / "calibrated"
    calibrated.mkdir()  # what prepare_calibrated sends, here the fp32 model itself (ModelOpt is the slow part)
    small_onnx = export_preset(work, False)
    (calibrated / gpu_check.CALIBRATED_NAME).write_bytes(small_onnx.read_bytes())
    (calibrated / "manifest.json").write_text(json.dumps({"fp32_weights_sha256": gpu_check.weights_digest(small_onnx),
                                                          "eps_rel_l2_max_cpu": 1e-3}))
    with hostsim.HostDriver.installed(hostsim.LINEAR_EPS_SOURCE, hostsim.LINEAR_EPS_SIGNATURES):
        code = gpu_check.main(["--out", str(out), "--work", str(work), "--batch", "2", "--steps", "3",
                               "--short-steps", "2", "--calibrated", str(calibrated)])

    assert code == 0
    rows = {r["backend"]: r for r in json.loads((out / "gpu_check.json").read_text())["results"]}
    ran = [k for k, r in rows.items() if "error" not in r]
    for prec, variants in gpu_check.ORT_VARIANTS.items():
        for label, _ in variants:
            assert f"ORT CUDA {prec} {label}" in ran, rows.get(f"ORT CUDA {prec} {label}")
    assert rows["ORT CUDA fp16 ε + step in our graph"]["x0_graph_vs_plain_max_abs"] == 0.0
    assert rows[gpu_check.REFERENCE_ROW]["eps_rel_l2"] == 0.0
    cal = rows["ORT CUDA calibrated fp16 graph"]
    assert cal["same_weights_as_fp32_rows"] is True and cal["eps_rel_l2"] == 0.0  # the same model, here
    assert all(r["steps"] in (2, 3) and r["eps_ms"] > 0 for k, r in rows.items() if k in ran)
    # what needs the CUDA provider fails into its own row, with the reason
    assert "CUDAExecutionProvider" in rows["ORT CUDA fp32 placement"]["error"]
    assert "error" in rows["ORT CUDA fp16 graph, ORT unet fusions"]
    assert "ORT CUDA fp32 graph" in (out / "gpu_check.txt").read_text()


def test_bench_torch_rows_on_the_cpu(one_torch_thread):
    """bench_torch's code on the CPU (host clock): the ε row and the diffusers-style loop of 2 steps; and on a
    torch without CUDA the GPU rows fail into an error row each instead of stopping the benchmark."""
    torch = pytest.importorskip("torch")
    rows: list = []

    for half in (False, True):  # fp16 throughout (the time embedding too): a dtype mix would fail the row
        gpu_check.bench_torch(rows, batch=1, half=half, compile_=False, steps=2, device="cpu", preset="tiny")
    if not torch.cuda.is_available():
        gpu_check.bench_torch(rows, batch=1, half=True, steps=2)

    for row, label in zip(rows, ("torch eager fp32", "torch eager fp16 (.half())")):
        assert row["backend"] == label and "error" not in row, row
        assert row["steps"] == 2 and row["eps_ms"] > 0 and row["step_ms"] > 0
    if not torch.cuda.is_available():
        assert rows[2]["backend"] == "torch fp16 (.half())" and "error" in rows[2]
