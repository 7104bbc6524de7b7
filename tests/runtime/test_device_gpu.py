"""The GPU runtime on a real NVIDIA GPU (marker ``gpu``; skipped where cuda-python, the driver or a GPU is
missing). Run by scripts/gpu_check.sh. Level L4 of the parity suite: GPU kernels and engines vs the NumPy
step and RNG and ONNX Runtime on the CPU.
"""

from __future__ import annotations

import numpy as np
import pytest

from ddpm_deploy.runtime import rng
from ddpm_deploy.runtime.errors import ConfigError, DDPMError, MissingDependencyError
from ddpm_deploy.runtime.imageio import to_uint8
from ddpm_deploy.runtime.sampling.config import plan_for
from ddpm_deploy.runtime.sampling.host import sample as host_sample
from ddpm_deploy.runtime.schedule import DiffusionConfig
from helpers import STEP_PLANS, Bound, check_step_kernel
from ddpm_deploy.runtime.tolerances import (L2_EPS_FP32_ATOL, L3_TRAJECTORY_FP32_ATOL, L4_STEP_RTOL,
                                            UINT8_DIFFERING_FRACTION, assert_close)

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def gpu():
    from ddpm_deploy.runtime.device.cuda import GpuContext

    try:
        ctx = GpuContext(0)
    except DDPMError as e:  # NoDeviceError, MissingDependencyError: say which
        pytest.skip(f"no usable GPU: {e}")
    yield ctx
    ctx.close()


@pytest.fixture(scope="module")
def kernels_module(gpu):
    from ddpm_deploy.runtime.device import cuda, kernels

    target = kernels.select_target(gpu.props.compute_capability, kernels.supported_archs())
    compiled = kernels.compile_kernels(target)
    module = cuda.Module(compiled.image, kernels.SIGNATURES)
    yield module, compiled
    module.close()


def _ulps(a, b):
    ia = np.asarray(a, np.float32).view(np.int32).astype(np.int64)
    ib = np.asarray(b, np.float32).view(np.int32).astype(np.int64)
    return np.abs(np.where(ia < 0, -(2**31) - ia, ia) - np.where(ib < 0, -(2**31) - ib, ib))


def _upload(gpu, array, dtype):
    from ddpm_deploy.runtime.device.cuda import DeviceArray

    host = np.ascontiguousarray(array, dtype=dtype).reshape(-1)
    dev = DeviceArray(host.size, dtype)
    dev.upload(host, gpu.stream)
    return dev


def test_kernels_compile_and_load_for_this_gpu(gpu, kernels_module, record_property):
    _, compiled = kernels_module

    assert compiled.log == ""
    record_property("gpu", gpu.props.to_dict())
    record_property("kernel_target", compiled.target)


CASES = [(0, [0, 1, 2, 255], 999, 3 * 32 * 32), (2**64 - 1, [2**32 - 1, 7], 0, 13),
         (123456789, [5, 6], rng.INITIAL_STEP, 3 * 32 * 32)]


@pytest.mark.parametrize("seed, idx, step, n", CASES)
def test_philox_words_bitwise_equal_to_numpy(gpu, kernels_module, seed, idx, step, n):
    from ddpm_deploy.runtime.device.cuda import DeviceArray

    module, _ = kernels_module
    nb = -(-n // 4)
    out = DeviceArray(len(idx) * nb * 4, np.uint32)
    d_idx, d_key = _upload(gpu, idx, np.uint32), _upload(gpu, list(rng.key_from_seed(seed)) * len(idx), np.uint32)
    module.launch("ddpm_philox_words", (-(-nb // 256), len(idx), 1), (256, 1, 1),
                  (out.address, d_idx.address, d_key.address, step, nb), gpu.stream)

    got = out.download(np.empty((len(idx), nb * 4), np.uint32), gpu.stream)

    np.testing.assert_array_equal(got, rng.uniform_words(seed, idx, step, n))
    for arr in (out, d_idx, d_key):
        arr.close()


@pytest.mark.parametrize("seed, idx, step, n", CASES)
def test_normals_within_two_ulp_of_numpy(gpu, kernels_module, seed, idx, step, n, record_property):
    from ddpm_deploy.runtime.device.cuda import DeviceArray

    module, _ = kernels_module
    nb = -(-n // 4)
    out = DeviceArray(len(idx) * n, np.float32)
    d_idx, d_key = _upload(gpu, idx, np.uint32), _upload(gpu, list(rng.key_from_seed(seed)) * len(idx), np.uint32)
    d_mask = _upload(gpu, [1] * len(idx), np.int32)
    module.launch("ddpm_normals", (-(-nb // 256), len(idx), 1), (256, 1, 1),
                  (out.address, d_idx.address, d_key.address, d_mask.address, step, n, nb), gpu.stream)

    got = out.download(np.empty((len(idx), n), np.float32), gpu.stream)

    ulps = _ulps(got, rng.normals(seed, idx, step, n))
    record_property("normals", {"max_ulp": int(ulps.max()), "not_bitwise": int((ulps > 0).sum()), "n": int(ulps.size)})
    assert ulps.max() <= 2
    for arr in (out, d_idx, d_key, d_mask):
        arr.close()


def _linear_sampler(gpu, sched, shape, max_batch, **kw):
    from ddpm_deploy.runtime.device.loop import DeviceLoop
    from hostsim import LinearEpsBackend

    backend = LinearEpsBackend(gpu, shape, **{k: kw.pop(k) for k in ("nan_t", "capture", "inf") if k in kw})
    return backend, Bound(DeviceLoop(backend, shape, max_batch, gpu, **kw), sched)


@pytest.mark.parametrize("name, steps, options", STEP_PLANS)
def test_step_kernel_of_every_scheduler_matches_the_numpy_rule(gpu, name, steps, options):
    """The fused step kernel of every scheduler vs its NumPy step, on the GPU (3×32×32 samples)."""
    check_step_kernel(gpu, name, steps, options, shape=(3, 32, 32))


def test_device_loop_any_batch_size_and_a_partial_last_batch(gpu):
    """Batches of 8 then 3 on one sampler (the captured graph is re-captured for 3): every image equals the one
    from a batch of 1 and from the host loop, whatever batch produced it."""
    sched, shape = plan_for(DiffusionConfig(), "ddpm", 50), (1, 8, 8)
    backend, s = _linear_sampler(gpu, sched, shape, 8, cuda_graph=True)
    with s:
        full, t_full = s.sample(11, range(8))
        part, t_part = s.sample(11, range(8, 11))
        one, _ = s.sample(11, [9])

    want = host_sample(backend, sched, shape, 11, range(11))

    assert t_full.graph == t_part.graph == "captured"
    np.testing.assert_array_equal(part[1], one[0])  # index 9 alone == index 9 in a batch of 3
    assert_close("device loop, batches 8 + 3 vs host loop", np.concatenate([full, part]), want, L4_STEP_RTOL * 10)


def test_device_loop_reports_nan(gpu):
    from ddpm_deploy.runtime.errors import SamplingError

    sched = plan_for(DiffusionConfig(), "ddpm", 10)
    _, s = _linear_sampler(gpu, sched, (1, 8, 8), 2, nan_t=int(sched.timesteps[3]))
    with s, pytest.raises(SamplingError, match=f"t={int(sched.timesteps[3])}"):
        s.sample(0, [0, 1])


def test_device_loop_reports_an_infinite_eps_that_clipping_hides(gpu):
    """ε = +Inf is clipped into a finite x (all-black images): the step kernel must flag ε itself."""
    from ddpm_deploy.runtime.errors import SamplingError

    sched = plan_for(DiffusionConfig(), "ddpm", 10)
    _, s = _linear_sampler(gpu, sched, (1, 8, 8), 2, nan_t=int(sched.timesteps[3]), inf=True)
    with s, pytest.raises(SamplingError, match=f"t={int(sched.timesteps[3])}"):
        s.sample(0, [0, 1])


# --- ONNX Runtime CUDA -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ort_cuda():
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip(f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (install onnxruntime-gpu)")
    return ort


@pytest.mark.parametrize("graph", [True, False])
def test_two_device_loops_on_one_ort_cuda_runner_called_a_b_a(gpu, ort_cuda, request, graph):
    """Two loops over one ORT CUDA runner at one batch size (the old per-steps loops of the Triton model and the
    API), called A, B, A, with and without graphs: A's images equal the host loop's every time."""
    micro_onnx = request.getfixturevalue("random_micro_onnx")
    from ddpm_deploy.runtime.backends.ort import OrtRunner
    from ddpm_deploy.runtime.backends.ort_cuda import OrtCudaRunner
    from ddpm_deploy.runtime.device.loop import DeviceLoop

    cpu = OrtRunner(micro_onnx)
    shape, idx = cpu.sample_shape, [0, 1, 2, 3]
    a_plan, b_plan = plan_for(cpu.card.diffusion, "ddpm", 20), plan_for(cpu.card.diffusion, "dpmsolver++", 10)
    with OrtCudaRunner(micro_onnx, gpu, cuda_graph=graph, conv_algo_search="HEURISTIC") as runner, \
            DeviceLoop(runner, shape, 4, gpu, cuda_graph=graph) as a, DeviceLoop(runner, shape, 4, gpu, cuda_graph=graph) as b:
        first, _ = a.sample(a_plan, 5, idx)
        other, _ = b.sample(b_plan, 6, idx)
        again, _ = a.sample(a_plan, 5, idx)

    np.testing.assert_array_equal(again, first)
    assert_close("A vs host loop", again, host_sample(cpu, a_plan, shape, 5, idx), L3_TRAJECTORY_FP32_ATOL)
    assert_close("B vs host loop", other, host_sample(cpu, b_plan, shape, 6, idx), L3_TRAJECTORY_FP32_ATOL)


def test_ort_cuda_trajectory_matches_cpu_runtime(gpu, ort_cuda, request, record_property):
    micro_onnx = request.getfixturevalue("random_micro_onnx")  # only once the GPU is known to be there
    from ddpm_deploy.runtime.backends.ort import OrtRunner
    from ddpm_deploy.runtime.backends.ort_cuda import OrtCudaRunner
    from ddpm_deploy.runtime.device.loop import DeviceLoop

    cpu = OrtRunner(micro_onnx)
    card = cpu.card
    shape = (card.data.channels, card.data.image_size, card.data.image_size)
    sched, idx = plan_for(card.diffusion, "ddpm"), [0, 1, 2, 3]
    results = {}
    for graph in (True, False):
        backend = OrtCudaRunner(micro_onnx, gpu, cuda_graph=graph, conv_algo_search="HEURISTIC")
        assert backend.session.get_providers()[0] == "CUDAExecutionProvider"  # not a silent CPU fallback
        with backend, Bound(DeviceLoop(backend, shape, 4, gpu, cuda_graph=graph), sched) as s:
            results[graph] = s.sample(9, idx)
            results[f"uses_graphs_{graph}"] = backend.uses_graphs
            if graph:  # a partial last batch: a session (and ORT graph) of its own for batch 3
                results["partial"] = s.sample(9, idx[:3])[0]
                results["graph_error"] = backend.graph_error

    want = host_sample(cpu, sched, shape, 9, idx)

    x = results[True][0]
    np.testing.assert_array_equal(x, results[False][0])  # ORT's CUDA graph vs plain runs
    c = assert_close("ORT CUDA loop vs ORT CPU loop", x, want, L3_TRAJECTORY_FP32_ATOL)
    diff = np.abs(to_uint8(x).astype(int) - to_uint8(want).astype(int))
    record_property("ort_cuda", {"max_abs": c.max_abs, "uint8_max_diff": int(diff.max()),
                                 "uint8_pixels_differing": float((diff > 0).mean()),
                                 "ort_graphs": results["uses_graphs_True"],
                                 "graph_error": results["graph_error"],
                                 "step_ms": results[True][1].summary()["step_ms_median"]})
    assert diff.max() <= 1 and (diff > 0).sum() <= max(1, UINT8_DIFFERING_FRACTION * diff.size)
    assert_close("ORT CUDA, partial batch of 3 vs the same images at batch 4", results["partial"], x[:3],
                 L3_TRAJECTORY_FP32_ATOL)
    # with the batch fixed per session nothing is left on the CPU, so ORT's own CUDA graphs are on
    assert results["uses_graphs_True"] and not results["uses_graphs_False"], results["graph_error"]


def test_ort_cuda_batch_fixed_session_has_no_memcpy_nodes(gpu, ort_cuda, request, tmp_path, record_property):
    """The dynamic-batch export on CUDA keeps shape subgraphs on the CPU behind Memcpy nodes; the runner's
    per-batch session (batch fixed before optimisation) has none (ONNX Runtime saves the graph it runs)."""
    import collections

    import onnx

    from ddpm_deploy.runtime.backends.ort import OrtSession
    from ddpm_deploy.runtime.backends.ort_cuda import provider_options

    micro_onnx = request.getfixturevalue("random_micro_onnx")
    counts = {}
    for label, dims in (("dynamic", None), ("fixed", {"batch": 4})):
        path = tmp_path / f"{label}.onnx"
        s = OrtSession(micro_onnx, "cuda", provider_options=provider_options(gpu.props.ordinal, None, False),
                       batch_dims=dims, optimized_path=path)
        assert s.session.get_providers()[0] == "CUDAExecutionProvider"
        ops = collections.Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)
        counts[label] = {op: n for op, n in ops.items() if op.startswith("Memcpy") or op in ("Shape", "Gather")}
    record_property("ort_cuda_placement", counts)
    assert counts["fixed"] == {}, counts


def test_ort_cuda_eps_matches_cpu(gpu, ort_cuda, request):
    micro_onnx = request.getfixturevalue("random_micro_onnx")
    from ddpm_deploy.runtime.backends.ort import OrtRunner
    from ddpm_deploy.runtime.backends.ort_cuda import OrtCudaRunner

    cpu = OrtRunner(micro_onnx)
    x = np.random.default_rng(0).normal(size=(5, *cpu.sample_shape)).astype(np.float32)
    t = np.array([0, 1, 500, 998, 999], np.int32)
    with OrtCudaRunner(micro_onnx, gpu, cuda_graph=False) as cuda_runner:
        assert cuda_runner.session.get_providers()[0] == "CUDAExecutionProvider"  # not a silent CPU fallback
        assert_close("ε ORT CUDA vs CPU", cuda_runner.eps(x, t), cpu.eps(x, t), L2_EPS_FP32_ATOL)


# --- TensorRT-RTX (or TensorRT) on this GPU ------------------------------------------------------------------

@pytest.fixture(scope="module")
def gpu_plan(gpu, request, tmp_path_factory):
    engine = pytest.importorskip("ddpm_deploy.export.engine")
    try:
        _, flavour = engine.load_tensorrt("auto")
    except MissingDependencyError as e:
        pytest.skip(str(e))
    micro_onnx = request.getfixturevalue("random_micro_onnx")
    plan = tmp_path_factory.mktemp("plan") / "model.plan"
    side = engine.build_engine(micro_onnx, plan, engine.EngineSettings(1, 4, 8, flavour=flavour))
    from ddpm_deploy.runtime.plan import check_plan_compat

    reasons = check_plan_compat(side, side.trt["module"], side.trt["version"], gpu.props.compute_capability)
    if reasons:  # e.g. a TensorRT-RTX plan on an H100 (9.0): the runtime refuses it; tested on CPU too
        pytest.skip(f"{plan.name} cannot run on {gpu.props.name}: {'; '.join(reasons)}")
    return plan


def test_trt_engine_eps_and_trajectory(gpu, gpu_plan, request, record_property):
    micro_onnx = request.getfixturevalue("random_micro_onnx")
    from ddpm_deploy.runtime.backends.ort import OrtRunner
    from ddpm_deploy.runtime.backends.trt import TrtRunner
    from ddpm_deploy.runtime.device.loop import DeviceLoop

    cpu = OrtRunner(micro_onnx)
    x = np.random.default_rng(0).normal(size=(4, *cpu.sample_shape)).astype(np.float32)
    t = np.array([0, 1, 500, 999], np.int32)
    sched, shape, idx = plan_for(cpu.card.diffusion, "ddpm"), cpu.sample_shape, [0, 1, 2, 3]
    with TrtRunner(gpu_plan, gpu) as runner:
        eps_err = float(np.abs(runner.eps(x, t) - cpu.eps(x, t)).max())
        with pytest.raises(ConfigError, match="outside the plan's optimisation profile"):
            runner.check_batch(9)
        with Bound(DeviceLoop(runner, shape, 4, gpu, cuda_graph=True), sched) as s:
            x_graph, timings = s.sample(3, idx)
    with TrtRunner(gpu_plan, gpu, cuda_graph=False) as runner, \
            Bound(DeviceLoop(runner, shape, 4, gpu, cuda_graph=False), sched) as s:
        x_plain, _ = s.sample(3, idx)

    want = host_sample(cpu, sched, shape, 3, idx)

    record_property("trt", {"flavour": runner.flavour, "eps_max_abs": eps_err, "graph": timings.graph,
                            "traj_max_abs": float(np.abs(x_graph - want).max()),
                            "graph_vs_plain_max_abs": float(np.abs(x_graph - x_plain).max())})
    assert eps_err <= L2_EPS_FP32_ATOL  # TF32 is cleared in our fp32 builds (EngineSettings.tf32 = False)
    assert_close("TensorRT loop vs ORT CPU loop", x_graph, want, L3_TRAJECTORY_FP32_ATOL)
    assert_close("TensorRT loop, graph vs no graph", x_graph, x_plain, L3_TRAJECTORY_FP32_ATOL)


def test_step_level_loop_on_the_gpu_equals_sampling_alone(gpu, ort_cuda, request):
    """Step-level batching (runtime/serve/stepper.py) on ORT CUDA + the device loop: its premise (a row's ε does not
    depend on the other rows of the batch: cuDNN may pick another algorithm per batch size) and its claim (images
    of staggered requests with mixed steps and schedulers equal the Sampler's on the same GPU, bit for bit). Checked
    on the CPU by test_stepper.py; here on a real GPU (not run yet: no GPU lent so far)."""
    import threading
    import time

    from ddpm_deploy import Sampler
    from ddpm_deploy.runtime.backends.ort_cuda import OrtCudaRunner
    from ddpm_deploy.runtime.serve.handler import Request, ServedModel
    from ddpm_deploy.runtime.serve.stepper import StepLoop

    micro_onnx = request.getfixturevalue("random_micro_onnx")
    rng_ = np.random.default_rng(0)
    with OrtCudaRunner(micro_onnx) as r:
        c = r.card.data
        x = rng_.standard_normal((8, c.channels, c.image_size, c.image_size)).astype(np.float32)
        t = rng_.integers(0, 1000, 8).astype(np.int32)
        alone = np.concatenate([r.eps(x[i:i + 1], t[i:i + 1]) for i in range(8)])
        mixed = {n: r.eps(x[:n], t[:n]) for n in (2, 5, 8)}
    invariant = all(np.array_equal(v, alone[:n]) for n, v in mixed.items())

    model = ServedModel(micro_onnx, device="cuda", max_batch=4)
    loop = StepLoop(model, queue_size=8)
    asks = [([0], 12, None), ([1, 2], 20, "ddim"), ([3], 9, "dpmsolver++"), ([4], 15, None)]
    results = []
    try:
        for indices, steps, sched in asks:
            got, done = {}, threading.Event()
            raw = None if sched is None else np.frombuffer(sched.encode(), np.uint8).reshape(1, -1).copy()
            req = Request(seed=np.full(len(indices), 3, np.uint64), index=np.asarray(indices, np.int64),
                          steps=np.array([steps], np.int32), scheduler=raw)
            loop.parse_and_submit(req, lambda k, img, last, got=got: got.__setitem__(k, img),
                                  lambda err, done=done, got=got: (got.__setitem__("error", err), done.set()),
                                  lambda: False)
            results.append((got, done))
            time.sleep(0.01)
        for _, done in results:
            assert done.wait(120)
    finally:
        loop.close()
        model.close()
    with Sampler.from_onnx(micro_onnx, device="cuda") as s:
        for (indices, steps, sched), (got, _) in zip(asks, results):
            assert got["error"] is None, got["error"]
            for k, i in enumerate(indices):
                want = s(1, seed=3, start_index=i, steps=steps, scheduler=sched)[0]
                np.testing.assert_array_equal(got[k], want, err_msg=f"{sched} {steps} index {i} "
                                              f"(ε batch-invariant on this GPU: {invariant})")
    assert invariant, "ORT CUDA's ε of a row depends on the batch size on this GPU"
