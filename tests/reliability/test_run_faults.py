"""Bad inputs to the other `ddpm-run` commands: info, plans, merge, request, fid, fid-stats, serve, parity, bench.

Same contract as every corpus case (harness.py): exit 2, one `error:` line naming the thing at fault, no traceback,
nothing that existed changed, no output folder left by a refused command.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from reliability.harness import assert_kept, assert_ok, assert_user_error, invoke, snapshot


@pytest.fixture(scope="module")
def model(random_micro_onnx, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("run_faults_model")
    shutil.copy(random_micro_onnx, d / "model.onnx")
    return d / "model.onnx"


@pytest.fixture(scope="module")
def shards(model, tmp_path_factory) -> Path:
    """A finished job of 4 images in 2 shards (folder samples/shard-I-of-2)."""
    root = tmp_path_factory.mktemp("run_faults_shards") / "samples"
    for i in range(2):
        assert_ok(invoke("ddpm-run", "sample", "--onnx", model, "--out", root, "--num", 4, "--batch", 2, "--steps", 3,
                         "--shard", f"{i}/2", "--no-pngs"))
    return root


def _w(tmp_path: Path) -> Path:
    """A work folder with the usual broken files."""
    w = tmp_path / "w"
    w.mkdir()
    (w / "junk.plan").write_bytes(b"ftrt" + os.urandom(200))
    (w / "junk.plan.json").write_text("{bad")
    (w / "bare.plan").write_bytes(b"ftrt" + os.urandom(200))
    (w / "other.plan").write_bytes(b"ftrt" + os.urandom(200))
    (w / "other.plan.json").write_text(json.dumps({"schema": "someone/else", "schema_version": 1}))
    (w / "old.plan").write_bytes(b"ftrt" + os.urandom(200))
    (w / "old.plan.json").write_text(json.dumps({"schema": "ddpm-deploy/plan", "schema_version": 1}))
    (w / "empty").mkdir()
    (w / "pickled.npz").write_bytes(b"\x80\x04K\x01.")
    (w / "zeros.npz").write_bytes(b"\0" * 64)
    np.savez(w / "float.npz", images=np.zeros((2, 8, 8, 1), np.float32))
    np.savez(w / "noimages.npz", pictures=np.zeros((2, 8, 8, 1), np.uint8))
    np.savez(w / "fivechan.npz", images=np.zeros((2, 8, 8, 5), np.uint8))
    np.savez(w / "none.npz", images=np.zeros((0, 8, 8, 1), np.uint8))
    (w / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    (w / "pngs").mkdir()
    (w / "pngs" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    return w


CASES = {
    # info
    "info-missing-onnx": (["info", "--onnx", "{w}/missing.onnx"], "missing.onnx"),
    "info-not-onnx": (["info", "--onnx", "{w}/zeros.npz"], "zeros.npz"),
    "info-plan-missing": (["info", "--engine", "{w}/missing.plan"], "missing.plan"),
    "info-plan-without-sidecar": (["info", "--engine", "{w}/bare.plan"], "bare.plan.json"),
    "info-plan-sidecar-not-json": (["info", "--engine", "{w}/junk.plan"], "junk.plan.json"),
    "info-plan-sidecar-other-schema": (["info", "--engine", "{w}/other.plan"], "schema"),
    "info-plan-sidecar-old-version": (["info", "--engine", "{w}/old.plan"], "schema_version"),
    # sample with a plan: the sidecar is checked before anything else (no GPU needed to refuse)
    "sample-plan-without-sidecar": (["sample", "--engine", "{w}/bare.plan", "--out", "{w}/new/o"], "bare.plan.json"),
    "sample-plan-sidecar-not-json": (["sample", "--engine", "{w}/junk.plan", "--out", "{w}/new/o"], "junk.plan.json"),
    "sample-plan-missing": (["sample", "--engine", "{w}/missing.plan", "--out", "{w}/new/o"], "missing.plan"),
    "sample-int8-without-xml": (["sample", "--onnx", "{model}", "--out", "{w}/new/o", "--backend", "openvino",
                                 "--precision", "int8"], "model.int8.xml"),
    # merge
    "merge-not-a-sample-folder": (["merge", "{w}/new/m", "{w}/empty"], "run.json"),
    "merge-missing-folder": (["merge", "{w}/new/m", "{w}/missing"], "missing"),
    "merge-a-shard-twice": (["merge", "{w}/new/m", "{shards}/shard-0-of-2", "{shards}/shard-0-of-2"], "twice"),
    "merge-a-shard-missing": (["merge", "{w}/new/m", "{shards}/shard-0-of-2"], "missing shards 1/2"),
    "merge-into-a-shard": (["merge", "{shards}/shard-0-of-2", "{shards}/shard-0-of-2", "{shards}/shard-1-of-2"],
                           "also one of the shards"),
    "merge-into-samples": (["merge", "{shards}/shard-1-of-2", "{shards}/shard-0-of-2"], "--overwrite"),
    # request (no server listening)
    "request-no-server": (["request", "--url", "127.0.0.1:9", "--out", "{w}/new/o"], "127.0.0.1:9"),
    "request-scheme-vs-protocol": (["request", "--url", "http://127.0.0.1:9", "--protocol", "grpc",
                                    "--out", "{w}/new/o"], "grpc"),
    "request-num-zero": (["request", "--url", "127.0.0.1:9", "--num", "0", "--out", "{w}/new/o"], "--num"),
    # fid / fid-stats inputs
    "fid-empty-folder": (["fid", "{w}/empty", "--ref", "{w}/empty"], "no images"),
    "fid-pickled-npz": (["fid", "{w}/pickled.npz", "--ref", "{w}/pickled.npz"], "pickled.npz"),
    "fid-zeros-npz": (["fid", "{w}/zeros.npz", "--ref", "{w}/zeros.npz"], "zeros.npz"),
    "fid-float-images": (["fid", "{w}/float.npz", "--ref", "{w}/float.npz"], "uint8"),
    "fid-npz-without-images": (["fid", "{w}/noimages.npz", "--ref", "{w}/noimages.npz"], "'images'"),
    "fid-five-channels": (["fid", "{w}/fivechan.npz", "--ref", "{w}/fivechan.npz"], "C 1 or 3"),
    "fid-zero-images": (["fid", "{w}/none.npz", "--ref", "{w}/none.npz"], "N > 0"),
    "fid-broken-png": (["fid", "{w}/pngs", "--ref", "{w}/pngs"], "a.png"),
    "fid-stats-empty": (["fid-stats", "{w}/empty", "--out", "{w}/new/s.npz"], "no images"),
    "fid-compare-missing-against": (["fid-compare", "--onnx", "{model}", "--against", "{w}/missing.onnx",
                                     "--num", "2", "--out", "{w}/new/f"], "missing.onnx"),
    # serve / parity
    "serve-missing-model": (["serve", "--onnx", "{w}/missing.onnx"], "missing.onnx"),
    "parity-no-checkpoint": (["parity", "--checkpoint", "{w}/empty", "--onnx", "{model}", "--out", "{w}/new/p"],
                             "empty"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input(model, shards, tmp_path, case):
    args, name = CASES[case]
    w = _w(tmp_path)
    fmt = dict(w=w, model=model, shards=shards)
    before = snapshot(w, shards, model)
    line = assert_user_error(invoke("ddpm-run", *[a.format(**fmt) for a in args]), name.format(**fmt))
    assert "Traceback" not in line
    assert_kept(before, w, shards, model)
    assert not (w / "new").exists(), "a refused command left an output behind"


def test_merge_of_finished_shards_then_overwrite(shards, tmp_path):
    out = tmp_path / "merged"
    assert_ok(invoke("ddpm-run", "merge", out, shards / "shard-0-of-2", shards / "shard-1-of-2"))
    before = snapshot(out)
    assert_user_error(invoke("ddpm-run", "merge", out, shards / "shard-0-of-2", shards / "shard-1-of-2"), "--overwrite")
    assert_kept(before, out)
    assert_ok(invoke("ddpm-run", "merge", out, shards / "shard-0-of-2", shards / "shard-1-of-2", "--overwrite"))
    assert snapshot(out) == before  # the same shards merge to the same bytes


def test_fid_on_an_unfinished_job_is_refused(model, tmp_path):
    """A samples.npz beside a run.json that says the job is unfinished (an interrupted job) is not a sample set."""
    from ddpm_deploy.runtime.contract import RunInfo

    out = tmp_path / "s"
    assert_ok(invoke("ddpm-run", "sample", "--onnx", model, "--out", out, "--num", 4, "--batch", 2, "--steps", 3))
    info = RunInfo.load(out / "run.json")
    info.status, info.done = "interrupted", [[0, 1]]
    info.save(out / "run.json")
    before = snapshot(out)
    assert_user_error(invoke("ddpm-run", "fid", out, "--ref", out), "unfinished", "--resume")
    assert_kept(before, out)
