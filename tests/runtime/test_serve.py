"""Serving with the real Triton Inference Server (the nvidia-pytriton wheel's tritonserver) on 127.0.0.1: concurrent
HTTP and gRPC clients get exactly `ddpm-run sample`'s images, Triton forms batches > 1, bad requests fail and the
server keeps serving, a garbage model fails to load, and stopping leaves no process behind. No mocks."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from ddpm_deploy import Sampler
from ddpm_deploy.runtime.errors import MissingDependencyError
from ddpm_deploy.runtime.serve.client import TritonImages, make_inputs
from ddpm_deploy.runtime.serve.repository import RepoSettings, read_parameters, write_repository
from ddpm_deploy.runtime.serve.server import ServerError, TritonServer, find_triton, free_port, group_processes
from ddpm_deploy.export.cli import main as export_cli
from ddpm_deploy.verify.cli import main as run_cli
from helpers import run_without_torch

tritonclient_http = pytest.importorskip("tritonclient.http", reason="the serving tests need tritonclient[http,grpc]")
tritonclient_grpc = pytest.importorskip("tritonclient.grpc", reason="the serving tests need tritonclient[http,grpc]")
try:
    find_triton()
except MissingDependencyError as e:
    pytest.skip(f"no tritonserver: {e}", allow_module_level=True)

SEED, STEPS = 5, 10
DDPM_RUN = str(Path(sys.executable).with_name("ddpm-run"))


def cli_sample(onnx, tmp_path, seed, start, num, steps=STEPS):
    """Images of `ddpm-run sample` itself."""
    out = tmp_path / f"cli-{seed}-{start}-{num}"
    r = CliRunner().invoke(run_cli, ["sample", "--onnx", str(onnx), "--seed", str(seed), "--start-index", str(start),
                                     "--num", str(num), "--steps", str(steps), "--no-pngs", "--out", str(out)])
    assert r.exit_code == 0, r.output
    return np.load(out / "samples.npz")["images"]


def reference(onnx, seed, indices, steps=STEPS):
    """The Python API's images (equal to `ddpm-run sample`'s: tests/test_api.py)."""
    with Sampler.from_onnx(onnx, threads=1) as s:
        return np.concatenate([s(1, seed=seed, start_index=int(i), steps=steps) for i in indices])


def assert_no_process_left(server: TritonServer):
    assert server.proc is not None and server.proc.poll() is not None
    assert group_processes(server.pgid) == [], "tritonserver or a Python-backend stub is still running"


@pytest.fixture(scope="module")
def repo(random_micro_onnx, tmp_path_factory):
    # a 50 ms batching window: concurrent requests of a 2-core CI machine reliably meet in one batch; request-level
    # batching (ddpm only: these tests are about Triton's dynamic batcher; test_serve_step.py tests ddpm_stream)
    return write_repository(random_micro_onnx, tmp_path_factory.mktemp("triton") / "repo",
                            RepoSettings(max_batch=8, queue_delay_us=50_000, threads=1, batching="request"))


@pytest.fixture(scope="module")
def server(repo, tmp_path_factory):
    srv = TritonServer(repo, log_file=tmp_path_factory.mktemp("triton-log") / "tritonserver.log")
    with srv:
        yield srv
    assert_no_process_left(srv)


def test_the_model_runs_on_this_environments_numpy(server):
    """The stub imports this environment's NumPy (2.x in CI), not its base interpreter's: outputs go by DLPack, which
    the bundled Python backend handles under NumPy 2 (its NumPy bridge does not)."""
    log = server.log_path.read_text(errors="replace")
    assert f"with numpy {np.__version__} from {os.path.realpath(os.path.dirname(np.__file__))}," in log, log[-3000:]


def stats(server) -> dict[int, int]:
    with urllib.request.urlopen(f"http://{server.http_url}/v2/models/ddpm_sampler/stats", timeout=10) as r:
        body = json.load(r)
    return {b["batch_size"]: b["compute_infer"]["count"] for b in body["model_stats"][0]["batch_stats"]}


def test_repository_layout(repo, random_micro_onnx):
    files = sorted(str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    params = read_parameters(repo)
    cfg = (repo / "ddpm" / "config.pbtxt").read_text()

    sampler = (repo / "ddpm_sampler" / "config.pbtxt").read_text()

    assert files == ["ddpm/config.pbtxt", "ddpm_sampler/1/model.onnx", "ddpm_sampler/1/model.py",
                     "ddpm_sampler/config.pbtxt"]
    assert (repo / "ddpm").is_dir() and list((repo / "ddpm" / "1").iterdir()) == []
    assert (repo / "ddpm_sampler/1/model.onnx").read_bytes() == Path(random_micro_onnx).read_bytes()
    assert params["artifact"] == "model.onnx" and params["num_timesteps"] == "1000"
    assert json.loads(params["diffusion"])["schedule"] == "linear"
    assert 'platform: "ensemble"' in cfg and "max_batch_size: 8" in cfg
    assert "max_batch_size: 8" in sampler and "KIND_CPU" in sampler and "max_queue_delay_microseconds: 50000" in sampler


def test_concurrent_http_and_grpc_clients_get_sample_images_bit_for_bit(server, random_micro_onnx, tmp_path):
    before = stats(server)
    indices = list(range(12))
    with TritonImages(server.http_url, "http") as h, TritonImages(server.grpc_url, "grpc") as g:
        # two different mixes at once: the same (seed, index) lands in different batches
        with ThreadPoolExecutor(2) as pool:
            fh = pool.submit(h.fetch, SEED, indices, STEPS, 6)
            fg = pool.submit(g.fetch, SEED, indices[::-1] + [100, 101], STEPS, 8)
            http, grpc = fh.result(), fg.result()
    after = stats(server)

    ref = np.concatenate([cli_sample(random_micro_onnx, tmp_path, SEED, 0, 12),
                          cli_sample(random_micro_onnx, tmp_path, SEED, 100, 2)])
    np.testing.assert_array_equal(http.images, ref[:12])
    np.testing.assert_array_equal(grpc.images, np.concatenate([ref[:12][::-1], ref[12:]]))
    batched = {b: n - before.get(b, 0) for b, n in after.items() if b > 1 and n > before.get(b, 0)}
    assert batched, f"Triton formed no batch > 1: {after}"
    print("batches formed (size: count):", batched)


def test_request_batch_of_several_images_equals_single_requests(server, random_micro_onnx):
    with TritonImages(server.http_url) as c:
        many = c.request(SEED, [3, 4, 7], steps=STEPS)
    np.testing.assert_array_equal(many, reference(random_micro_onnx, SEED, [3, 4, 7]))


def test_requests_with_schedulers_mixed_in_one_batch_equal_local_sampling(server, random_micro_onnx):
    """Concurrent requests of different schedulers and step counts (Triton batches them into one execute; the model
    steps them in one loop, each image with its own plan): every image equals the Python API's."""
    asks = [(None, 10), ("ddim", 10), ('{"scheduler": "ddim", "options": {"eta": 1.0}}', 6), ("dpmsolver++", 8),
            ("sde-dpmsolver++", 5), ("unipc", 7)]

    def one(ask):
        sched, steps = ask
        with TritonImages(server.http_url) as c:
            return c.request(SEED, [2], steps=steps, scheduler=sched)

    with ThreadPoolExecutor(len(asks)) as pool:
        got = list(pool.map(one, asks))

    import json as _json

    with Sampler.from_onnx(random_micro_onnx, threads=1) as s:
        for (sched, steps), img in zip(asks, got):
            opts = {}
            if sched and sched.startswith("{"):
                spec = _json.loads(sched)
                sched, opts = spec["scheduler"], spec["options"]
            want = s(1, seed=SEED, start_index=2, steps=steps, scheduler=sched, **opts)
            np.testing.assert_array_equal(img, want, err_msg=f"{sched} {steps}")


def _raw_infer(server, inputs):
    c = tritonclient_http.InferenceServerClient(server.http_url)
    try:
        return c.infer("ddpm", inputs)
    finally:
        c.close()


def _inp(name, arr, dtype):
    i = tritonclient_http.InferInput(name, list(arr.shape), dtype)
    i.set_data_from_numpy(arr)
    return i


@pytest.mark.parametrize("case,inputs,message", [
    ("missing index", lambda: [_inp("seed", np.array([[1]], np.uint64), "UINT64")], "index"),
    ("wrong dtype", lambda: [_inp("seed", np.array([[1]], np.int32), "INT32"),
                             _inp("index", np.array([[0]], np.int64), "INT64")], "seed"),
    ("wrong shape", lambda: [_inp("seed", np.array([[1, 2]], np.uint64), "UINT64"),
                             _inp("index", np.array([[0, 1]], np.int64), "INT64")], "shape"),
    ("negative index", lambda: make_inputs(tritonclient_http, [1], [-1], STEPS), "index must be in [0, 4294967295]"),
    ("steps too small", lambda: make_inputs(tritonclient_http, [1], [0], 1), "steps must be between 2 and 1000"),
    ("steps too large", lambda: make_inputs(tritonclient_http, [1], [0], 5000), "steps must be between 2 and 1000"),
    ("unknown scheduler", lambda: make_inputs(tritonclient_http, [1], [0], 10, "euler"), "unknown scheduler 'euler'"),
    ("option it does not take", lambda: make_inputs(tritonclient_http, [1], [0], 10,
                                                    '{"scheduler": "ddim", "options": {"solver_order": 2}}'),
     "DDIMScheduler does not take solver_order"),
])
def test_bad_requests_fail_and_the_server_keeps_serving(server, random_micro_onnx, case, inputs, message):
    with pytest.raises(tritonclient_http.InferenceServerException) as err:
        _raw_infer(server, inputs())
    assert message in str(err.value), f"{case}: {err.value}"

    with TritonImages(server.http_url) as c:
        np.testing.assert_array_equal(c.request(SEED, [0], STEPS), reference(random_micro_onnx, SEED, [0]))


def test_garbage_model_fails_to_load_and_the_loaded_one_keeps_serving(random_micro_onnx, tmp_path):
    repo = write_repository(random_micro_onnx, tmp_path / "repo", RepoSettings(max_batch=4, threads=1))
    # Triton counts the failed version as a live model until its exit timeout: keep that short here
    with TritonServer(repo, exit_timeout=2) as srv:
        (repo / "ddpm_sampler/1/model.onnx").write_bytes(b"garbage, not an ONNX model" * 10)
        req = urllib.request.Request(f"http://{srv.http_url}/v2/repository/models/ddpm_sampler/load", method="POST",
                                     data=b"")
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=120)
        body = err.value.read().decode()
        err.value.close()  # an open HTTP connection would hold the server's shutdown for its exit timeout
        with TritonImages(srv.grpc_url, "grpc") as c:
            served = c.request(SEED, [1], STEPS)
    assert_no_process_left(srv)

    assert "ddpm: cannot load model.onnx" in body, body
    np.testing.assert_array_equal(served, reference(random_micro_onnx, SEED, [1]))


def test_garbage_model_at_start_is_a_clean_error_and_leaves_no_process(random_micro_onnx, tmp_path):
    repo = write_repository(random_micro_onnx, tmp_path / "repo", RepoSettings(threads=1))
    (repo / "ddpm_sampler/1/model.onnx").write_bytes(b"\x00garbage" * 64)
    srv = TritonServer(repo)

    with pytest.raises(ServerError, match="exited with status") as err:
        srv.start(timeout=120)

    assert "ddpm: cannot load model.onnx" in str(err.value)
    assert_no_process_left(srv)


def _wait_ready(port, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/models/ddpm/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    raise AssertionError("ddpm-run serve did not become ready")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_ddpm_run_serve_and_request_then_a_signal_stops_everything(random_micro_onnx, tmp_path, sig):
    http, grpc, metrics = free_port(), free_port(), free_port()
    proc = subprocess.Popen([DDPM_RUN, "serve", "--onnx", str(random_micro_onnx), "--http-port", str(http),
                             "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--max-batch", "4",
                             "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _wait_ready(http, proc)
        url = "grpc://127.0.0.1:%d" % grpc if sig == signal.SIGINT else "http://127.0.0.1:%d" % http
        r = CliRunner().invoke(run_cli, ["request", "--url", url, "--seed", str(SEED), "--index", "2", "--num", "3",
                                         "--steps", str(STEPS), "--out", str(tmp_path / "served")])
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    assert r.exit_code == 0, r.output
    got = np.load(tmp_path / "served" / "samples.npz")
    np.testing.assert_array_equal(got["images"], reference(random_micro_onnx, SEED, [2, 3, 4]))
    np.testing.assert_array_equal(got["indices"], [2, 3, 4])
    run = json.loads((tmp_path / "served" / "run.json").read_text())
    assert run["loop"] == "served" and run["steps"] == STEPS
    assert proc.returncode == 0, err
    triton_pid = int(re.search(r"tritonserver pid (\d+)", err).group(1))
    assert "tritonserver stopped (exit status 0)" in err
    assert group_processes(triton_pid) == [] and group_processes(proc.pid) == []


def test_export_triton_repo_from_an_onnx_file_needs_no_torch(random_micro_onnx, tmp_path):
    r = run_without_torch(f"""
from ddpm_deploy.export.cli import main
import sys
sys.argv = ["ddpm-export", {str(random_micro_onnx)!r}, "--triton-repo", {str(tmp_path / "r")!r},
            "--triton-instances", "2", "--triton-max-batch", "4"]
try:
    main()
except SystemExit as e:
    assert e.code in (0, None), e.code
assert "torch" not in sys.modules
""")

    assert r.returncode == 0, r.stderr[-2000:]
    cfg = (tmp_path / "r" / "ddpm_sampler" / "config.pbtxt").read_text()
    assert "count: 2 kind: KIND_CPU" in cfg and "max_batch_size: 4" in cfg


def test_a_plan_is_refused_on_cpu_instances(tmp_path):
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"x")
    r = CliRunner().invoke(run_cli, ["serve", "--engine", str(plan), "--kind", "cpu", "--http-port", "0"])
    assert r.exit_code == 2 and "runs on a GPU only" in r.output


# --- a bad input is the client's error: HTTP 400, gRPC INVALID_ARGUMENT, counted as a failure -----------------------

def _metric(server, name: str, model: str = "ddpm") -> float:
    with urllib.request.urlopen(f"http://{server.host}:{server.metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines()
               if ln.startswith(name + "{") and f'model="{model}"' in ln)


def _json_infer(server, inputs: list[dict]) -> tuple[int, str]:
    body = json.dumps({"inputs": inputs}).encode()
    req = urllib.request.Request(f"http://{server.http_url}/v2/models/ddpm/infer", data=body,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.read().decode()


def _t(name, dtype, data, shape=None):
    return {"name": name, "datatype": dtype, "shape": shape or [len(data), 1], "data": data}


SEED_IN = _t("seed", "UINT64", [1])
SCHED_EULER = list(b"euler") + [0] * (1024 - 5)
CLIENT_ERRORS = {
    "steps too large": ([SEED_IN, _t("index", "INT64", [0]), _t("steps", "INT32", [5000])], "steps must be between"),
    "steps zero": ([SEED_IN, _t("index", "INT64", [0]), _t("steps", "INT32", [0])], "steps must be between"),
    "negative index": ([SEED_IN, _t("index", "INT64", [-1])], "index must be in [0, 4294967295]"),
    "one negative index of a batch": ([_t("seed", "UINT64", [1, 1]), _t("index", "INT64", [0, -3])], "found -3"),
    "unknown scheduler": ([SEED_IN, _t("index", "INT64", [0]), _t("scheduler", "UINT8", SCHED_EULER, [1, 1024])],
                          "unknown scheduler 'euler'"),
    "missing index": ([SEED_IN], "index"),
    "wrong dtype": ([_t("seed", "INT32", [1]), _t("index", "INT64", [0])], "seed"),
    "wrong shape": ([_t("seed", "UINT64", [1, 2], [1, 2]), _t("index", "INT64", [0, 1], [1, 2])], "shape"),
    "unknown input": ([SEED_IN, _t("index", "INT64", [0]), _t("bogus", "INT32", [1])], "bogus"),
    "scheduler too short": ([SEED_IN, _t("index", "INT64", [0]), _t("scheduler", "UINT8", [100], [1, 1])], "scheduler"),
}


# refused by Triton itself before any model runs (Triton 2.51 counts these nowhere, success or failure)
CHECKED_BY_TRITON = {"missing index", "wrong dtype", "wrong shape", "unknown input", "scheduler too short"}


@pytest.mark.parametrize("case", list(CLIENT_ERRORS))
def test_a_bad_input_is_http_400_and_counted_as_a_failure(server, case):
    inputs, message = CLIENT_ERRORS[case]
    fail0, ok0 = _metric(server, "nv_inference_request_failure"), _metric(server, "nv_inference_request_success")

    code, body = _json_infer(server, inputs)

    assert code == 400, f"{case}: HTTP {code} {body}"
    assert message in body, body
    time.sleep(2.5)  # Triton refreshes the metrics endpoint every 2 s
    fails = _metric(server, "nv_inference_request_failure") - fail0
    if case in CHECKED_BY_TRITON:
        assert fails == 0
    else:  # counted by the ensemble `ddpm` (Triton 2.51 counts a failed ensemble step twice)
        assert fails >= 1
    assert _metric(server, "nv_inference_request_success") == ok0


@pytest.mark.parametrize("steps,scheduler,message", [(5000, None, "steps must be between"),
                                                     (10, "euler", "unknown scheduler 'euler'")])
def test_a_bad_input_is_grpc_invalid_argument(server, steps, scheduler, message):
    c = tritonclient_grpc.InferenceServerClient(server.grpc_url)
    try:
        with pytest.raises(tritonclient_grpc.InferenceServerException) as err:
            c.infer("ddpm", make_inputs(tritonclient_grpc, [1], [0], steps, scheduler))
    finally:
        c.close()
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT", err.value
    assert message in err.value.message()


def test_a_good_request_is_counted_as_a_success_and_the_metadata_shows_the_documented_shapes(server):
    ok0 = _metric(server, "nv_inference_request_success")
    code, body = _json_infer(server, [_t("seed", "UINT64", [1, 1]), _t("index", "INT64", [0, 1]),
                                      _t("steps", "INT32", [3, 3])])
    assert code == 200, body
    assert json.loads(body)["outputs"][0]["shape"] == [2, 8, 8, 1]
    time.sleep(2.5)
    assert _metric(server, "nv_inference_request_success") == ok0 + 1

    with urllib.request.urlopen(f"http://{server.http_url}/v2/models/ddpm", timeout=10) as r:
        meta = json.load(r)
    shapes = {t["name"]: (t["datatype"], t["shape"]) for t in meta["inputs"] + meta["outputs"]}
    assert shapes == {"seed": ("UINT64", [-1, 1]), "index": ("INT64", [-1, 1]), "steps": ("INT32", [-1, 1]),
                      "scheduler": ("UINT8", [-1, 1024]), "image": ("UINT8", [-1, 8, 8, 1])}
    help_text = CliRunner().invoke(run_cli, ["serve", "--help"]).output
    for name, (dtype, shape) in shapes.items():
        assert f"{name:<10} {dtype:<6} [{', '.join(map(str, shape))}]" in help_text or \
            f"{name} {dtype} [{', '.join(map(str, shape[:1]))}, H, W, C]" in help_text, name


# --- a server never outlives its `ddpm-run serve` ----------------------------------------------------------------

def _start_serve(onnx, tmp_path, *extra):
    return _start_serve_args(tmp_path, "--onnx", str(onnx), *extra)


def _start_serve_args(tmp_path, *args):
    """`ddpm-run serve ARGS` as a real subprocess (its own session, TMPDIR in tmp_path); returns (proc, stderr
    file, triton pid, ports, its /dev/shm regions, TMPDIR) once it says it is serving."""
    from ddpm_deploy.runtime.serve._watchdog import shm_regions

    ports = free_port(), free_port(), free_port()
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir(exist_ok=True)
    err = tmp_path / f"serve-{time.monotonic_ns()}.err"
    with open(err, "w") as f:
        proc = subprocess.Popen([DDPM_RUN, "serve", "--http-port", str(ports[0]), "--grpc-port", str(ports[1]),
                                 "--metrics-port", str(ports[2]), "--threads", "1", *args],
                                stdout=subprocess.DEVNULL, stderr=f, start_new_session=True,
                                env={**os.environ, "TMPDIR": str(tmpdir)})
    deadline = time.monotonic() + 120
    while "tritonserver pid" not in err.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, err.read_text()
        time.sleep(0.2)
    pid = int(re.search(r"tritonserver pid (\d+)", err.read_text()).group(1))
    from ddpm_deploy.runtime.serve._watchdog import group_processes as group

    return proc, err, pid, ports, shm_regions(group(pid)), tmpdir


def _wait_gone(pid, ports, regions, tmpdir, timeout=60):
    from ddpm_deploy.runtime.serve.server import port_busy

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = {"processes": group_processes(pid), "ports": [p for p in ports if port_busy("127.0.0.1", p)],
                "shm": [r for r in regions if os.path.exists(r)],
                "tmp": sorted(n for n in os.listdir(tmpdir) if n.startswith("ddpm-"))}
        if not any(left.values()):
            return
        time.sleep(0.3)
    raise AssertionError(f"left behind after {timeout}s: {left}")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGHUP, signal.SIGTERM, signal.SIGINT],
                         ids=["SIGKILL", "SIGHUP", "SIGTERM", "SIGINT"])
def test_no_server_outlives_ddpm_run_serve(random_micro_onnx, tmp_path, sig):
    """Whatever ends `ddpm-run serve`, tritonserver and its Python-backend stub end too, the ports are free again,
    and the temporary folders and the backend's /dev/shm regions are gone."""
    proc, err, pid, ports, regions, tmpdir = _start_serve(random_micro_onnx, tmp_path)
    try:
        assert group_processes(pid), "tritonserver is not running"
        assert len(group_processes(pid)) >= 2, "no Python-backend stub in the server's group"
        assert regions, "the Python backend mapped no /dev/shm region"
        assert [n for n in os.listdir(tmpdir) if n.startswith("ddpm-")], "no temporary folder"
        with TritonImages(f"127.0.0.1:{ports[0]}") as c:
            assert c.request(SEED, [0], 3).shape == (1, 8, 8, 1)
        proc.send_signal(sig)
        proc.wait(60)
        _wait_gone(pid, ports, regions, tmpdir)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        from ddpm_deploy.runtime.serve._watchdog import end_group

        end_group(pid, 0)
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
    else:
        assert proc.returncode == 0, err.read_text()
        assert f"stopping tritonserver ({signal.Signals(sig).name})" in err.read_text()
        assert "tritonserver stopped (exit status 0)" in err.read_text()


def test_a_second_server_on_busy_ports_fails_before_it_says_it_is_serving(random_micro_onnx, tmp_path):
    proc, err, pid, ports, regions, tmpdir = _start_serve(random_micro_onnx, tmp_path)
    try:
        for i, flag in enumerate(["--http-port", "--grpc-port", "--metrics-port"]):
            args = ["--http-port", str(free_port()), "--grpc-port", str(free_port()), "--metrics-port", str(free_port())]
            args[2 * i + 1] = str(ports[i])
            r = subprocess.run([DDPM_RUN, "serve", "--onnx", str(random_micro_onnx), *args], capture_output=True,
                               text=True, timeout=120)
            assert r.returncode == 2, r.stderr
            assert "serving model" not in r.stderr and "Traceback" not in r.stderr
            lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
            assert lines == [f"error: {flag} {ports[i]}: 127.0.0.1:{ports[i]} is already in use; stop that server or "
                             f"choose another port (0: a free one)"], r.stderr
        with TritonImages(f"127.0.0.1:{ports[0]}") as c:  # the first one still serves
            assert c.request(SEED, [0], 3).shape == (1, 8, 8, 1)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    _wait_gone(pid, ports, regions, tmpdir)


def test_a_server_that_loses_a_port_race_is_refused_before_serving(repo):
    """Ports checked free, then taken by someone else before tritonserver binds them: the server that answers on
    the port is not ours, so start() fails instead of saying it serves."""
    with TritonServer(repo) as first:
        second = TritonServer(repo)
        second.http_port = first.http_port  # as if taken between the check and the start
        with pytest.raises(ServerError, match=f"--http-port {first.http_port}: another process listens"):
            second.start(timeout=120)
        assert_no_process_left(second)


def test_serve_repo_applies_instances_max_batch_and_defaults_to_a_copy(random_micro_onnx, tmp_path):
    """`ddpm-run serve --repo R --instances 2 --max-batch 3 --steps 4 --scheduler ddim` serves R with those settings
    (a temporary copy: R keeps its bytes); a request without steps/scheduler gets ddim in 4 steps."""
    from reliability.harness import snapshot

    repo = tmp_path / "repo"
    r = CliRunner().invoke(export_cli, [str(random_micro_onnx), "--triton-repo", str(repo), "--triton-steps", "6"])
    assert r.exit_code == 0, r.output
    before = snapshot(repo)
    proc, err, pid, ports, regions, tmpdir = _start_serve_args(
        tmp_path, "--repo", str(repo), "--instances", "2", "--max-batch", "3", "--steps", "4", "--scheduler", "ddim")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{ports[0]}/v2/models/ddpm_sampler/config", timeout=10) as f:
            cfg = json.load(f)
        with urllib.request.urlopen(f"http://127.0.0.1:{ports[0]}/v2/models/ddpm/config", timeout=10) as f:
            ens = json.load(f)
        with TritonImages(f"127.0.0.1:{ports[0]}") as c:
            got = c.request(SEED, [1])
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    _wait_gone(pid, ports, regions, tmpdir)

    assert cfg["instance_group"][0]["count"] == 2 and cfg["max_batch_size"] == 3 and ens["max_batch_size"] == 3
    assert cfg["parameters"]["default_steps"]["string_value"] == "4"
    assert ens["parameters"]["default_scheduler"]["string_value"] == "ddim"
    assert snapshot(repo) == before
    with Sampler.from_onnx(random_micro_onnx, threads=1) as s:
        np.testing.assert_array_equal(got, s(1, seed=SEED, start_index=1, steps=4, scheduler="ddim"))


def test_served_precision_bands_equal_the_api_and_int8_travels_with_the_repository(random_micro_onnx, tmp_path):
    """A repository written with a CPU precision serves it (OpenVINO, here precision bands) through both models:
    the images equal Sampler.from_onnx(precision=...) bit for bit; an int8 precision copies the int8 model beside
    the ONNX into the repository, or is refused before anything is written when there is none."""
    pytest.importorskip("openvino")
    from ddpm_deploy.runtime.errors import ArtifactError, ConfigError
    from ddpm_deploy.runtime.serve.repository import repository_files

    bands = "fp32:0-499,bf16:500-999"
    repo = write_repository(random_micro_onnx, tmp_path / "repo", RepoSettings(max_batch=4, threads=1,
                                                                             precision=bands))
    assert read_parameters(repo)["cpu_precision"] == bands
    with TritonServer(repo) as srv:
        with TritonImages(srv.grpc_url, "grpc") as c:
            served = c.request(SEED, [0, 1], STEPS)
    assert_no_process_left(srv)
    with Sampler.from_onnx(random_micro_onnx, threads=1, precision=bands) as s:
        np.testing.assert_array_equal(served, s(2, seed=SEED, steps=STEPS))

    with pytest.raises(ArtifactError, match="model.int8.xml"):
        write_repository(random_micro_onnx, tmp_path / "repo8", RepoSettings(precision="int8-bf16"))
    assert not (tmp_path / "repo8").exists()
    with pytest.raises(ConfigError, match="kind cpu"):
        RepoSettings(kind="gpu", precision="bf16")
    fake = tmp_path / "m" / "model.onnx"
    fake.parent.mkdir()
    for name in ("model.onnx", "model.int8.xml", "model.int8.bin", "precision.int8.json"):
        (fake.parent / name).write_bytes(b"x")
    names = {p.name for p in repository_files(tmp_path / "r", fake, "request", "bf16:0-99,int8:100-999")}
    assert {"model.int8.xml", "model.int8.bin", "precision.int8.json"} <= names
    assert "model.int8.xml" not in {p.name for p in repository_files(tmp_path / "r", fake, "request", "bf16")}
