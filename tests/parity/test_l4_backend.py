"""L4 backend: GPU kernels and engines vs the CPU reference (NumPy step and RNG, ONNX Runtime CPU).

On a machine without an NVIDIA GPU the GPU comparisons skip with the reason. What is checkable on the CPU is
checked here: respaced schedules are self-consistent, the host loop's images do not depend on the batch
composition or the shard (the property the GPU loop must also have), and the noise is bitwise independent of
the batch.
"""

import numpy as np
import pytest

from ddpm_deploy.runtime import rng
from ddpm_deploy.runtime.backends.base import open_runner
from ddpm_deploy.runtime.backends.ort import OrtRunner
from ddpm_deploy.runtime.sampling.config import plan_for
from ddpm_deploy.runtime.sampling.host import sample
from ddpm_deploy.runtime.schedule import DiffusionConfig, Schedule, respaced_timesteps
from ddpm_deploy.runtime.tolerances import (L0_FLOAT64_RTOL, L2_EPS_FP32_ATOL, L3_TRAJECTORY_FP32_ATOL,
                                            assert_close)
from ddpm_deploy.verify.parity import compare_rel, gpu_status, level4, load_reference

GPU, GPU_WHY = gpu_status()
needs_gpu = pytest.mark.skipif(not GPU, reason=f"L4 compares GPU backends with the CPU: {GPU_WHY}")


# --- GPU vs CPU ---------------------------------------------------------------------------------------------

@pytest.mark.gpu
@needs_gpu
def test_onnxruntime_cuda_matches_cpu(micro_onnx):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("a GPU is present but onnxruntime has no CUDAExecutionProvider: install onnxruntime-gpu")
    x = np.random.default_rng(0).standard_normal((4, 1, 8, 8)).astype(np.float32)
    t = np.array([0, 1, 500, 999], np.int32)

    with open_runner(micro_onnx, "cuda", cuda_graph=False) as cuda:
        assert cuda.session.get_providers()[0] == "CUDAExecutionProvider"  # not a silent CPU fallback
        assert_close("ORT CUDA vs CPU", cuda.eps(x, t), OrtRunner(micro_onnx).eps(x, t), L2_EPS_FP32_ATOL)


@pytest.mark.gpu
@needs_gpu
def test_parity_level4_runs_the_device_loop_on_the_gpu(micro_run, micro_onnx):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("a GPU is present but onnxruntime has no CUDAExecutionProvider: install onnxruntime-gpu")
    results = level4(load_reference(micro_run), micro_onnx, None, 20, 3, seed=0, threads=1, device="cuda")

    dev = [r for r in results if r.backend.startswith("device loop")][0]
    assert dev.runner == "OrtCudaRunner + DeviceLoop" and dev.status == "pass", dev.to_dict()
    assert dev.checks and dev.checks[0].max_abs <= L3_TRAJECTORY_FP32_ATOL


@pytest.mark.gpu
@needs_gpu
def test_the_cli_samples_and_checks_parity_on_the_gpu(micro_run, micro_onnx, tmp_path):
    """What a user types, end to end on the GPU: `ddpm-run sample --device cuda` gives the images of the CPU job
    (same seed and indices, within the trajectory tolerance), and `ddpm-run parity --device cuda` passes with the
    device loop run (not skipped)."""
    import json

    import onnxruntime as ort
    from click.testing import CliRunner

    from ddpm_deploy.verify.cli import main

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("a GPU is present but onnxruntime has no CUDAExecutionProvider: install onnxruntime-gpu")
    pytest.importorskip("polygraphy", reason="ddpm-run parity compares with Polygraphy's Comparator")
    cli = CliRunner()
    job = ["sample", "--onnx", str(micro_onnx), "--num", "6", "--batch", "4", "--steps", "20", "--seed", "3",
           "--no-progress"]
    gpu = cli.invoke(main, [*job, "--device", "cuda", "--out", str(tmp_path / "gpu")])
    cpu = cli.invoke(main, [*job, "--device", "cpu", "--out", str(tmp_path / "cpu")])
    assert gpu.exit_code == 0 and cpu.exit_code == 0, (gpu.output, cpu.output)
    a, b = (np.load(tmp_path / d / "samples.npz")["images"].astype(int) for d in ("gpu", "cpu"))
    assert a.shape == b.shape == (6, 8, 8, 1) and np.abs(a - b).max() <= 1  # uint8 images: one level at most

    r = cli.invoke(main, ["parity", "--checkpoint", str(micro_run), "--onnx", str(micro_onnx), "--device", "cuda",
                          "--steps", "20", "--out", str(tmp_path / "parity")])
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "parity" / "parity.json").read_text())
    device = [lv for lv in report["levels"] if str(lv.get("backend", "")).startswith("device loop")]
    assert device and device[0]["status"] == "pass", device


def test_parity_level4_device_loop_without_a_gpu_is_reported_not_run(micro_run, micro_onnx):
    import onnxruntime as ort

    if GPU and "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine runs the device loop; the not-run path is for machines that cannot")
    ref = load_reference(micro_run)
    on_cpu = level4(ref, micro_onnx, None, 20, 3, seed=0, threads=1)
    on_cuda = level4(ref, micro_onnx, None, 20, 3, seed=0, threads=1, device="cuda")

    assert [r.status for r in on_cpu if r.backend.startswith("device loop")] == ["skipped"]
    [dev] = [r for r in on_cuda if r.backend.startswith("device loop")]
    assert dev.status in ("skipped", "not run") and dev.runner == "OrtCudaRunner" and dev.reason
    cpu = [r for r in on_cuda if r.backend.startswith("host loop")][0]
    assert cpu.status == "pass" and cpu.metrics["steps"] == 20 and cpu.runner == "OrtRunner + HostLoop"


# --- CPU-checkable: respacing ---------------------------------------------------------------------------------

@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_full_length_respacing_is_the_plain_schedule(schedule):
    cfg = DiffusionConfig(schedule=schedule)
    a, b = plan_for(cfg, "ddpm"), plan_for(cfg, "ddpm", cfg.num_timesteps)

    assert np.array_equal(a.timesteps, b.timesteps) and np.array_equal(a.table32, b.table32)


@pytest.mark.parametrize("steps", [2, 7, 50, 250, 999])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_respaced_schedule_is_self_consistent(schedule, steps):
    cfg = DiffusionConfig(schedule=schedule)
    base, sched = Schedule(cfg), Schedule(cfg, steps=steps)
    ts = sched.timesteps

    assert len(ts) == steps and ts[0] == 0 and ts[-1] == cfg.num_timesteps - 1 and np.all(np.diff(ts) > 0)
    assert np.array_equal(ts, respaced_timesteps(cfg.num_timesteps, steps))
    # Π over kept steps of (1 − β_respaced) reproduces ᾱ at the kept steps (improved DDPM eq. 19); each factor
    # 1 − β' undoes the cancellation β' = 1 − ᾱ_t/ᾱ_prev: condition Σ_s max(1, β'_s/(1 − β'_s))
    cond = np.cumsum(np.maximum(1.0, sched.betas / (1 - sched.betas)))
    c = compare_rel("Π(1 − β')", np.cumprod(1 - sched.betas), base.alphas_cumprod[ts], L0_FLOAT64_RTOL, cond)
    assert c.passed, c.message()
    assert sched.sigmas[0] == 0 and np.all(sched.sigmas[1:] > 0)


# --- CPU-checkable: the host loop does not depend on batch or shard -------------------------------------------

def test_noise_is_bitwise_independent_of_the_batch():
    together = rng.normals(5, np.arange(6), 123, (1, 8, 8))
    apart = np.concatenate([rng.normals(5, [i], 123, (1, 8, 8)) for i in (0, 1, 2, 3, 4, 5)])
    shuffled = rng.normals(5, [4, 1], 123, (1, 8, 8))

    assert np.array_equal(together, apart)
    assert np.array_equal(shuffled, together[[4, 1]])


def test_host_loop_images_do_not_depend_on_batch_size_or_shard(micro_onnx):
    runner = OrtRunner(micro_onnx, threads=1)
    sched = plan_for(DiffusionConfig(), "ddpm", 20)
    shape = (1, 8, 8)

    whole = sample(runner, sched, shape, seed=3, indices=np.arange(5))
    split = np.concatenate([sample(runner, sched, shape, 3, [0, 1]), sample(runner, sched, shape, 3, [2, 3, 4])])
    shard = sample(runner, sched, shape, 3, [3, 4])  # a second process starting at index 3
    single = np.concatenate([sample(runner, sched, shape, 3, [i]) for i in range(5)])

    assert_close("batch 5 vs 2+3", whole, split, L3_TRAJECTORY_FP32_ATOL)
    assert_close("batch 5 vs shard [3, 4]", whole[3:], shard, L3_TRAJECTORY_FP32_ATOL)
    assert_close("batch 5 vs one by one", whole, single, L3_TRAJECTORY_FP32_ATOL)
    assert np.abs(whole[0] - whole[1]).max() > 0.1  # different samples really differ
