"""The GPU runtime without a GPU: NVRTC compiles of the real kernels, the same kernel source built by the host
C++ compiler and checked against the NumPy reference, the device loop on the host stand-in of the driver
(``tests/hostsim.py``), error paths, and the TensorRT / ONNX Runtime CUDA runners up to the point that needs a
GPU. The checks on a real GPU are in test_device_gpu.py (marker ``gpu``).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

from ddpm_deploy.runtime import rng
from ddpm_deploy.runtime.backends import trt as trt_backend
from ddpm_deploy.runtime.backends.ort_cuda import provider_options, run_options
from ddpm_deploy.runtime.device import cuda, kernels
from ddpm_deploy.runtime.device.kernels import KernelCompileError
from ddpm_deploy.runtime.errors import (ArtifactError, ConfigError, DDPMError, MissingDependencyError, OutOfMemoryError,
                                         SamplingError, cli_style)
from ddpm_deploy.runtime.plan import sidecar_path
from ddpm_deploy.runtime.sampling.base import Timings as LoopTimings
from ddpm_deploy.runtime.sampling.config import plan_for
from ddpm_deploy.runtime.sampling.host import sample as host_sample
from ddpm_deploy.runtime.schedule import DiffusionConfig, Schedule
from ddpm_deploy.runtime.tolerances import L4_STEP_RTOL, assert_close
from helpers import STEP_PLANS, Bound, check_step_kernel


def _nvrtc_or_skip():
    pytest.importorskip("cuda.bindings", reason="cuda-python is not installed (" + kernels.INSTALL_GPU + ")")
    try:
        return kernels.nvrtc_version()
    except KernelCompileError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def nvrtc():
    return _nvrtc_or_skip()


@pytest.fixture()
def sim(nvrtc):
    """device.cuda talking to the host stand-in (kernels built by the host C++ compiler)."""
    import hostsim

    if hostsim.host_compiler() is None:
        pytest.skip("no host C++ compiler (g++, c++ or clang++) for the host build of the kernels")
    with hostsim.HostDriver.installed(hostsim.LINEAR_EPS_SOURCE, hostsim.LINEAR_EPS_SIGNATURES) as drv:
        yield drv


@pytest.fixture()
def gpu(sim):
    from ddpm_deploy.runtime.device.cuda import GpuContext

    with GpuContext(0) as ctx:
        yield ctx


# --- the source is generated from the reference constants ------------------------------------------------

def test_kernel_constants_are_the_reference_constants():
    src = kernels.kernel_source()
    defines = dict(re.findall(r"^#define (\w+) (\S+)$", src, re.M))

    assert int(defines["PHILOX_M0"].rstrip("u"), 16) == rng.PHILOX_M0
    assert int(defines["PHILOX_M1"].rstrip("u"), 16) == rng.PHILOX_M1
    assert int(defines["PHILOX_W0"].rstrip("u"), 16) == rng.PHILOX_W0
    assert int(defines["PHILOX_W1"].rstrip("u"), 16) == rng.PHILOX_W1
    assert int(defines["PHILOX_ROUNDS"]) == rng.PHILOX_ROUNDS == 10
    assert int(defines["INITIAL_STEP"].rstrip("u"), 16) == rng.INITIAL_STEP
    assert float.fromhex(defines["TWO_PI"]) == rng.TWO_PI == 6.283185307179586
    assert float.fromhex(defines["TWO_POW_M32"]) == 2.0**-32


def test_every_kernel_signature_matches_its_launch_table():
    src = kernels.kernel_source()
    kinds = {"unsigned": "u32", "int": "i32"}

    for name in kernels.ENTRY_POINTS:
        params = re.search(rf"DDPM_KERNEL {name}\(([^)]*)\)", src).group(1).split(",")
        found = tuple("ptr" if "*" in p else kinds[p.split()[-2]] for p in params)
        assert found == kernels.SIGNATURES[name], name


def test_select_target():
    supported = [75, 80, 86, 89, 90, 100, 120]

    assert kernels.select_target((9, 0), supported) == "sm_90"
    assert kernels.select_target((8, 9), supported) == "sm_89"
    assert kernels.select_target((12, 1), supported) == "compute_120"  # newer GPU: PTX, JIT by the driver
    with pytest.raises(KernelCompileError, match="compute capability 7.0"):
        kernels.select_target((7, 0), supported)


# --- NVRTC: the real compile, no GPU needed ----------------------------------------------------------------

@pytest.mark.parametrize("target", ["sm_80", "sm_90", "compute_80"])
def test_nvrtc_compiles_every_kernel(nvrtc, target, record_property):
    out = kernels.compile_kernels(target)

    ptx = out.ptx.decode()
    assert out.log == ""
    assert [e for e in kernels.ENTRY_POINTS if f".entry {e}(" in ptx] == list(kernels.ENTRY_POINTS)
    assert "fma.rn.f32" not in ptx  # float32 arithmetic is never contracted: the step rounds like NumPy
    if target.startswith("sm_"):
        assert out.cubin.startswith(b"\x7fELF") and out.image is out.cubin
    else:
        assert out.cubin is None and out.image.endswith(b"\0")
    record_property("nvrtc", {"target": target, "seconds": round(out.seconds, 3), "ptx_bytes": len(out.ptx),
                              "cubin_bytes": len(out.cubin or b""), "version": out.nvrtc_version})


def test_nvrtc_supports_ampere_and_hopper(nvrtc):
    assert {80, 90} <= set(kernels.supported_archs())


def test_nvrtc_error_carries_the_compile_log(nvrtc):
    with pytest.raises(KernelCompileError, match=r"nvrtcCompileProgram failed for sm_90(.|\n)*error"):
        kernels.compile_kernels("sm_90", source="__global__ void broken( { }")
    with pytest.raises(KernelCompileError, match="target must look like"):
        kernels.compile_kernels("gfx90a")


# --- the kernels, built by the host compiler from the same source ----------------------------------------

def _words(seed, idx, step, n):
    from ddpm_deploy.runtime.device.cuda import GpuContext

    nb = -(-n // 4)
    with GpuContext() as g:
        mod = cuda.Module(b".entry", kernels.SIGNATURES)
        out, i, k = cuda.DeviceArray(len(idx) * nb * 4, np.uint32), cuda.DeviceArray(len(idx), np.uint32), \
            cuda.DeviceArray(2 * len(idx), np.uint32)
        i.upload(np.asarray(idx, np.uint32), g.stream)
        k.upload(np.tile(np.asarray(rng.key_from_seed(seed), np.uint32), len(idx)), g.stream)  # a key per image
        mod.launch("ddpm_philox_words", (-(-nb // 256), len(idx), 1), (256, 1, 1),
                   (out.address, i.address, k.address, step, nb), g.stream)
        return out.download(np.empty((len(idx), nb * 4), np.uint32), g.stream)


@pytest.mark.parametrize("seed, idx, step, n", [(0, [0, 1, 2], 999, 3 * 32 * 32), (2**64 - 1, [2**32 - 1, 7], 0, 13),
                                               (123456789, [5], rng.INITIAL_STEP, 1)])
def test_host_built_words_are_bitwise_the_reference(sim, seed, idx, step, n):
    got = _words(seed, idx, step, n)

    np.testing.assert_array_equal(got, rng.uniform_words(seed, idx, step, n))


def _ulps(a, b):
    ia = np.asarray(a, np.float32).view(np.int32).astype(np.int64)
    ib = np.asarray(b, np.float32).view(np.int32).astype(np.int64)
    ia = np.where(ia < 0, -(2**31) - ia, ia)  # monotone integer order of the floats
    ib = np.where(ib < 0, -(2**31) - ib, ib)
    return np.abs(ia - ib)


def test_host_built_normals_within_two_ulp(gpu):
    from ddpm_deploy.runtime.device.loop import DeviceLoop
    from hostsim import LinearEpsBackend

    shape, idx, seeds = (3, 16, 16), [0, 3, 2**32 - 1], [42, 42, 7]
    with DeviceLoop(LinearEpsBackend(gpu, shape), shape, 3, gpu) as s:
        s.idx.upload(np.asarray(idx, np.uint32), gpu.stream)
        s.keys.upload(np.asarray([rng.key_from_seed(v) for v in seeds], np.uint32).reshape(-1), gpu.stream)
        s.mask.upload(np.ones(3, np.int32), gpu.stream)
        s.module.launch("ddpm_normals", s._grid(3), (kernels.THREADS, 1, 1),
                        (s.x.address, s.idx.address, s.keys.address, s.mask.address, 17, s.n, s.nblocks), gpu.stream)
        got = s.x.download(np.empty(3 * s.n, np.float32), gpu.stream).reshape(3, *shape)

    want = np.concatenate([rng.normals(42, idx[:2], 17, shape), rng.normals(7, idx[2:], 17, shape)])
    assert _ulps(got, want).max() <= 2  # each image's own key: per-image seeds


@pytest.mark.parametrize("name, steps, options", STEP_PLANS)
def test_host_built_step_kernel_matches_the_numpy_rule(gpu, name, steps, options):
    """The fused step kernel vs ``rules.linear_step`` at several rows of every scheduler's plan, with a batch whose
    two images stand at different rows (per-image state), history and UniPC's corrected sample included."""
    check_step_kernel(gpu, name, steps, options)


def test_host_built_step_kernel_skips_free_slots(gpu):
    from ddpm_deploy.runtime.device.loop import DeviceLoop
    from hostsim import LinearEpsBackend

    plan, shape = plan_for(DiffusionConfig(), "ddim", 10), (1, 4, 4)
    x = np.arange(2 * 16, dtype=np.float32).reshape(2, 1, 4, 4)
    with DeviceLoop(LinearEpsBackend(gpu, shape), shape, 2, gpu) as s:
        s.admit([0], plan, 0, [0])
        s.x.upload(x.reshape(-1), gpu.stream)
        s.row.upload(np.array([3, -1], np.int32), gpu.stream)
        s._enqueue_update(2, gpu.stream)
        got = s.x.download(np.empty(32, np.float32), gpu.stream).reshape(2, 1, 4, 4)
    np.testing.assert_array_equal(got[1], x[1])  # row −1: a free slot is left alone
    assert not np.array_equal(got[0], x[0])


# --- the device loop on the host stand-in -----------------------------------------------------------------

def _sampler(gpu, sched, shape, max_batch, **kw):
    from ddpm_deploy.runtime.device.loop import DeviceLoop
    from hostsim import LinearEpsBackend

    backend = LinearEpsBackend(gpu, shape, **{k: kw.pop(k) for k in ("nan_t", "capture", "inf") if k in kw})
    return backend, Bound(DeviceLoop(backend, shape, max_batch, gpu, **kw), sched)


@pytest.mark.parametrize("steps", [None, 20])
def test_device_loop_matches_host_loop_with_and_without_graph(gpu, sim, steps):
    sched, shape, idx = plan_for(DiffusionConfig(), "ddpm", steps), (1, 8, 8), [0, 5, 9]
    backend, graphed = _sampler(gpu, sched, shape, 4, cuda_graph=True)
    with graphed:
        x_graph, t_graph = graphed.sample(11, idx)
    _, plain = _sampler(gpu, sched, shape, 4, cuda_graph=False)
    with plain:
        x_plain, t_plain = plain.sample(11, idx)

    want = host_sample(backend, sched, shape, 11, idx)

    assert t_graph.graph == "captured" and t_plain.graph == "off" and len(t_graph.step_ms) == len(sched)
    np.testing.assert_array_equal(x_graph, x_plain)
    assert_close("device loop vs host loop", x_graph, want, L4_STEP_RTOL)
    assert sim.calls["cuGraphLaunch"] == len(sched) and sim.calls["cuStreamBeginCapture"] == 1


def test_two_loops_on_one_runner_each_rebind_it(gpu, sim):
    """Two device loops over one runner (the Triton model's and the API's old per-(steps, batch) loops), called A, B,
    A at one batch size: each call must bind the runner to its own buffers. Before the fix the loop rebound only
    when its own batch size changed, and A's third call computed ε from B's buffers."""
    from ddpm_deploy.runtime.device.loop import DeviceLoop
    from hostsim import LinearEpsBackend

    shape = (1, 4, 4)
    a_plan, b_plan = plan_for(DiffusionConfig(), "ddpm", 10), plan_for(DiffusionConfig(), "ddim", 7)
    backend = LinearEpsBackend(gpu, shape, capture=False)  # no graph of ours: the binding is what is used
    with DeviceLoop(backend, shape, 2, gpu) as a, DeviceLoop(backend, shape, 2, gpu) as b:
        first, _ = a.sample(a_plan, 1, [0, 1])
        b.sample(b_plan, 2, [0, 1])
        again, _ = a.sample(a_plan, 1, [0, 1])

    np.testing.assert_array_equal(again, first)
    assert_close("loop A vs host loop", again, host_sample(backend, a_plan, shape, 1, [0, 1]), L4_STEP_RTOL)


@pytest.mark.parametrize("graph", [True, False])
def test_a_batch_of_images_with_their_own_plans_and_seeds(gpu, sim, graph):
    """Per-image state on the device: images of different schedulers, step counts and seeds admitted at different
    times share ε calls and come out as the host loop computes each alone."""
    from ddpm_deploy.runtime.device.loop import DeviceLoop
    from hostsim import LinearEpsBackend

    shape, cfg = (1, 4, 4), DiffusionConfig()
    plans = [plan_for(cfg, "ddim", 5, eta=1.0), plan_for(cfg, "dpmsolver++", 6, solver_order=3),
             plan_for(cfg, "unipc", 4), plan_for(cfg, "ddpm", 3)]
    seeds, idx = [3, 4, 3, 9], [0, 7, 2, 5]
    backend = LinearEpsBackend(gpu, shape)
    got = {}
    with DeviceLoop(backend, shape, 4, gpu, cuda_graph=graph) as loop:
        loop.admit([0], plans[0], seeds[0], [idx[0]])
        loop.admit([1], plans[1], seeds[1], [idx[1]])
        loop.step()  # the next two join one step later
        loop.admit([2], plans[2], seeds[2], [idx[2]])
        loop.admit([3], plans[3], seeds[3], [idx[3]])
        while len(got) < 4:
            for slot in loop.step():
                got[slot] = loop.take([slot])[0]

    for slot in range(4):
        want = host_sample(backend, plans[slot], shape, seeds[slot], [idx[slot]])[0]
        assert_close(f"slot {slot} ({plans[slot].scheduler})", got[slot], want, L4_STEP_RTOL)


def test_a_dropped_image_frees_its_slot_for_the_next_request(gpu, sim):
    """What a step-level server does with a cancelled request (``Loop.drop``): the slot is free at once, a new image
    admitted there starts fresh, and the image beside it is not disturbed."""
    from ddpm_deploy.runtime.device.loop import DeviceLoop
    from hostsim import LinearEpsBackend

    shape, cfg = (1, 4, 4), DiffusionConfig()
    long, short, other = plan_for(cfg, "ddpm", 50), plan_for(cfg, "ddim", 6), plan_for(cfg, "unipc", 5)
    backend = LinearEpsBackend(gpu, shape)
    got = {}
    with DeviceLoop(backend, shape, 2, gpu) as loop:
        loop.admit([0], long, 1, [0])
        loop.admit([1], other, 2, [3])
        loop.step()
        loop.step()
        loop.drop([0])  # cancelled after 2 of 50 steps
        assert loop.occupied() == 1
        loop.admit([0], short, 1, [4])
        while len(got) < 2:
            for slot in loop.step():
                got[slot] = loop.take([slot])[0]

    assert_close("the image admitted into the freed slot", got[0], host_sample(backend, short, shape, 1, [4])[0],
                 L4_STEP_RTOL)
    assert_close("the image beside it", got[1], host_sample(backend, other, shape, 2, [3])[0], L4_STEP_RTOL)


def test_device_loop_is_batch_invariant_and_recaptures_per_batch_size(gpu, sim):
    sched, shape = plan_for(DiffusionConfig(), "ddpm", 10), (1, 4, 4)
    _, sampler = _sampler(gpu, sched, shape, 6)
    with sampler:
        x_all, _ = sampler.sample(3, range(6))
        x_part, _ = sampler.sample(3, [2, 3])
        x_again, _ = sampler.sample(3, [4, 5])
        x_seed, _ = sampler.sample(4, [4, 5])

    np.testing.assert_array_equal(x_part, x_all[2:4])
    np.testing.assert_array_equal(x_again, x_all[4:6])
    assert not np.array_equal(x_seed, x_again)
    assert sim.calls["cuStreamBeginCapture"] == 2  # batch 6, then batch 2 (reused for the 3rd and 4th)


def test_device_loop_reports_the_first_non_finite_step(gpu):
    sched = plan_for(DiffusionConfig(), "ddpm", 10)
    _, sampler = _sampler(gpu, sched, (1, 4, 4), 2, nan_t=int(sched.timesteps[3]))

    with sampler, pytest.raises(SamplingError, match=rf"t={int(sched.timesteps[3])} \(loop step 4/10\).*sample index 0"):
        sampler.sample(0, [0, 1])


def test_device_loop_reports_an_infinite_eps_that_clipping_hides(gpu):
    """ε = +Inf gives x̂0 = −Inf, clipped to −1: x stays finite (all-black images, exit 0, before this check). The
    step kernel flags a non-finite ε itself."""
    sched = plan_for(DiffusionConfig(), "ddpm", 10)
    t_bad = int(sched.timesteps[3])
    _, sampler = _sampler(gpu, sched, (1, 4, 4), 2, nan_t=t_bad, inf=True)
    host_x = Schedule(DiffusionConfig(), steps=10)  # the same ε in the host step stays finite: what the check is for
    eps = np.full((2, 1, 4, 4), np.inf, np.float32)
    assert np.isfinite(host_x.step(np.zeros((2, 1, 4, 4), np.float32), eps, 6, np.zeros((2, 1, 4, 4), np.float32))).all()
    with sampler, pytest.raises(SamplingError, match=rf"t={t_bad} \(loop step 4/10\)"):
        sampler.sample(0, [0, 1])


def test_capture_failure_falls_back_to_no_graph(gpu, sim, caplog):
    sched, shape = plan_for(DiffusionConfig(), "ddpm", 5), (1, 4, 4)
    backend, sampler = _sampler(gpu, sched, shape, 2)
    backend.enqueue = lambda stream, launch=backend.enqueue: (stream.synchronize(), launch(stream))  # capture-unsafe

    with sampler:
        x, timings = sampler.sample(1, [0, 1])

    assert timings.graph == "off" and "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED" in sampler.graph_error
    assert "cuStreamSynchronize failed" in caplog.text
    assert_close("fallback vs host", x, host_sample(backend, sched, shape, 1, [0, 1]), L4_STEP_RTOL)


def test_backend_error_under_capture_falls_back_to_no_graph(gpu, sim, caplog):
    """A backend whose own call fails while being captured (ONNX Runtime raises SamplingError from enqueue): the
    capture is ended, the loop runs without graphs and the result is unchanged."""
    from ddpm_deploy.runtime.errors import SamplingError

    sched, shape = plan_for(DiffusionConfig(), "ddpm", 5), (1, 4, 4)
    backend, sampler = _sampler(gpu, sched, shape, 2)
    calls = {"n": 0}

    def enqueue(stream, launch=backend.enqueue):
        calls["n"] += 1
        if calls["n"] == 2:  # the first call is the warm-up before the capture, the second is under capture
            raise SamplingError("<test-linear>: ONNX Runtime CUDA failed to run the model (capture not supported)")
        launch(stream)

    backend.enqueue = enqueue
    with sampler:
        x, timings = sampler.sample(1, [0, 1])

    assert timings.graph == "off" and "capture not supported" in sampler.graph_error
    assert_close("fallback vs host", x, host_sample(backend, sched, shape, 1, [0, 1]), L4_STEP_RTOL)


def test_a_captured_host_callback_is_not_replayed(gpu, sim, caplog):
    """A backend whose run enqueues a host callback (ONNX Runtime frees deferred CPU buffers that way): captured,
    the callback would run again at every replay on memory its owner has freed. The loop lists the graph's nodes,
    refuses it and runs without graphs; the callback then runs once per step, as the backend meant."""
    sched, shape = plan_for(DiffusionConfig(), "ddpm", 5), (1, 4, 4)
    backend, sampler = _sampler(gpu, sched, shape, 2)
    calls = []

    def enqueue(stream, launch=backend.enqueue):
        launch(stream)
        cuda.driver().cuLaunchHostFunc(stream.handle, calls.append, "freed")

    backend.enqueue = enqueue
    with sampler:
        x, timings = sampler.sample(1, [0, 1])

    assert timings.graph == "off" and "1 host-function node" in sampler.graph_error
    assert len(calls) == 1 + 5  # the warm-up, then one per step (the discarded capture never ran it)
    assert_close("fallback vs host", x, host_sample(backend, sched, shape, 1, [0, 1]), L4_STEP_RTOL)


def test_timings_summary_has_the_host_loop_keys(gpu):
    from ddpm_deploy.runtime.device.loop import DeviceTimings

    _, sampler = _sampler(gpu, plan_for(DiffusionConfig(), "ddpm", 4), (1, 4, 4), 1, cuda_graph=False)
    with sampler:
        _, timings = sampler.sample(0, [0])

    summary = timings.summary()
    assert set(LoopTimings().summary()) <= set(summary) and summary["steps"] == 4 and summary["graph"] == "off"
    total = DeviceTimings().extend(timings).extend(timings)
    assert len(total.step_ms) == len(total.eps_ms) == 8
    assert total.extend(DeviceTimings(step_ms=[1.0], graph="captured")).eps_ms is None
    assert summary["eps_ms_median"] is not None and summary["overhead_ratio"] >= 1.0
    json.dumps(summary)


def test_sampler_rejects_bad_indices_and_shapes(gpu):
    from ddpm_deploy.runtime.device.loop import check_indices, check_shape

    with pytest.raises(ConfigError, match="does not fit"):
        check_indices(range(5), 4)
    with pytest.raises(ConfigError, match=r"\[0, 2\*\*32 - 1\]"):
        check_indices([-1], 4)
    with pytest.raises(ConfigError, match="1-D integer"):
        check_indices([[0]], 4)
    with pytest.raises(ConfigError, match=r"\(C, H, W\)"):
        check_shape((3, 32))


# --- errors name the call, and say what is missing --------------------------------------------------------

def test_failed_calls_name_the_call_and_the_error(gpu, sim):
    codes = cuda.driver().CUresult
    sim.fail["cuMemAlloc"] = codes.CUDA_ERROR_OUT_OF_MEMORY
    with pytest.raises(cuda.CudaError, match=r"cuMemAlloc failed: CUDA_ERROR_OUT_OF_MEMORY.*smaller batch") as e:
        cuda.DeviceArray(16, np.float32)
    assert isinstance(e.value, OutOfMemoryError)  # the API's exception for a batch that does not fit
    sim.fail["cuMemAlloc"] = codes.CUDA_ERROR_OUT_OF_MEMORY
    with cli_style(), pytest.raises(cuda.CudaError, match=r"smaller --batch or free the GPU"):
        cuda.DeviceArray(16, np.float32)
    sim.fail["cuInit"] = codes.CUDA_ERROR_NO_DEVICE
    with pytest.raises(cuda.NoDeviceError, match="cuInit failed: CUDA_ERROR_NO_DEVICE.*nvidia-smi"):
        cuda.query_device()
    sim.fail["cuInit"] = codes.CUDA_ERROR_CALL_REQUIRES_NEWER_DRIVER
    with pytest.raises(cuda.NoDeviceError, match="580 or newer"):
        cuda.query_device()
    sim.fail["cuLaunchKernel"] = codes.CUDA_ERROR_LAUNCH_FAILED
    with pytest.raises(cuda.CudaError, match=r"cuLaunchKernel\(ddpm_advance\) failed"):
        cuda.Module(b".entry", kernels.SIGNATURES).launch("ddpm_advance", (1, 1, 1), (1, 1, 1), (0, 0, 0),
                                                             gpu.stream)


def test_pack_args_checks_count_and_range():
    holders, params = cuda.pack_args("k", ("ptr", "u32", "i32"), (2**40, 7, -3))

    assert [int(h[0]) for h in holders] == [2**40, 7, -3] and params.dtype == np.uint64
    with pytest.raises(ValueError, match="takes 3 arguments"):
        cuda.pack_args("k", ("ptr", "u32", "i32"), (1, 2))
    with pytest.raises(ValueError, match=r"argument 1 \(u32\)"):
        cuda.pack_args("k", ("ptr", "u32"), (1, -1))


def _driver_is_present() -> bool:
    try:
        cuda.query_device()
        return True
    except DDPMError:  # no driver, no GPU, or no cuda-python
        return False


def test_no_driver_gives_a_clear_error(nvrtc):
    if _driver_is_present():
        pytest.skip("an NVIDIA driver and GPU are present here")
    from ddpm_deploy.runtime.device.cuda import GpuContext

    with pytest.raises(cuda.NoDeviceError, match=r"cuInit: the NVIDIA driver library \(libcuda.so.1\) was not found"):
        GpuContext(0)


def test_real_binding_accepts_our_argument_types(nvrtc):
    """Without a driver, cuda-python converts every argument before it fails to load libcuda: a TypeError here
    would be a wrong argument type in our wrappers."""
    if _driver_is_present():
        pytest.skip("an NVIDIA driver is present: the GPU tests exercise these calls for real")
    d = cuda.driver()
    host = np.zeros(8, np.float32)
    _, params = cuda.pack_args("ddpm_advance", ("ptr",), (0,))
    calls = [("cuMemcpyHtoDAsync", d.CUdeviceptr(0), host.ctypes.data, host.nbytes, d.CUstream(0)),
             ("cuMemcpyDtoHAsync", host.ctypes.data, d.CUdeviceptr(0), host.nbytes, d.CUstream(0)),
             ("cuMemsetD32Async", d.CUdeviceptr(0), 0xFFFFFFFF, 8, d.CUstream(0)),
             ("cuLaunchKernel", d.CUfunction(), 1, 2, 1, 256, 1, 1, 0, d.CUstream(0), params.ctypes.data, 0),
             ("cuStreamCreate", d.CUstream_flags.CU_STREAM_NON_BLOCKING),
             ("cuStreamBeginCapture", d.CUstream(0), d.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL),
             ("cuGraphInstantiate", d.CUgraph(), 0), ("cuGraphLaunch", d.CUgraphExec(), d.CUstream(0)),
             ("cuModuleLoadData", b"\x7fELF"), ("cuModuleGetFunction", d.CUmodule(), b"ddpm_step"),
             ("cuEventCreate", d.CUevent_flags.CU_EVENT_DEFAULT), ("cuEventElapsedTime", d.CUevent(), d.CUevent()),
             ("cuDeviceGetAttribute", d.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, d.CUdevice(0))]
    for name, *args in calls:
        with pytest.raises(cuda.NoDeviceError):
            cuda.call(name, *args)


class _RealBindingFirst:
    """Wraps the stand-in driver: every cu* call first goes to the real ``cuda.bindings.driver`` with the very
    objects the runtime built (the stand-in's own handles swapped for empty real ones of their kind). Without a
    driver library the real binding checks each argument's type and range, then fails to load libcuda: any other
    exception is a call the real driver would refuse. Then the stand-in runs the call."""

    KINDS = {"context": "CUcontext", "event": "CUevent", "module": "CUmodule", "function": "CUfunction",
             "graph": "CUgraph", "graph_exec": "CUgraphExec", "graph_node": "CUgraphNode"}

    def __init__(self, sim, real):
        self._sim, self._real = sim, real
        self.seen: dict[str, int] = {}
        self.refused: list[tuple] = []

    def _as_real(self, arg):
        import hostsim

        return getattr(self._real, self.KINDS[arg.kind])() if isinstance(arg, hostsim._Handle) else arg

    def __getattr__(self, name):
        attr = getattr(self._sim, name)
        if not (name.startswith("cu") and callable(attr)):
            return attr

        def call(*args):
            self.seen[name] = self.seen.get(name, 0) + 1
            try:
                getattr(self._real, name)(*[self._as_real(a) for a in args])
                self.refused.append((name, "returned although no driver library is loaded"))
            except RuntimeError as e:  # DynamicLibNotFoundError / FunctionNotFoundError: the types were accepted
                if type(e).__name__ not in ("DynamicLibNotFoundError", "FunctionNotFoundError"):
                    self.refused.append((name, repr(e)))
            except Exception as e:
                self.refused.append((name, f"{type(e).__name__}: {e}", [type(a).__name__ for a in args]))
            return attr(*args)

        return call


def test_every_driver_call_of_a_sampling_run_is_accepted_by_the_real_binding(nvrtc):
    """A whole device-loop run (with and without our CUDA graph, a partial batch, events, copies, the module)
    with each driver call also given to the real cuda-python binding, arguments as built."""
    import hostsim

    from ddpm_deploy.runtime.device.cuda import GpuContext
    from ddpm_deploy.runtime.device.loop import DeviceLoop

    real = pytest.importorskip("cuda.bindings.driver")
    if _driver_is_present():
        pytest.skip("a real driver is present: the real calls would run on made-up handles")
    if hostsim.host_compiler() is None:
        pytest.skip("no host C++ compiler for the host build of the kernels")
    proxy = _RealBindingFirst(hostsim.HostDriver(hostsim.LINEAR_EPS_SOURCE, hostsim.LINEAR_EPS_SIGNATURES), real)
    previous = cuda.use_driver(proxy)
    try:
        sched, shape = plan_for(DiffusionConfig(), "ddpm", 4), (3, 8, 8)
        with GpuContext(0) as gpu:
            for graph in (True, False):
                backend = hostsim.LinearEpsBackend(gpu, shape)
                with backend, DeviceLoop(backend, shape, 4, gpu, cuda_graph=graph) as loop:
                    loop.sample(sched, 1, [0, 1, 2])
                    _, timings = loop.sample(sched, 1, [0, 1])
                assert timings.graph == ("captured" if graph else "off")
            gpu.device.synchronize()
    finally:
        cuda.use_driver(previous)

    assert not proxy.refused, proxy.refused
    for name in ("cuLaunchKernel", "cuStreamBeginCapture", "cuGraphInstantiate", "cuGraphLaunch", "cuMemcpyHtoDAsync",
                 "cuGraphGetNodes", "cuGraphNodeGetType",
                 "cuMemcpyDtoHAsync", "cuEventElapsedTime", "cuModuleLoadData", "cuModuleGetFunction"):
        assert proxy.seen.get(name, 0) > 0, (name, proxy.seen)


def test_missing_cuda_python_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "cuda.bindings.driver", None)
    previous = cuda.use_driver(None)
    try:
        with pytest.raises(MissingDependencyError, match=r"cuda-python==13\.4\.4"):
            cuda.query_device()
    finally:
        cuda.use_driver(previous)


def test_device_modules_import_neither_torch_nor_cuda():
    code = textwrap.dedent("""
        import sys
        import ddpm_deploy.runtime.device, ddpm_deploy.runtime.backends.trt, ddpm_deploy.runtime.backends.ort_cuda
        heavy = [m for m in sys.modules if m.split(".")[0] in ("torch", "cuda", "tensorrt", "tensorrt_rtx_bindings")]
        assert heavy == [], heavy
        print("OK")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr


# --- TensorRT runner: everything up to the GPU ------------------------------------------------------------

@pytest.mark.parametrize("batch", [0, 17, 100])
def test_batch_outside_profile_is_refused(batch):
    with cli_style(), pytest.raises(ConfigError, match=rf"batch {batch} is outside the plan's optimisation profile "
                                                       r"\(min/opt/max = 1/4/16\); use --batch between 1 and 16"):
        trt_backend.check_batch_in_profile(batch, {"min": 1, "opt": 4, "max": 16}, "model.plan")
    with pytest.raises(ConfigError, match=r"; use batch between 1 and 16"):  # the API's word
        trt_backend.check_batch_in_profile(batch, {"min": 1, "opt": 4, "max": 16}, "model.plan")


def test_batch_inside_profile_is_accepted():
    for batch in (1, 4, 16):
        trt_backend.check_batch_in_profile(batch, {"min": 1, "opt": 4, "max": 16})


def test_sidecar_io_contract():
    io = {"inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 3, 32, 32]},
                     {"name": "t", "dtype": "int32", "shape": [-1]}],
          "outputs": [{"name": "eps", "dtype": "float32", "shape": [-1, 3, 32, 32]}]}
    assert trt_backend.sidecar_io(io["inputs"], io["outputs"], "p") == (3, 32, 32)
    io["inputs"][1]["dtype"] = "int64"
    with pytest.raises(ArtifactError, match="t int32"):
        trt_backend.sidecar_io(io["inputs"], io["outputs"], "p")


def test_missing_tensorrt_names_the_wheel(monkeypatch):
    for name in (*trt_backend.RTX_MODULES, "tensorrt"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(MissingDependencyError, match="tensorrt-rtx-cu13-bindings==1.7.1.116"):
        trt_backend.import_tensorrt("rtx")
    with pytest.raises(MissingDependencyError, match="tensorrt>=10"):
        trt_backend.import_tensorrt("tensorrt")


@pytest.fixture(scope="module")
def rtx_plan(tmp_path_factory):
    """A real TensorRT-RTX plan (+ sidecar) of a tiny ε-model, built without a GPU."""
    torch = pytest.importorskip("torch")
    onnx = pytest.importorskip("onnx")
    engine = pytest.importorskip("ddpm_deploy.export.engine")
    try:
        engine.load_tensorrt("rtx")
    except MissingDependencyError as e:
        pytest.skip(str(e))
    from ddpm_deploy.runtime.config import ONNX_METADATA_KEY, DataSpec, ModelCard

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)

        def forward(self, x, t):
            return self.conv(x) + t.to(torch.float32)[:, None, None, None] * 1e-3

    d = tmp_path_factory.mktemp("rtx")
    torch.manual_seed(0)
    with warnings.catch_warnings():  # the TorchScript exporter (dynamo=False) is deprecated; fine for a fixture
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(Tiny().eval(), (torch.randn(2, 1, 8, 8), torch.tensor([0, 1], dtype=torch.int32)),
                          str(d / "model.onnx"), input_names=["x", "t"], output_names=["eps"], opset_version=17,
                          dynamic_axes={k: {0: "batch"} for k in ("x", "t", "eps")}, dynamo=False)
    proto = onnx.load(str(d / "model.onnx"))
    entry = proto.metadata_props.add()
    entry.key, entry.value = ONNX_METADATA_KEY, ModelCard(DiffusionConfig(), DataSpec(1, 8)).to_json()
    onnx.save(proto, str(d / "model.onnx"))
    engine.build_engine(d / "model.onnx", d / "model.plan", engine.EngineSettings(1, 4, 16, flavour="rtx"))
    return d / "model.plan"


def _copy_plan(plan, tmp_path):
    import shutil

    shutil.copy(plan, tmp_path / plan.name)
    shutil.copy(sidecar_path(plan), sidecar_path(tmp_path / plan.name))
    return tmp_path / plan.name


def test_trt_runner_refuses_missing_sidecar_and_tampered_plan(rtx_plan, tmp_path):
    plan = _copy_plan(rtx_plan, tmp_path)
    plan.write_bytes(plan.read_bytes() + b"\0")
    with pytest.raises(ArtifactError, match="modified after it was built"):
        trt_backend.TrtRunner(plan, gpu=None)
    sidecar_path(plan).unlink()
    with pytest.raises(ArtifactError, match="expected the plan's sidecar"):
        trt_backend.TrtRunner(plan, gpu=None)


@pytest.fixture()
def rtx_gpu(sim):
    """The stand-in driver posing as an RTX-class GPU (compute capability 8.9, which TensorRT-RTX supports)."""
    from ddpm_deploy.runtime.device.cuda import GpuContext

    sim.cc = (8, 9)
    with GpuContext(0) as ctx:
        yield ctx


def test_trt_runner_refuses_a_plan_for_another_tensorrt(rtx_plan, tmp_path, rtx_gpu):
    plan = _copy_plan(rtx_plan, tmp_path)
    side = json.loads(sidecar_path(plan).read_text())
    side["trt"]["version"] = "1.0.0.1"
    sidecar_path(plan).write_text(json.dumps(side))

    with pytest.raises(ArtifactError, match=r"cannot run on hostsim.*:\n  - the plan was built with .* 1\.0\.0\.1"):
        trt_backend.TrtRunner(plan, rtx_gpu)


def test_trt_runner_without_a_real_gpu_says_deserialization_failed(rtx_plan, rtx_gpu):
    with pytest.raises(ArtifactError, match=r"could not deserialize the plan on hostsim(.|\n)*TensorRT reported"):
        trt_backend.TrtRunner(rtx_plan, rtx_gpu)


def test_rtx_plan_on_an_sm90_stand_in_is_refused_naming_the_supported_gpus(rtx_plan, gpu):
    """H100/H200 (9.0) cannot run TensorRT-RTX: a clear refusal before deserializing, not a crash."""
    assert gpu.props.compute_capability == (9, 0)
    with pytest.raises(ArtifactError, match=r"cannot run on hostsim(.|\n)*runs on compute capability 7\.5, 8\.6, "
                                            r"8\.9, 12\.0, 12\.1 only, this GPU has 9\.0"):
        trt_backend.TrtRunner(rtx_plan, gpu)


def test_engine_info_on_a_machine_without_gpu(rtx_plan):
    from ddpm_deploy.runtime.device.info import engine_info, format_engine_info

    if _driver_is_present():
        pytest.skip("an NVIDIA driver is present here")
    info = engine_info(rtx_plan)

    text = format_engine_info(info)
    assert info["runnable"] is False and info["tensorrt"]["module"].startswith("tensorrt_rtx")
    assert any("no usable GPU" in r for r in info["reasons"]) or any("cuda-python" in r for r in info["reasons"])
    assert "batch profile: min/opt/max = 1/4/16" in text and "runnable here: no" in text


def test_engine_info_cross_checks_the_onnx_beside_the_plan(rtx_plan, tmp_path):
    """A model.onnx beside the plan that is not the one it was built from (re-exported since): info says the plan is
    stale and `ddpm-run info --engine` exits 1; the original ONNX beside it is reported as matching."""
    import shutil

    from click.testing import CliRunner

    from ddpm_deploy.runtime.device.info import engine_info, format_engine_info
    from ddpm_deploy.verify.cli import main as run_cli

    plan = _copy_plan(rtx_plan, tmp_path)
    shutil.copy(rtx_plan.with_name("model.onnx"), tmp_path / "model.onnx")
    info = engine_info(plan, load=False)
    assert info["onnx_beside"] == {"path": str(tmp_path / "model.onnx"), "matches": True}
    assert "the copy beside the plan matches" in format_engine_info(info)
    with open(tmp_path / "model.onnx", "ab") as f:
        f.write(b"\0")  # any change of the bytes: a re-export
    info = engine_info(plan, load=False)
    assert info["onnx_beside"]["matches"] is False and not info["runnable"]
    assert any("the plan is stale" in r for r in info["reasons"])
    r = CliRunner().invoke(run_cli, ["info", "--engine", str(plan)])
    assert r.exit_code == 1 and "DIFFERS (the plan is stale)" in r.output, r.output


# --- ONNX Runtime CUDA runner: options, and the message without onnxruntime-gpu ---------------------------

def test_ort_provider_and_run_options():
    ort = pytest.importorskip("onnxruntime")

    assert provider_options(0, 1234, True) == {"device_id": "0", "enable_cuda_graph": "1", "user_compute_stream": "1234",
                                               "has_user_compute_stream": "1", "arena_extend_strategy": "kSameAsRequested",
                                               "cudnn_conv_algo_search": "EXHAUSTIVE", "use_tf32": "0"}
    plain = provider_options(1, None, False, tf32=True, conv_algo_search="HEURISTIC")
    assert "user_compute_stream" not in plain and plain["use_tf32"] == "1" and plain["enable_cuda_graph"] == "0"
    with pytest.raises(ConfigError, match="cudnn_conv_algo_search"):
        provider_options(0, None, False, conv_algo_search="FAST")
    opts = run_options(ort, True, 2)
    assert opts.get_run_config_entry("disable_synchronize_execution_providers") == "1"
    assert opts.get_run_config_entry("gpu_graph_id") == "2"


def test_ort_cuda_without_onnxruntime_gpu_names_the_package(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here")
    from ddpm_deploy.runtime.backends.ort_cuda import OrtCudaRunner

    model = tmp_path / "model.onnx"
    model.write_bytes(b"not used")
    with pytest.raises(ConfigError, match="install onnxruntime-gpu instead of onnxruntime"):
        OrtCudaRunner(model, gpu=None)


def _ops(path) -> dict[str, int]:
    import collections

    import onnx

    return dict(collections.Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node))


SHAPE_OPS = ("Shape", "Gather", "ConstantOfShape", "Range")  # int64 shape arithmetic ORT's CUDA provider puts on the CPU


def test_a_batch_fixed_session_folds_the_shape_subgraphs(random_micro_onnx, tmp_path):
    """Why OrtCudaRunner opens one session per batch size: with the batch axis fixed before optimisation, ONNX
    Runtime's constant folding removes every shape subgraph of our dynamic-batch export (checked here on the CPU
    provider with the same optimiser; on CUDA those nodes would run on the CPU behind Memcpy nodes, and ORT's CUDA
    graph cannot capture a model with CPU nodes). Same ε within the fp32 ε tolerance (static shapes pick other
    kernels: not bit for bit)."""
    pytest.importorskip("onnx")
    from ddpm_deploy.runtime.backends.ort import OrtSession

    dynamic = OrtSession(random_micro_onnx, "cpu", optimized_path=tmp_path / "dynamic.onnx")
    fixed = OrtSession(random_micro_onnx, "cpu", batch_dims={n: 3 for n in dynamic.batch_dim_names},
                       optimized_path=tmp_path / "fixed.onnx")

    assert dynamic.batch_dim_names == ["batch"] and dynamic.fixed_batch is None
    assert fixed.fixed_batch == 3 and fixed.batch_dim_names == []
    before, after = _ops(tmp_path / "dynamic.onnx"), _ops(tmp_path / "fixed.onnx")
    assert before.get("Shape", 0) > 0, before  # the export does carry shape subgraphs
    assert not {op: after[op] for op in SHAPE_OPS if op in after}, after
    x = np.random.default_rng(1).normal(size=(3, *dynamic.sample_shape)).astype(np.float32)
    t = np.array([0, 500, 999], np.int32)
    run = lambda s: s.session.run(["eps"], {"x": x, "t": t})[0]  # noqa: E731
    from ddpm_deploy.runtime.tolerances import L2_EPS_FP32_ATOL

    np.testing.assert_allclose(run(fixed), run(dynamic), rtol=0, atol=L2_EPS_FP32_ATOL)
    with pytest.raises(Exception, match="(?i)dimension|shape"):
        fixed.session.run(["eps"], {"x": x[:2], "t": t[:2]})


# --- TensorRT-RTX runtime cache ------------------------------------------------------------------------------

def test_runtime_cache_calls_exist_in_the_real_tensorrt_rtx_bindings():
    """The calls RuntimeCacheFile and TrtRunner make, checked against the installed TensorRT-RTX module (its
    runtime cannot execute here: no GPU, and none of the lent GPUs is one TensorRT-RTX supports)."""
    trt = pytest.importorskip("tensorrt_rtx_bindings")

    for cls, names in ((trt.ICudaEngine, ("create_runtime_config", "create_execution_context")),
                       (trt.IRuntimeConfig, ("create_runtime_cache", "set_runtime_cache", "cuda_graph_strategy")),
                       (trt.IRuntimeCache, ("serialize", "deserialize"))):
        missing = [n for n in names if not hasattr(cls, n)]
        assert not missing, f"{cls.__name__} lacks {missing}"
    assert "blob" in trt.IRuntimeCache.deserialize.__doc__ and "-> bool" in trt.IRuntimeCache.deserialize.__doc__
    assert "runtime_config" in trt.ICudaEngine.create_execution_context.__doc__
    assert hasattr(trt.CudaGraphStrategy, "WHOLE_GRAPH_CAPTURE")


class _StandInRuntimeCache:
    """Stands in for IRuntimeCache, which exists only on a GPU TensorRT-RTX supports (none here): accepts blobs
    starting with b"ok", serializes what it holds."""

    def __init__(self):
        self.blob = b""

    def deserialize(self, blob):
        if not bytes(blob).startswith(b"ok"):
            return False
        self.blob = bytes(blob)
        return True

    def serialize(self):
        return self.blob


class _StandInRuntimeConfig:
    def __init__(self):
        self.cache = None

    def create_runtime_cache(self):
        return _StandInRuntimeCache()

    def set_runtime_cache(self, cache):
        self.cache = cache
        return True


def test_runtime_cache_file_round_trip_with_stand_in_tensorrt_no_rtx_gpu_here(tmp_path):
    path = trt_backend.default_runtime_cache(tmp_path / "model.plan")
    assert path.name == "model.plan.runtime-cache"

    first = trt_backend.RuntimeCacheFile(path)
    config = _StandInRuntimeConfig()
    first.attach(config)
    assert first.loaded is None and config.cache is first.cache and not first.save()  # nothing compiled: no file
    assert not path.exists()
    config.cache.blob = b"ok:kernels-1"  # what TensorRT-RTX compiled in this process
    assert first.save() and path.read_bytes() == b"ok:kernels-1"

    second = trt_backend.RuntimeCacheFile(path)
    second.attach(_StandInRuntimeConfig())
    assert second.loaded is True and second.cache.blob == b"ok:kernels-1"
    assert not second.save()  # unchanged: not rewritten
    second.cache.blob += b",kernels-2"
    assert second.save() and path.read_bytes() == b"ok:kernels-1,kernels-2"
    assert not list(tmp_path.glob(".*.tmp"))


def test_runtime_cache_from_another_gpu_is_replaced_and_an_unwritable_place_only_warns(tmp_path, caplog):
    path = tmp_path / "cache" / "model.plan.runtime-cache"
    path.parent.mkdir()
    path.write_bytes(b"made on another GPU")

    cache = trt_backend.RuntimeCacheFile(path)
    with caplog.at_level("WARNING"):
        cache.attach(_StandInRuntimeConfig())
    assert cache.loaded is False and "made for another GPU" in caplog.text and str(path) in caplog.text
    cache.cache.blob = b"ok:fresh"
    assert cache.save() and path.read_bytes() == b"ok:fresh"

    blocked = trt_backend.RuntimeCacheFile(tmp_path / "model.plan" / "x.runtime-cache")  # under a file: unwritable
    (tmp_path / "model.plan").write_bytes(b"a plan")
    blocked.attach(_StandInRuntimeConfig())
    blocked.cache.blob = b"ok:compiled"
    with caplog.at_level("WARNING"):
        assert not blocked.save()
    assert "cannot save the TensorRT-RTX runtime cache" in caplog.text and "next process compiles" in caplog.text


def test_trt_runner_attaches_the_cache_before_the_context_and_saves_it_on_close_stand_in_engine_no_rtx_gpu_here(tmp_path):
    """TrtRunner's use of the cache, on a stand-in engine (a TensorRT-RTX engine deserializes only on a GPU that
    TensorRT-RTX supports; none here): the cache is in the runtime config when the context is created, the
    graph strategy is set, the config outlives the context, and close() writes what was compiled."""
    import types

    seen = {}

    class Engine:
        def create_runtime_config(self):
            return _StandInRuntimeConfig()

        def create_execution_context(self, config):
            seen["cache_at_context"] = config.cache
            seen["strategy"] = getattr(config, "cuda_graph_strategy", None)
            return object()

    runner = object.__new__(trt_backend.TrtRunner)
    runner.path, runner.flavour, runner.engine = tmp_path / "model.plan", "rtx", Engine()
    runner.trt = types.SimpleNamespace(CudaGraphStrategy=types.SimpleNamespace(WHOLE_GRAPH_CAPTURE="whole"))
    runner.runtime_cache = trt_backend.RuntimeCacheFile(trt_backend.default_runtime_cache(runner.path))
    runner._scratch, runner._own_gpu, runner.gpu, runner.uses_graphs = {}, False, None, False

    runner.context = runner._create_context(cuda_graph=True)

    assert seen["cache_at_context"] is runner.runtime_cache.cache is not None and seen["strategy"] == "whole"
    assert runner.uses_graphs and runner._runtime_config.cache is runner.runtime_cache.cache
    runner.runtime_cache.cache.blob = b"ok:jit-kernels"
    runner.close()
    assert (tmp_path / "model.plan.runtime-cache").read_bytes() == b"ok:jit-kernels"
    assert runner.context is None and runner._runtime_config is None


# --- OrtCudaRunner's bookkeeping on ONNX Runtime's CPU provider (the CUDA provider needs a GPU) -------------------

def test_ort_cuda_runner_logic_on_the_cpu_provider_stand_in(gpu, random_micro_onnx, caplog):
    """OrtCudaRunner with ONNX Runtime's CPU provider in place of CUDA (ort_device = "cpu"; the stand-in driver's
    device buffers are host memory, so IO binding to them is real): one session per batch size with the batch fixed,
    bindings reused, a partial last batch with a session of its own, the dynamic-batch session for eps(), and the
    device loop's images equal to the host loop's. The same runner on CUDA is tests/runtime/test_device_gpu.py."""
    from ddpm_deploy.runtime.backends.ort import OrtRunner
    from ddpm_deploy.runtime.backends.ort_cuda import OrtCudaRunner
    from ddpm_deploy.runtime.device.loop import DeviceLoop
    from ddpm_deploy.runtime.tolerances import L3_TRAJECTORY_FP32_ATOL

    class OnCpuProvider(OrtCudaRunner):
        ort_device = "cpu"

    cpu = OrtRunner(random_micro_onnx)
    sched, shape = plan_for(cpu.card.diffusion, "ddpm", 6), cpu.sample_shape
    with OnCpuProvider(random_micro_onnx, gpu) as runner, DeviceLoop(runner, shape, 4, gpu) as loop:
        x4, timings = loop.sample(sched, 5, [0, 1, 2, 3])
        x3, _ = loop.sample(sched, 5, [0, 1, 2])  # partial last batch
        x4_again, _ = loop.sample(sched, 5, [0, 1, 2, 3])
        sessions = {b: s.get_inputs()[0].shape for b, (s, _) in runner._sessions.items()}
        bindings = len(runner._bindings)
        eps = runner.eps(*_probe(shape))

    assert sessions == {4: [4, *shape], 3: [3, *shape]}, sessions  # batch fixed per session
    assert bindings == 2 and timings.graph == "off"  # one binding per batch size, reused; no graphs on the CPU
    want = host_sample(cpu, sched, shape, 5, [0, 1, 2, 3])
    assert_close("device loop on ORT (batch-fixed sessions) vs host loop", x4, want, L3_TRAJECTORY_FP32_ATOL)
    np.testing.assert_array_equal(x4_again, x4)
    assert_close("partial batch vs the same images at batch 4", x3, x4[:3], L3_TRAJECTORY_FP32_ATOL)
    np.testing.assert_allclose(eps, cpu.eps(*_probe(shape)), rtol=0, atol=1e-5)


def _probe(shape):
    x = np.random.default_rng(3).normal(size=(5, *shape)).astype(np.float32)
    return x, np.array([0, 1, 500, 998, 999], np.int32)


def test_ort_cuda_capture_in_loop_rules_on_the_cpu_provider_stand_in(gpu, random_micro_onnx):
    """capture_in_loop turns ONNX Runtime's own graphs off (one graph owner) and offers the run to our graph only on
    our stream and with the batch fixed; without it the run is never offered."""
    from ddpm_deploy.runtime.backends.ort_cuda import OrtCudaRunner

    class OnCpuProvider(OrtCudaRunner):
        ort_device = "cpu"

    with OnCpuProvider(random_micro_onnx, gpu, cuda_graph=True, capture_in_loop=True) as runner:
        assert runner.cuda_graph is False and runner.capture_warmup == 2
        runner.same_stream = True  # the CPU provider takes no stream; on CUDA the provider reports it
        assert runner.capturable(gpu.stream)
        runner.static_batch = False  # a dynamic-batch session keeps shape nodes (Memcpy on CUDA): not offered
        assert not runner.capturable(gpu.stream)
        runner.static_batch, runner.same_stream = True, False
        assert not runner.capturable(gpu.stream)  # not on our stream: nothing to capture
    with OnCpuProvider(random_micro_onnx, gpu) as runner:
        runner.same_stream = True
        assert runner.cuda_graph is True and not runner.capturable(gpu.stream)
