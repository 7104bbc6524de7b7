"""L2 ε: the exported model in each installed backend vs the PyTorch model, t ∈ {0, 1, T/2, T−1}, several batches.

Backends are parametrised over what is installed: ONNX Runtime CPU always; ONNX Runtime CUDA, TensorRT and
TensorRT-RTX plans only with a GPU (each skips with the reason otherwise). The diffusers model at full
google/ddpm-cifar10-32 size is checked in test_diffusers_model.py.
"""

import numpy as np
import pytest
import torch

from ddpm_deploy.runtime.backends.base import open_runner
from ddpm_deploy.runtime.backends.ort import OrtRunner
from ddpm_deploy.runtime.tolerances import L2_EPS_FP32_ATOL, assert_close
from ddpm_deploy.verify.parity import gpu_status, level2, load_reference

BACKENDS = ["onnxruntime-cpu", "onnxruntime-cuda", "tensorrt", "tensorrt-rtx"]
BATCHES = (1, 2, 5)


def _ort_has_cuda() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def _plan_runner(flavour: str, onnx_path, tmp_path):
    """Build a plan of the flavour and open it with our TrtRunner (what ddpm-run ships), or skip saying why not."""
    engine = pytest.importorskip("ddpm_deploy.export.engine")
    from ddpm_deploy.runtime.errors import MissingDependencyError

    try:
        trt, _ = engine.load_tensorrt(flavour)
    except MissingDependencyError as e:
        pytest.skip(f"{flavour}: {e}")
    ok, why = gpu_status()
    if not ok:
        pytest.skip(f"{trt.__name__} {trt.__version__} is installed and builds plans here (tests/export/"
                    f"test_engine.py), but executing a plan needs an NVIDIA GPU: {why}")
    from ddpm_deploy.runtime.backends.base import open_runner
    from ddpm_deploy.runtime.errors import ArtifactError

    plan = tmp_path / "model.plan"
    engine.build_engine(onnx_path, plan, engine.EngineSettings(batch_min=1, batch_opt=2, batch_max=8, flavour=flavour))
    try:
        runner = open_runner(plan, "cuda", cuda_graph=False)
    except ArtifactError as e:
        if "this plan cannot run on" in str(e):  # e.g. TensorRT-RTX on an H100: refused by the compatibility check
            pytest.skip(str(e))
        raise
    return runner.eps


@pytest.fixture(params=BACKENDS)
def backend(request, micro_onnx, tmp_path):
    """ε function of one backend; skipped with the reason where the backend cannot run here."""
    name = request.param
    if name == "onnxruntime-cpu":
        return name, OrtRunner(micro_onnx, threads=1).eps
    if name == "onnxruntime-cuda":
        if not _ort_has_cuda():
            pytest.skip("onnxruntime has no CUDAExecutionProvider: install onnxruntime-gpu (instead of onnxruntime) "
                        "on a machine with an NVIDIA GPU")
        return name, open_runner(micro_onnx, "cuda", cuda_graph=False).eps
    return name, _plan_runner("rtx" if name == "tensorrt-rtx" else "tensorrt", micro_onnx, tmp_path)


@pytest.fixture(scope="module")
def reference(micro_run):
    return load_reference(micro_run)


def test_eps_matches_pytorch(backend, reference):
    name, eps = backend
    T = reference.card.diffusion.num_timesteps
    g = np.random.default_rng(0)

    for b in BATCHES:
        for t in (0, 1, T // 2, T - 1):
            x = g.standard_normal((b, 1, 8, 8)).astype(np.float32)
            tt = np.full(b, t, np.int32)
            with torch.no_grad():
                want = reference.model(torch.from_numpy(x), torch.from_numpy(tt)).numpy()
            assert_close(f"L2 {name} b={b} t={t}", eps(x, tt), want, L2_EPS_FP32_ATOL)


def test_mixed_timesteps_in_one_batch(reference, micro_onnx):
    x = np.random.default_rng(1).standard_normal((4, 1, 8, 8)).astype(np.float32)
    t = np.array([0, 1, 500, 999], np.int32)

    got = OrtRunner(micro_onnx, threads=1).eps(x, t)
    with torch.no_grad():
        want = reference.model(torch.from_numpy(x), torch.from_numpy(t)).numpy()

    assert_close("L2 mixed t", got, want, L2_EPS_FP32_ATOL)
    assert np.abs(got[0] - OrtRunner(micro_onnx).eps(x[:1], np.array([999], np.int32))[0]).max() > 1e-3  # t matters


def test_polygraphy_comparator_level(reference, micro_onnx):
    """`ddpm-run parity`'s L2: Polygraphy's Comparator runs ONNX Runtime and PyTorch side by side."""
    results = level2(reference, micro_onnx, (1, 3), seed=0, engine=None)

    ort_cpu = [r for r in results if r.backend.startswith("onnxruntime-cpu")][0]
    assert ort_cpu.status == "pass", [c.message() for c in ort_cpu.checks if not c.passed]
    pg = ort_cpu.metrics["polygraphy_comparator"]
    assert pg["iterations"] == len(ort_cpu.checks) == 2 * 14 and pg["iterations_matched"] == pg["iterations"]
    assert [b["t_range"][0] for b in ort_cpu.metrics["buckets"]] == list(range(0, 1000, 100))
    assert all(b["max_abs"] <= L2_EPS_FP32_ATOL for b in ort_cpu.metrics["buckets"])
    assert ort_cpu.runner == "OrtRunner"  # the shipped runner, not Polygraphy's own
    cuda = [r for r in results if r.backend.startswith("onnxruntime-cuda")]
    assert cuda[0].runner == "OrtCudaRunner"
    if not _ort_has_cuda():
        assert cuda[0].status == "skipped" and "CUDAExecutionProvider" in cuda[0].reason
