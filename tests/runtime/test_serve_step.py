"""Step-level batching with the real Triton Inference Server (``ddpm_stream``, a decoupled Python-backend model):
requests sent staggered in time, with mixed step counts and schedulers, some cancelled, over gRPC streams and HTTP's
generate endpoint: every image that comes back equals `ddpm-run sample`'s bit for bit, and the server's own record
shows ε calls whose batch held images at different timesteps. Past the wait queue a request is refused at once;
a cancelled request frees its slot at the next step; stopping the server fails the requests in flight. No mocks."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from ddpm_deploy.runtime.errors import MissingDependencyError
from ddpm_deploy.runtime.serve.client import RequestFailed, TritonImages, stream_inputs
from ddpm_deploy.runtime.serve.repository import RepoSettings, read_parameters, write_repository
from ddpm_deploy.runtime.serve.server import TritonServer, find_triton, free_port, group_processes
from ddpm_deploy.verify.cli import main as run_cli

tritonclient_grpc = pytest.importorskip("tritonclient.grpc", reason="the serving tests need tritonclient[http,grpc]")
try:
    find_triton()
except MissingDependencyError as e:
    pytest.skip(f"no tritonserver: {e}", allow_module_level=True)

SEED = 11
DDPM_RUN = str(Path(sys.executable).with_name("ddpm-run"))
LONG = 1000  # ε calls of a request that is cancelled or outlives the test's patience (~1-3 s with the micro model)


def cli_sample(onnx, out, start, num, steps, scheduler=None):
    """Images of `ddpm-run sample` itself."""
    args = ["sample", "--onnx", str(onnx), "--seed", str(SEED), "--start-index", str(start), "--num", str(num),
            "--steps", str(steps), "--no-pngs", "--out", str(out)]
    r = CliRunner().invoke(run_cli, args + (["--scheduler", scheduler] if scheduler else []))
    assert r.exit_code == 0, r.output
    return np.load(out / "samples.npz")["images"]


def records(path: Path, kind: str = "t") -> list[dict]:
    """The server's record: its ε calls ("t"), or the requests it saw cancelled ("cancelled")."""
    lines = path.read_text().splitlines() if path.exists() else []
    return [r for r in map(json.loads, lines) if kind in r]


class Cancellable:
    """A request on its own gRPC stream, cancelled by closing the stream (``stop_stream(cancel_requests=True)``)."""

    def __init__(self, url, index, steps):
        self.answers: list = []
        self.client = tritonclient_grpc.InferenceServerClient(url)
        self.client.start_stream(callback=lambda result, error: self.answers.append((result, error)))
        self.client.async_stream_infer("ddpm_stream", stream_inputs(tritonclient_grpc, [SEED], [index], steps),
                                       enable_empty_final_response=True)

    def cancel(self):
        self.client.stop_stream(cancel_requests=True)
        self.client.close()


def wait_for(cond, timeout=60, what="the condition"):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def repo(random_micro_onnx, tmp_path_factory):
    return write_repository(random_micro_onnx, tmp_path_factory.mktemp("triton-step") / "repo",
                            RepoSettings(max_batch=4, threads=1, queue_size=16, batching="step"))


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    return tmp_path_factory.mktemp("triton-step-record") / "record.jsonl"


@pytest.fixture(scope="module")
def server(repo, record, tmp_path_factory):
    srv = TritonServer(repo, log_file=tmp_path_factory.mktemp("triton-step-log") / "tritonserver.log",
                       step_record=record)
    with srv:
        yield srv
    assert group_processes(srv.pgid) == []


def test_step_repository_layout(repo):
    cfg = (repo / "ddpm_stream" / "config.pbtxt").read_text()
    params = read_parameters(repo)

    assert (repo / "ddpm_stream" / "1" / "model.py").read_bytes() == (repo / "ddpm_sampler" / "1" / "model.py").read_bytes()
    assert "model_transaction_policy { decoupled: true }" in cfg and "max_batch_size: 0" in cfg
    assert 'key: "artifact" value { string_value: "../../ddpm_sampler/1/model.onnx" }' in cfg
    assert 'key: "slots" value { string_value: "4" }' in cfg and 'key: "queue_size" value { string_value: "16" }' in cfg
    assert params["batching"] == "step" and "dynamic_batching" not in cfg


def test_staggered_mixed_requests_some_cancelled_equal_ddpm_run_sample(server, record, random_micro_onnx, tmp_path):
    # (index, steps, scheduler, protocol, delay before sending in s); the two LONG ones are cancelled
    asks = [(0, 12, None, "grpc", 0.0), (1, 30, "ddim", "http", 0.02), (2, 9, "unipc", "grpc", 0.05),
            (3, 20, "dpmsolver++", "grpc", 0.1), (4, 14, "sde-dpmsolver++", "http", 0.12), (5, 40, None, "grpc", 0.2),
            (6, 25, "ddim", "grpc", 0.3)]
    before, cancelled_before = len(records(record)), len(records(record, "cancelled"))
    got, errors = {}, {}

    def one(ask):
        index, steps, sched, proto, delay = ask
        time.sleep(delay)
        url = server.grpc_url if proto == "grpc" else server.http_url
        with TritonImages(url, proto) as c:
            got[index] = c.request(SEED, [index], steps=steps, scheduler=sched)[0]

    def bad():
        time.sleep(0.08)
        with TritonImages(server.grpc_url, "grpc") as c:
            try:
                c.request(SEED, [9], steps=5000)
            except RequestFailed as e:
                errors["bad"] = str(e)

    cancelled = [Cancellable(server.grpc_url, 20, LONG), Cancellable(server.grpc_url, 21, LONG)]
    threads = [threading.Thread(target=one, args=(a,)) for a in asks] + [threading.Thread(target=bad)]
    for t in threads:
        t.start()
    time.sleep(0.15)
    for c in cancelled:
        c.cancel()
    for t in threads:
        t.join(120)

    assert sorted(got) == [a[0] for a in asks]
    assert "steps must be between 2 and 1000" in errors["bad"]
    for index, steps, sched, proto, _ in asks:
        want = cli_sample(random_micro_onnx, tmp_path / f"cli-{index}", index, 1, steps, sched)[0]
        np.testing.assert_array_equal(got[index], want, err_msg=f"index {index}: {sched} {steps} over {proto}")
    calls = records(record)[before:]
    per_job: dict[int, int] = {}
    for c in calls:
        for j in c["job"]:
            per_job[j] = per_job.get(j, 0) + 1
    mixed = [c for c in calls if len(set(c["t"])) > 1]
    assert mixed, "no ε call held images at different timesteps"
    print(f"{len(calls)} ε calls, {len(mixed)} with mixed timesteps; largest batch {max(len(c['t']) for c in calls)}")
    seen_cancelled = records(record, "cancelled")[cancelled_before:]
    assert len(seen_cancelled) == 2, f"the server saw {len(seen_cancelled)} of the 2 requests cancelled"
    assert all(per_job.get(c["cancelled"], 0) < LONG for c in seen_cancelled), f"a cancelled request ran: {per_job}"


DYING_CLIENT = r"""
import os, sys, time, tritonclient.grpc as g
from ddpm_deploy.runtime.serve.client import stream_inputs
c = g.InferenceServerClient(sys.argv[1])
c.start_stream(callback=lambda result, error: None)
c.async_stream_infer("ddpm_stream", stream_inputs(g, [1], [0], int(sys.argv[2])), enable_empty_final_response=True)
time.sleep(0.3)
os._exit(0)  # gone without closing its stream
"""


def test_a_grpc_client_that_dies_frees_its_slot(server, record):
    before = len(records(record, "cancelled"))

    subprocess.run([sys.executable, "-c", DYING_CLIENT, server.grpc_url, str(LONG)], check=True, timeout=60)
    wait_for(lambda: len(records(record, "cancelled")) > before, timeout=30, what="the server to see the client gone")

    gone = records(record, "cancelled")[before]["cancelled"]
    assert sum(c["job"].count(gone) for c in records(record)) < LONG


def test_ddpm_run_request_goes_through_the_step_model(server, random_micro_onnx, tmp_path):
    r = CliRunner().invoke(run_cli, ["request", "--url", f"grpc://{server.grpc_url}", "--seed", str(SEED),
                                     "--index", "3", "--num", "3", "--steps", "10", "--out", str(tmp_path / "served")])
    assert r.exit_code == 0, r.output
    run = json.loads((tmp_path / "served" / "run.json").read_text())
    ref = cli_sample(random_micro_onnx, tmp_path / "cli", 3, 3, 10)
    np.testing.assert_array_equal(np.load(tmp_path / "served" / "samples.npz")["images"], ref)
    assert run["timings"]["batching"] == "step"
    want = ref[[2, 0, 1]]
    for url, proto in ((server.grpc_url, "grpc"), (server.http_url, "http")):  # one request of k indices
        with TritonImages(url, proto) as c:
            np.testing.assert_array_equal(c.request(SEED, [5, 3, 4], steps=10), want, err_msg=proto)


def test_busy_past_the_queue_bound_and_a_cancelled_request_frees_its_slot(random_micro_onnx, tmp_path):
    repo = write_repository(random_micro_onnx, tmp_path / "repo",
                            RepoSettings(max_batch=1, threads=1, queue_size=1, batching="step"))
    record = tmp_path / "record.jsonl"
    with TritonServer(repo, step_record=record) as srv:
        a = Cancellable(srv.grpc_url, 0, LONG)  # takes the one slot
        try:
            wait_for(lambda: len(records(record)) >= 3, what="request a to start")
            b_images = {}

            def request_b():
                with TritonImages(srv.grpc_url, "grpc") as c:
                    b_images["x"] = c.request(SEED, [1], steps=10)

            b = threading.Thread(target=request_b)
            b.start()  # waits in the queue
            wait_for(lambda: records(record)[-1]["queued"] == 1, what="request b to queue")
            t0 = time.perf_counter()
            with pytest.raises(RequestFailed, match="the server is busy") as busy, \
                    TritonImages(srv.http_url, "http") as c:
                c.request(SEED, [2], steps=10)
            refused_in = time.perf_counter() - t0
        finally:
            a.cancel()
        b.join(60)
    assert group_processes(srv.pgid) == []

    calls = records(record)
    a_steps = next(i for i, c in enumerate(calls) if c["job"] != calls[0]["job"])
    assert refused_in < 2.0, f"the busy answer took {refused_in:.1f}s"
    assert "queue bound 1" in str(busy.value)
    assert a_steps < LONG, "request b started only after the cancelled request a would have finished"
    assert [c["cancelled"] for c in records(record, "cancelled")] == [calls[0]["job"][0]]
    assert [len(c["t"]) for c in calls[a_steps:]] == [1] * 10 and len(b_images["x"]) == 1
    np.testing.assert_array_equal(b_images["x"], cli_sample(random_micro_onnx, tmp_path / "cli", 1, 1, 10))


def ready(port, proc) -> bool:
    assert proc.poll() is None, proc.stderr.read()
    for model in ("ddpm", "ddpm_stream"):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/models/{model}/ready", timeout=2) as r:
                if r.status != 200:
                    return False
        except OSError:
            return False
    return True


def test_sigterm_to_ddpm_run_serve_fails_the_requests_in_flight_and_leaves_no_process(random_micro_onnx, tmp_path):
    http, grpc, metrics = free_port(), free_port(), free_port()
    record = tmp_path / "record.jsonl"
    proc = subprocess.Popen([DDPM_RUN, "serve", "--onnx", str(random_micro_onnx), "--http-port", str(http),
                             "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--max-batch", "2",
                             "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, "DDPM_SERVE_STEP_RECORD": str(record)})
    outcome = {}

    def one(i, proto):
        url = f"127.0.0.1:{grpc if proto == 'grpc' else http}"
        try:
            with TritonImages(url, proto, timeout=60) as c:
                c.request(SEED, [i], steps=LONG)
            outcome[i] = "finished"
        except RequestFailed as e:
            outcome[i] = str(e)

    try:
        wait_for(lambda: ready(http, proc), timeout=120, what="ddpm-run serve to be ready")
        threads = [threading.Thread(target=one, args=(i, "grpc" if i % 2 else "http")) for i in range(4)]
        for t in threads:
            t.start()
        wait_for(lambda: any(c["queued"] == 2 and len(c["t"]) == 2 for c in records(record)),
                 what="all four requests to reach the server (two sampling, two waiting)")
        t0 = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        stopped_in = time.perf_counter() - t0
        for t in threads:
            t.join(60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    triton_pid = int(re.search(r"tritonserver pid (\d+)", err).group(1))
    assert proc.returncode == 0 and "tritonserver stopped (exit status 0)" in err, err
    assert group_processes(triton_pid) == [] and group_processes(proc.pid) == []
    assert len(outcome) == 4 and all("the server is shutting down" in v for v in outcome.values()), outcome
    assert stopped_in < 15, f"stopping took {stopped_in:.1f}s"
