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
    (w / "held").mkdir()
    (w / "held" / "fid.json").write_text("{}")
    (w / "held" / "stats.npz").write_bytes(b"not really statistics")
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
    "fid-stats-out-exists": (["fid-stats", "digits", "--out", "{w}/held/stats.npz"], "--overwrite"),
    "fid-out-holds-fid-json": (["fid", "{shards}/shard-0-of-2", "--ref", "{shards}/shard-1-of-2", "--out", "{w}/held"],
                               "--overwrite"),
    "fid-bad-ref-leaves-no-out": (["fid", "{shards}/shard-0-of-2", "--ref", "imagenet", "--out", "{w}/new/f"],
                                  "imagenet"),
    "fid-stats-bad-ref-leaves-no-out": (["fid-stats", "imagenet", "--out", "{w}/new/s/stats.npz"], "imagenet"),
    "fid-unfinished-ref-leaves-no-out": (["fid", "{shards}/shard-0-of-2", "--ref", "{w}/empty", "--out",
                                          "{w}/new/f"], "no images"),
    "fid-out-is-a-file": (["fid", "{shards}/shard-0-of-2", "--ref", "digits", "--out", "{w}/zeros.npz"], "zeros.npz"),
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


# --- merge trusts nothing: each shard is checked against the others before anything is written -----------------------

def _damage(shards: Path, tmp_path: Path, how: str) -> tuple[Path, Path]:
    """Copies of the two shards with shard 1 damaged ``how``; returns the two folders."""
    a, b = tmp_path / "s0", tmp_path / "s1"
    shutil.copytree(shards / "shard-0-of-2", a)
    shutil.copytree(shards / "shard-1-of-2", b)
    npz, rj = b / "samples.npz", b / "run.json"
    with np.load(npz) as z:
        images, indices = z["images"], z["indices"]
    info = json.loads(rj.read_text())
    if how == "truncated-npz":
        npz.write_bytes(npz.read_bytes()[:100])
    elif how == "empty-npz":
        npz.write_bytes(b"")
    elif how == "float-images":
        np.savez(npz, images=images.astype(np.float32), indices=indices)
    elif how == "other-shape":
        np.savez(npz, images=np.zeros((len(images), 4, 4, images.shape[-1]), np.uint8), indices=indices)
    elif how == "rgb-vs-gray":
        np.savez(npz, images=np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images[..., :1],
                 indices=indices)
    elif how == "indices-not-run-json":
        np.savez(npz, images=images, indices=indices + 100)
    elif how == "duplicate-indices":
        np.savez(npz, images=images, indices=np.full_like(indices, indices[0]))
    elif how == "float-indices":
        np.savez(npz, images=images, indices=indices.astype(np.float64))
    elif how == "no-indices":
        np.savez(npz, images=images)
    elif how == "fewer-images":
        np.savez(npz, images=images[:1], indices=indices[:1])
    elif how == "other-seed":
        info["seed"] += 1
    elif how == "other-model":
        info["model_sha256"] = "0" * 64
    elif how == "other-steps":
        info["steps"] += 1
    elif how == "other-precision":
        info["precision"] = "fp16"
    elif how == "other-scheduler":
        info["scheduler"] = {**(info["scheduler"] or {}), "name": "ddim"}
    elif how == "other-diffusion":
        info["diffusion"] = {**info["diffusion"], "beta_end": 0.03}
    elif how == "other-job-size":  # shard 1/2 of a 6-image job
        info["shard"] = {**info["shard"], "num_total": 6}
    elif how == "shard-slice-wrong":  # run.json claims shard 1/2 but holds another slice
        info["shard"] = {**info["shard"], "index": 0}
    elif how == "other-shard-count":
        info["shard"] = {**info["shard"], "count": 3}
    elif how == "unfinished":
        info["status"], info["done"] = "interrupted", [[info["start_index"], info["start_index"]]]
    elif how == "no-run-json":
        rj.unlink()
    elif how == "run-json-not-json":
        rj.write_text("{")
    elif how == "run-json-fid-report":
        rj.write_text(json.dumps({"schema": "ddpm-deploy/fid", "schema_version": 1}))
    elif how == "no-samples-npz":
        npz.unlink()
    else:
        raise ValueError(how)
    if how.startswith(("other-", "shard-", "unfinished")):
        rj.write_text(json.dumps(info))
    return a, b


MERGE_DAMAGE = {
    "truncated-npz": "samples.npz", "empty-npz": "samples.npz", "float-images": "uint8", "other-shape": "shape",
    "rgb-vs-gray": "shape", "indices-not-run-json": "indices", "duplicate-indices": "indices",
    "float-indices": "indices", "no-indices": "samples.npz", "fewer-images": "images", "other-seed": "seed",
    "other-model": "model_sha256", "other-steps": "steps", "other-precision": "precision",
    "other-scheduler": "scheduler", "other-diffusion": "diffusion", "other-job-size": "different jobs",
    "shard-slice-wrong": "shard 0/2", "other-shard-count": "different jobs", "unfinished": "unfinished",
    "no-run-json": "run.json", "run-json-not-json": "run.json", "run-json-fid-report": "schema",
    "no-samples-npz": "samples.npz",
}


@pytest.mark.parametrize("how", sorted(MERGE_DAMAGE))
def test_merge_refuses_a_damaged_or_foreign_shard(shards, tmp_path, how):
    a, b = _damage(shards, tmp_path, how)
    out = tmp_path / "new" / "merged"
    before = snapshot(a, b)
    assert_user_error(invoke("ddpm-run", "merge", out, a, b), MERGE_DAMAGE[how])
    assert_kept(before, a, b)
    assert not (tmp_path / "new").exists(), "a refused merge left an output behind"


def test_merge_onto_a_full_disk_leaves_nothing_half_made(shards, tmp_path):
    """ENOSPC while writing run.json (the last file): no samples.npz without run.json, the OUT's files unchanged."""
    from reliability.harness import disk_full

    out = tmp_path / "merged"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    with disk_full(out, when=lambda p: "run.json" in p.name):
        o = invoke("ddpm-run", "merge", out, shards / "shard-0-of-2", shards / "shard-1-of-2")
    assert_user_error(o, "No space left")
    assert_kept(before, out)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_shard_merge_fid_workflow(shards, tmp_path, fid_extractor):
    """The README's path to a big FID: shards → merge → fid, with the merged folder as SAMPLES, as --ref, and its
    samples.npz alone; and a merged folder merged again with nothing new is the same job."""
    out = tmp_path / "all"
    assert_ok(invoke("ddpm-run", "merge", out, shards / "shard-0-of-2", shards / "shard-1-of-2"))
    kid = ["--kid-subsets", 2, "--kid-subset-size", 2, "--extractor", fid_extractor]
    pairs = ((out, shards / "shard-0-of-2"), (out / "samples.npz", out), (shards / "shard-1-of-2", out))
    for i, (samples, ref) in enumerate(pairs):
        assert_ok(invoke("ddpm-run", "fid", samples, "--ref", ref, "--out", tmp_path / f"fid-{i}", *kid))
    rep = json.loads((tmp_path / "fid-0" / "fid.json").read_text())
    assert rep["samples"]["count"] == 4 and rep["samples"]["run"]["merged_shards"] == 2
    again = tmp_path / "again"
    assert_ok(invoke("ddpm-run", "merge", again, out))  # a merged job is a complete job
    with np.load(out / "samples.npz") as x, np.load(again / "samples.npz") as y:
        assert np.array_equal(x["images"], y["images"]) and np.array_equal(x["indices"], y["indices"])
