"""Bad inputs to `ddpm-run serve`, `ddpm-run request` and `ddpm-export --triton-repo`.

Same contract as every corpus case (harness.py): exit 2, one `error:` line naming the thing at fault, no traceback,
every file that existed before keeps its bytes, no temporary file left. `serve` cases run in-process with
``DDPM_TRITONSERVER`` pointing at a fake server that records being started: a refused `serve` must refuse before
any server starts. `request` cases that need a server talk to one real tritonserver (module fixture).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
from pathlib import Path

import numpy as np
import pytest

from reliability.harness import assert_kept, assert_ok, assert_user_error, disk_full, invoke, snapshot


@pytest.fixture(scope="module")
def model(random_micro_onnx, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("serve_faults_model")
    shutil.copy(random_micro_onnx, d / "model.onnx")
    return d / "model.onnx"


@pytest.fixture(scope="module")
def good_repo(model, tmp_path_factory) -> Path:
    r = tmp_path_factory.mktemp("serve_faults_repo") / "repo"
    assert_ok(invoke("ddpm-export", model, "--triton-repo", r, "--triton-max-batch", 4))
    return r


@pytest.fixture()
def busy():
    """A port some process listens on (this one)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        yield s.getsockname()[1]


@pytest.fixture()
def fake_server(tmp_path) -> tuple[Path, Path]:
    """(an executable standing in for tritonserver that records its start and exits 1, its record)."""
    mark = tmp_path / "started"
    exe = tmp_path / "fake-tritonserver"
    exe.write_text(f"#!/bin/sh\ntouch {mark}\nexit 1\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return exe, mark


def _sampler(repo: Path) -> Path:
    """The Python-backend model's folder (ddpm_sampler; ddpm in repositories written before the ensemble)."""
    return repo / "ddpm_sampler" if (repo / "ddpm_sampler").is_dir() else repo / "ddpm"


def _w(tmp_path: Path, model: Path, good_repo: Path) -> Path:
    w = tmp_path / "w"
    w.mkdir()
    (w / "empty").mkdir()
    (w / "other" / "resnet").mkdir(parents=True)
    (w / "other" / "resnet" / "config.pbtxt").write_text('name: "resnet"\n')
    (w / "noconfig" / "ddpm").mkdir(parents=True)
    (w / "garbage.onnx").write_bytes(b"\0garbage" * 64)
    (w / "zeros.npz").write_bytes(b"\0" * 64)
    (w / "afile").write_text("not a folder")
    (w / "bare.plan").write_bytes(b"ftrt" + os.urandom(200))
    shutil.copytree(good_repo, w / "repo")
    shutil.copytree(good_repo, w / "reqrepo", ignore=shutil.ignore_patterns("ddpm_stream"))  # request-level only
    shutil.copytree(good_repo, w / "edited")
    cfg = _sampler(w / "edited") / "config.pbtxt"
    cfg.write_text("\n".join(ln for ln in cfg.read_text().splitlines() if not ln.startswith("instance_group")) + "\n")
    (w / "sched.json").write_text('{"not": "a scheduler"}')
    return w


SERVE = {
    # ports: range, distinct, free; all before anything starts
    "http-port-negative": (["--http-port", "-1"], "--http-port"),
    "http-port-too-large": (["--http-port", "65536"], "--http-port"),
    "grpc-port-too-large": (["--grpc-port", "70000"], "--grpc-port"),
    "metrics-port-negative": (["--metrics-port", "-5"], "--metrics-port"),
    "http-equals-grpc": (["--http-port", "18123", "--grpc-port", "18123"], "--grpc-port"),
    "http-equals-metrics": (["--http-port", "18124", "--metrics-port", "18124"], "--metrics-port"),
    "grpc-equals-metrics": (["--grpc-port", "18125", "--metrics-port", "18125"], "--metrics-port"),
    "http-port-busy": (["--http-port", "{busy}"], "--http-port {busy}"),
    "grpc-port-busy": (["--grpc-port", "{busy}"], "--grpc-port {busy}"),
    "metrics-port-busy": (["--metrics-port", "{busy}"], "--metrics-port {busy}"),
    "http-port-busy-with-repo": (["--repo", "{w}/repo", "--http-port", "{busy}"], "--http-port {busy}"),
    "http-port-busy-with-repo-options": (["--repo", "{w}/repo", "--instances", "2", "--http-port", "{busy}"],
                                         "--http-port {busy}"),
    "http-port-not-a-number": (["--http-port", "eighty"], "--http-port"),
    "host-not-an-address": (["--host", "999.1.1.1", "--http-port", "18126"], "--host"),
    # the repository
    "repo-missing": (["--repo", "{w}/missing"], "{w}/missing"),
    "repo-empty": (["--repo", "{w}/empty"], "ddpm/config.pbtxt"),
    "repo-without-ddpm": (["--repo", "{w}/other"], "ddpm/config.pbtxt"),
    "repo-ddpm-without-config": (["--repo", "{w}/noconfig"], "ddpm/config.pbtxt"),
    "repo-is-a-file": (["--repo", "{w}/afile"], "afile"),
    "repo-and-onnx": (["--repo", "{w}/repo", "--onnx", "{model}"], "--onnx"),
    "repo-and-engine": (["--repo", "{w}/repo", "--engine", "{w}/bare.plan"], "--engine"),
    "repo-steps-out-of-range": (["--repo", "{w}/repo", "--steps", "5000"], "5000"),
    "repo-steps-one-for-ddpm": (["--repo", "{w}/repo", "--steps", "1"], "steps"),
    "repo-unknown-scheduler": (["--repo", "{w}/repo", "--scheduler", "euler"], "euler"),
    "repo-scheduler-bad-json": (["--repo", "{w}/repo", "--scheduler", "{{bad"], "JSON"),
    "repo-scheduler-bad-option": (["--repo", "{w}/repo", "--scheduler",
                                   '{{"scheduler": "ddim", "options": {{"solver_order": 2}}}}'], "solver_order"),
    "repo-instances-zero": (["--repo", "{w}/repo", "--instances", "0"], "--instances"),
    "repo-max-batch-zero": (["--repo", "{w}/repo", "--max-batch", "0"], "--max-batch"),
    "repo-threads-negative": (["--repo", "{w}/repo", "--threads", "-1"], "--threads"),
    "repo-config-not-ours": (["--repo", "{w}/edited", "--instances", "2"], "--instances"),
    "repo-kind-not-a-kind": (["--repo", "{w}/repo", "--kind", "tpu"], "--kind"),
    # a model to serve
    "onnx-and-engine": (["--onnx", "{model}", "--engine", "{w}/bare.plan"], "--engine"),
    "onnx-missing": (["--onnx", "{w}/missing.onnx"], "missing.onnx"),
    "onnx-garbage": (["--onnx", "{w}/garbage.onnx"], "garbage.onnx"),
    "onnx-not-onnx": (["--onnx", "{w}/zeros.npz"], "zeros.npz"),
    "onnx-is-a-folder": (["--onnx", "{w}/empty"], "empty"),
    "engine-missing": (["--engine", "{w}/missing.plan"], "missing.plan"),
    "engine-on-cpu": (["--engine", "{w}/bare.plan", "--kind", "cpu"], "GPU"),
    "engine-without-sidecar": (["--engine", "{w}/bare.plan"], "bare.plan"),
    "instances-zero": (["--onnx", "{model}", "--instances", "0"], "--instances"),
    "instances-negative": (["--onnx", "{model}", "--instances", "-2"], "--instances"),
    "max-batch-zero": (["--onnx", "{model}", "--max-batch", "0"], "--max-batch"),
    "threads-negative": (["--onnx", "{model}", "--threads", "-1"], "--threads"),
    "steps-zero": (["--onnx", "{model}", "--steps", "0"], "--steps"),
    "steps-out-of-range": (["--onnx", "{model}", "--steps", "5000"], "5000"),
    "unknown-scheduler": (["--onnx", "{model}", "--scheduler", "euler"], "euler"),
    "scheduler-file-not-a-scheduler": (["--onnx", "{model}", "--scheduler", "{w}/sched.json"], "sched"),
    "queue-size-zero": (["--onnx", "{model}", "--queue-size", "0"], "--queue-size"),
    "queue-size-with-request-batching": (["--onnx", "{model}", "--batching", "request", "--queue-size", "4"],
                                         "--queue-size"),
    "batching-not-a-mode": (["--onnx", "{model}", "--batching", "token"], "--batching"),
    "repo-without-step-model-batching-step": (["--repo", "{w}/reqrepo", "--batching", "step"], "ddpm_stream"),
    "repo-without-step-model-queue-size": (["--repo", "{w}/reqrepo", "--queue-size", "4"], "ddpm_stream"),
    "ready-timeout-zero": (["--onnx", "{model}", "--ready-timeout", "0"], "--ready-timeout"),
    "ready-timeout-negative": (["--onnx", "{model}", "--ready-timeout", "-1"], "--ready-timeout"),
}


def _fmt(args, **kw):
    return [a.format(**kw) for a in args]


@pytest.mark.parametrize("case", list(SERVE))
def test_serve_refuses_before_any_server_starts(case, tmp_path, model, good_repo, busy, fake_server):
    w = _w(tmp_path, model, good_repo)
    exe, mark = fake_server
    args, name = SERVE[case]
    kw = dict(w=w, model=model, busy=busy)
    ports = []  # ports a case does not name are 0 (free ones), never the real 8000-8002
    for flag in ("--http-port", "--grpc-port", "--metrics-port"):
        if flag not in args:
            ports += [flag, "0"]
    before = snapshot(w, model)
    tmp_before = set(os.listdir(os.environ.get("TMPDIR", "/tmp")))

    o = invoke("ddpm-run", "serve", *_fmt(args, **kw), *ports, env={"DDPM_TRITONSERVER": str(exe)})

    assert_user_error(o, name.format(**kw))
    assert not mark.exists(), "a server was started"
    assert_kept(before, w, model)
    new = {n for n in set(os.listdir(os.environ.get("TMPDIR", "/tmp"))) - tmp_before if n.startswith("ddpm-")}
    assert not new, f"temporary folders left: {new}"


REQUEST = {
    "seed-negative": (["--seed", "-1"], "--seed"),
    "seed-too-large": (["--seed", str(2**64)], "--seed"),
    "index-negative": (["--index", "-1"], "--index"),
    "index-beyond-32-bits": (["--index", str(2**32)], "--index"),
    "index-plus-num-beyond-32-bits": (["--index", str(2**32 - 2), "--num", "5"], "--index"),
    "num-zero": (["--num", "0"], "--num"),
    "num-negative": (["--num", "-3"], "--num"),
    "num-not-a-number": (["--num", "many"], "--num"),
    "steps-zero": (["--steps", "0"], "--steps"),
    "concurrency-zero": (["--concurrency", "0"], "--concurrency"),
    "scheduler-too-long": (["--scheduler", "x" * 2000], "scheduler"),
    "scheduler-with-nul": (["--scheduler", "dd\x01im".replace("\x01", "\0")], "scheduler"),
    "url-bad-scheme": (["--url", "ftp://127.0.0.1:8000"], "--url"),
    "url-no-port": (["--url", "http://127.0.0.1"], "--url"),
    "url-port-not-a-number": (["--url", "127.0.0.1:http"], "--url"),
    "url-port-zero": (["--url", "127.0.0.1:0"], "--url"),
    "url-port-too-large": (["--url", "127.0.0.1:70000"], "--url"),
    "url-empty": (["--url", ""], "--url"),
    "url-with-path": (["--url", "http://127.0.0.1:8000/v2/models"], "--url"),
    "scheme-vs-protocol": (["--url", "http://127.0.0.1:9", "--protocol", "grpc"], "grpc"),
    "protocol-unknown": (["--protocol", "ftp"], "--protocol"),
    "no-server-http": (["--url", "127.0.0.1:{dead}"], "127.0.0.1:{dead}"),
    "no-server-grpc": (["--url", "grpc://127.0.0.1:{dead}"], "127.0.0.1:{dead}"),
    "out-is-a-file": (["--out", "{w}/afile"], "afile"),
    "out-holds-samples": (["--url", "127.0.0.1:{dead}", "--out", "{w}/held"], "--overwrite"),
}


def _held(w: Path) -> Path:
    held = w / "held"
    held.mkdir()
    np.savez(held / "samples.npz", images=np.zeros((1, 8, 8, 1), np.uint8))
    (held / "run.json").write_text(json.dumps({"schema": "ddpm-deploy/samples"}))
    return held


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("case", list(REQUEST))
def test_request_refuses_bad_options(case, tmp_path, model, good_repo):
    w = _w(tmp_path, model, good_repo)
    _held(w)
    args, name = REQUEST[case]
    kw = dict(w=w, dead=_dead_port())
    args = _fmt(args, **kw)
    if "--out" not in args:
        args += ["--out", str(w / "new" / "o")]
    if "--url" not in args:
        args += ["--url", f"127.0.0.1:{kw['dead']}"]
    before = snapshot(w)

    o = invoke("ddpm-run", "request", *args)

    assert_user_error(o, name.format(**kw))
    assert_kept(before, w)
    assert not (w / "new").exists()


# --- request against a real server -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def live(good_repo):
    pytest.importorskip("tritonclient.http", reason="needs tritonclient[http,grpc]")
    pytest.importorskip("tritonclient.grpc", reason="needs tritonclient[http,grpc]")
    from ddpm_deploy.runtime.errors import MissingDependencyError
    from ddpm_deploy.runtime.serve.server import TritonServer, find_triton

    try:
        find_triton()
    except MissingDependencyError as e:
        pytest.skip(f"no tritonserver: {e}")
    with TritonServer(good_repo) as srv:
        yield srv


LIVE = {
    "steps-out-of-range-http": (["--steps", "5000"], "steps must be between", "http"),
    "steps-out-of-range-grpc": (["--steps", "5000"], "steps must be between", "grpc"),
    "steps-one-for-ddpm": (["--steps", "1"], "steps must be between 2", "http"),
    "unknown-scheduler-http": (["--scheduler", "euler"], "unknown scheduler 'euler'", "http"),
    "unknown-scheduler-grpc": (["--scheduler", "euler"], "unknown scheduler 'euler'", "grpc"),
    "scheduler-bad-option": (["--scheduler", '{{"scheduler": "ddim", "options": {{"solver_order": 2}}}}'],
                             "solver_order", "http"),
    "scheduler-bad-json": (["--scheduler", "{{bad"], "JSON", "grpc"),
    "out-holds-samples-live": (["--out", "{w}/held"], "--overwrite", "http"),
    "url-is-the-metrics-port": (["--url", "127.0.0.1:{metrics}"], "127.0.0.1:{metrics}", "http"),
}


@pytest.mark.parametrize("case", list(LIVE))
def test_request_refused_by_the_server_is_one_error_line(case, tmp_path, model, good_repo, live):
    w = _w(tmp_path, model, good_repo)
    _held(w)
    args, name, proto = LIVE[case]
    kw = dict(w=w, metrics=live.metrics_port)
    args = _fmt(args, **kw)
    if "--out" not in args:
        args += ["--out", str(w / "new" / "o")]
    if "--url" not in args:
        args += ["--url", f"{proto}://{live.http_url if proto == 'http' else live.grpc_url}"]
    before = snapshot(w)

    o = invoke("ddpm-run", "request", *args)

    assert_user_error(o, name.format(**kw))
    assert_kept(before, w)
    assert not (w / "new").exists()


# --- ddpm-export --triton-repo: the output policy ---------------------------------------------------------------

EXPORT = {
    "repo-exists": (["--triton-repo", "{w}/repo"], "--overwrite"),
    "repo-sampler-only-exists": (["--triton-repo", "{w}/sampler-only"], "--overwrite"),
    "repo-ddpm-only-exists": (["--triton-repo", "{w}/ddpm-only"], "--overwrite"),
    "repo-is-a-file": (["--triton-repo", "{w}/afile"], "afile"),
    "repo-under-a-file": (["--triton-repo", "{w}/afile/repo"], "afile"),
    "steps-zero": (["--triton-repo", "{w}/new/r", "--triton-steps", "0"], "--triton-steps"),
    "steps-out-of-range": (["--triton-repo", "{w}/new/r", "--triton-steps", "5000"], "5000"),
    "unknown-scheduler": (["--triton-repo", "{w}/new/r", "--triton-scheduler", "euler"], "euler"),
    "scheduler-bad-option": (["--triton-repo", "{w}/new/r", "--triton-scheduler",
                              '{{"scheduler": "ddim", "options": {{"solver_order": 2}}}}'], "solver_order"),
    "instances-zero": (["--triton-repo", "{w}/new/r", "--triton-instances", "0"], "--triton-instances"),
    "max-batch-zero": (["--triton-repo", "{w}/new/r", "--triton-max-batch", "0"], "--triton-max-batch"),
    "steps-without-repo": (["--triton-steps", "10"], "--triton-repo"),
    "queue-without-repo": (["--triton-queue", "4"], "--triton-repo"),
    "batching-without-repo": (["--triton-batching", "request"], "--triton-repo"),
    "queue-zero": (["--triton-repo", "{w}/new/r", "--triton-queue", "0"], "--triton-queue"),
    "queue-with-request-batching": (["--triton-repo", "{w}/new/r", "--triton-batching", "request", "--triton-queue",
                                     "4"], "--triton-queue"),
    "batching-not-a-mode": (["--triton-repo", "{w}/new/r", "--triton-batching", "token"], "--triton-batching"),
    "scheduler-without-repo": (["--triton-scheduler", "ddim"], "--triton-repo"),
    "plan-on-cpu": (["{w}/bare.plan", "--triton-repo", "{w}/new/r", "--triton-kind", "cpu"], "GPU"),
    "garbage-onnx": (["{w}/garbage.onnx", "--triton-repo", "{w}/new/r"], "garbage.onnx"),
}


@pytest.mark.parametrize("case", list(EXPORT))
def test_export_triton_repo_refuses(case, tmp_path, model, good_repo):
    w = _w(tmp_path, model, good_repo)
    shutil.copytree(_sampler(good_repo), w / "sampler-only" / "ddpm_sampler")
    shutil.copytree(good_repo / "ddpm", w / "ddpm-only" / "ddpm")
    args, name = EXPORT[case]
    args = _fmt(args, w=w)
    if not args[0].startswith("{") and not args[0].endswith((".plan", ".onnx")):
        args = [str(model), *args]
    before = snapshot(w, model)

    o = invoke("ddpm-export", *args)

    assert_user_error(o, name.format(w=w))
    assert_kept(before, w, model)
    assert not (w / "new").exists(), "a refused export left a folder"


def _user_files(repo: Path) -> dict[str, bytes]:
    (repo / "ddpm_sampler" / "2").mkdir()
    (repo / "ddpm_sampler" / "2" / "model.py").write_text("# the user's version 2\n")
    (repo / "ddpm_sampler" / "NOTES.md").write_text("mine\n")
    (repo / "ddpm" / "1" / "keep.txt").write_text("mine too\n")
    (repo / "README").write_text("a repository readme\n")
    return {str(p): p.read_bytes() for p in [repo / "ddpm_sampler/2/model.py", repo / "ddpm_sampler/NOTES.md",
                                             repo / "ddpm/1/keep.txt", repo / "README"]}


def test_overwrite_replaces_only_what_ddpm_export_writes(tmp_path, model, good_repo):
    repo = shutil.copytree(good_repo, tmp_path / "repo")
    mine = _user_files(repo)

    assert_ok(invoke("ddpm-export", model, "--triton-repo", repo, "--overwrite", "--triton-instances", 3,
                     "--triton-steps", 7, "--triton-scheduler", "ddim"))

    assert {p: Path(p).read_bytes() for p in mine} == mine
    cfg = (repo / "ddpm_sampler" / "config.pbtxt").read_text()
    assert "count: 3" in cfg and 'key: "default_steps" value { string_value: "7" }' in cfg
    assert 'key: "default_scheduler" value { string_value: "ddim" }' in (repo / "ddpm" / "config.pbtxt").read_text()
    assert not [p for p in repo.rglob("*") if ".tmp" in p.name]


@pytest.mark.parametrize("existing", [False, True], ids=["new-repo", "overwrite"])
def test_a_full_disk_during_the_repository_write_leaves_nothing_half_made(tmp_path, model, good_repo, existing):
    repo = tmp_path / "repo"
    if existing:
        shutil.copytree(good_repo, repo)
        _user_files(repo)
    before = snapshot(tmp_path) if existing else {}

    with disk_full(tmp_path, when=lambda p: p.name.endswith(".tmp") and "config.pbtxt" in p.name):
        o = invoke("ddpm-export", model, "--triton-repo", repo, *(["--overwrite"] if existing else []))

    assert_user_error(o, str(repo))
    if existing:
        assert_kept(before, tmp_path)
    else:
        assert not repo.exists(), f"left behind: {sorted(map(str, repo.rglob('*')))}"
