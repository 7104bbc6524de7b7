"""The bad-input and fault corpus of `ddpm-run sample` (and the commands that read its outputs).

Each case: the exit status (2 for a user mistake or a machine fault, 130/143 for SIGINT/SIGTERM), one `error:`
line naming the thing at fault, no traceback, and every file that existed before kept (see harness.py). Where a
job is interrupted, continuing it with --resume must give the same bytes as a job that was never interrupted.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from reliability.harness import (BIN, assert_kept, assert_ok, assert_user_error, disk_full, invoke, snapshot,
                                 temp_files)

onnx = pytest.importorskip("onnx")

STEPS = ["--steps", "4"]  # a short respaced job: the cases are about the files, not the images


def _job(model, out, *extra, num=6, batch=2):
    return ["sample", "--onnx", model, "--out", out, "--num", num, "--batch", batch, *STEPS, *extra]


def _digest(out: Path, names=("samples.npz", "grid.png")) -> dict[str, str]:
    d = {n: hashlib.sha256((out / n).read_bytes()).hexdigest() for n in names}
    for p in sorted((out / "images").glob("*.png")) if (out / "images").is_dir() else []:
        d[f"images/{p.name}"] = hashlib.sha256(p.read_bytes()).hexdigest()
    return d


@pytest.fixture(scope="module")
def model(random_micro_onnx, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("sample_faults_model")
    p = d / "model.onnx"
    p.write_bytes(random_micro_onnx.read_bytes())
    return p


@pytest.fixture(scope="module")
def done_job(model, tmp_path_factory) -> Path:
    """A finished job of 6 images (the folder the output-policy cases work on; copied per case)."""
    out = tmp_path_factory.mktemp("sample_faults_done") / "samples"
    assert_ok(invoke("ddpm-run", *_job(model, out)))
    return out


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


# --- an output folder is never replaced or mixed silently ------------------------------------------------------

def test_folder_with_samples_is_refused_and_kept(model, done_job, tmp_path):
    out = _copy(done_job, tmp_path / "s")
    before = snapshot(out)
    line = assert_user_error(invoke("ddpm-run", *_job(model, out, "--seed", 1)), str(out), "--resume", "--overwrite")
    assert "6 of 6 images, complete" in line
    assert_kept(before, out)


def test_overwrite_replaces_the_whole_job(model, done_job, tmp_path):
    out = _copy(done_job, tmp_path / "s")
    (out / "notes.txt").write_text("mine")  # not ours: stays
    assert_ok(invoke("ddpm-run", *_job(model, out, "--seed", 1, "--overwrite", num=3)))
    with np.load(out / "samples.npz") as z:
        assert list(z["indices"]) == [0, 1, 2]
    assert sorted(p.name for p in (out / "images").iterdir()) == ["000000.png", "000001.png", "000002.png"]
    assert json.loads((out / "run.json").read_text())["seed"] == 1
    assert (out / "notes.txt").read_text() == "mine"
    assert not (out / "parts").exists() and not temp_files(out)


def test_resume_of_a_complete_job_changes_nothing(model, done_job, tmp_path):
    out = _copy(done_job, tmp_path / "s")
    before = snapshot(out)
    o = invoke("ddpm-run", *_job(model, out, "--resume"))
    assert_ok(o)
    assert "nothing to resume" in o.stderr
    assert_kept(before, out)


@pytest.mark.parametrize("change,field", [
    (["--seed", "1"], "seed 0 there, 1 in this command"),
    (["--num", "7"], "num 6 there, 7 in this command"),
    (["--start-index", "2"], "start_index 0 there, 2 in this command"),
    (["--steps", "5"], "steps 4 there, 5 in this command"),
    (["--num-timesteps", "500"], "num_timesteps 1000 there, 500 in this command"),
    (["--schedule", "cosine"], "'schedule': 'linear'"),
    (["--variance-type", "fixed_large"], "'variance_type': 'fixed_small'"),
    (["--backend", "openvino"], "backend 'onnxruntime-cpu' there, 'openvino-cpu' in this command"),
    (["--shard", "0/2"], "samples/shard-0-of-2"),  # a shard is its own folder: nothing there to resume, so it runs
])
def test_resume_refuses_another_job(model, done_job, tmp_path, change, field):
    out = _copy(done_job, tmp_path / "samples")
    before = snapshot(out)
    args = _job(model, out, "--resume")
    for flag, value in zip(change[::2], change[1::2]):
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    if "--backend" in change:
        pytest.importorskip("openvino")
    o = invoke("ddpm-run", *args)
    if field.startswith("samples/"):
        assert_ok(o)
        assert (tmp_path / field / "samples.npz").is_file()
    else:
        assert_user_error(o, "--resume", "holds another job", field, str(out))
    assert_kept(before, out)


def test_resume_refuses_another_model(model, done_job, tmp_path):
    out = _copy(done_job, tmp_path / "s")
    other = tmp_path / "other.onnx"
    proto = onnx.load(str(model))
    proto.doc_string = "re-exported"
    onnx.save(proto, str(other))
    before = snapshot(out)
    assert_user_error(invoke("ddpm-run", "sample", "--onnx", other, "--out", out, "--num", 6, "--batch", 2, *STEPS,
                             "--resume"), "the model file differs")
    assert_kept(before, out)


def test_resume_and_overwrite_together_are_refused(model, done_job, tmp_path):
    out = _copy(done_job, tmp_path / "s")
    before = snapshot(out)
    assert_user_error(invoke("ddpm-run", *_job(model, out, "--resume", "--overwrite")), "--resume", "--overwrite")
    assert_kept(before, out)


def test_resume_without_run_json_is_refused(model, done_job, tmp_path):
    out = _copy(done_job, tmp_path / "s")
    (out / "run.json").unlink()
    before = snapshot(out)
    assert_user_error(invoke("ddpm-run", *_job(model, out, "--resume")), "no run.json", "--overwrite")
    assert_kept(before, out)


def test_corrupt_run_json_is_named_on_resume(model, done_job, tmp_path):
    out = _copy(done_job, tmp_path / "s")
    (out / "run.json").write_text("{torn")
    before = snapshot(out)
    assert_user_error(invoke("ddpm-run", *_job(model, out, "--resume")), "run.json")
    assert_kept(before, out)


def test_resume_into_an_empty_folder_starts_the_job(model, tmp_path):
    out = tmp_path / "fresh"
    assert_ok(invoke("ddpm-run", *_job(model, out, "--resume")))
    assert (out / "samples.npz").is_file()


def test_a_folder_in_use_is_refused(model, tmp_path):
    """Another job holds the folder's lock (flock on the folder; per open file description, so a second open in this
    process conflicts as another process would)."""
    import fcntl

    out = tmp_path / "s"
    out.mkdir()
    fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert_user_error(invoke("ddpm-run", *_job(model, out)), "in use", str(out))
        assert list(out.iterdir()) == []
    finally:
        os.close(fd)  # the other job ends
    assert_ok(invoke("ddpm-run", *_job(model, out)))
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "images", "run.json", "samples.npz"]


def test_temp_files_of_a_killed_write_are_removed(model, tmp_path):
    out = tmp_path / "s"
    (out / "parts").mkdir(parents=True)
    (out / ".samples.npz.999.tmp").write_bytes(b"half")
    (out / "parts" / ".0000000000-0000000001.npy.abc.tmp").write_bytes(b"half")
    assert_ok(invoke("ddpm-run", *_job(model, out)))
    assert not temp_files(out)


# --- options are checked before anything is written ---------------------------------------------------------------

BAD_OPTIONS = {
    "num-zero": (["--num", "0"], "--num"),
    "num-negative": (["--num", "-3"], "--num"),
    "batch-zero": (["--batch", "0"], "--batch"),
    "seed-negative": (["--seed", "-1"], "--seed"),
    "seed-2**64": (["--seed", str(2**64)], "--seed"),
    "start-index-negative": (["--start-index", "-1"], "--start-index"),
    "start-index-past-2**32": (["--start-index", str(2**32 - 3)], "2**32"),
    "steps-zero": (["--steps", "0"], "--steps"),
    "steps-above-T": (["--steps", "5000"], "5000"),
    "threads-negative": (["--threads", "-2"], "--threads"),
    "shard-text": (["--shard", "half"], "--shard"),
    "shard-index-past-count": (["--shard", "3/2"], "found 3/2"),
    "shard-zero-count": (["--shard", "0/0"], "found 0/0"),
    "precision-without-openvino": (["--precision", "bf16"], "--backend openvino"),
    "openvino-on-cuda": (["--backend", "openvino", "--device", "cuda"], "OpenVINO"),
    "num-timesteps-zero": (["--num-timesteps", "0"], "num_timesteps"),
    "beta-end-negative": (["--beta-end", "-0.5"], "beta"),
    "num-not-int": (["--num", "many"], "--num"),
    "device-unknown": (["--device", "tpu"], "--device"),
    "slurm-env-bad": ([], "SLURM_ARRAY_TASK_ID"),
}


@pytest.mark.parametrize("case", sorted(BAD_OPTIONS))
def test_bad_option_is_refused_before_any_output(model, tmp_path, case):
    extra, name = BAD_OPTIONS[case]
    out = tmp_path / "deep" / "samples"
    args = _job(model, out)
    for flag, value in zip(extra[::2], extra[1::2]):
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    env = {"SLURM_ARRAY_TASK_ID": "x", "SLURM_ARRAY_TASK_COUNT": "2"} if case == "slurm-env-bad" else None
    assert_user_error(invoke("ddpm-run", *args, env=env), name)
    assert not (tmp_path / "deep").exists(), "a refused command left an output folder behind"


def test_onnx_and_engine_together_are_refused(model, tmp_path):
    assert_user_error(invoke("ddpm-run", *_job(model, tmp_path / "s"), "--engine", model), "--onnx", "--engine")
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("where", ["file", "under-a-file"])
def test_out_that_is_a_file_is_refused(model, tmp_path, where):
    blocker = tmp_path / "blocker"
    blocker.write_text("keep me")
    out = blocker if where == "file" else blocker / "sub"
    assert_user_error(invoke("ddpm-run", *_job(model, out)), str(blocker))
    assert blocker.read_text() == "keep me"


# --- models that are not what they claim ------------------------------------------------------------------------

def _edit(model: Path, dst: Path, tail=None, out_type=None, out_shape=None, meta=None) -> Path:
    """A copy of the model with nodes appended after ε (``tail(graph)`` returns the new output name), another
    declared output type/shape, or other ddpm-deploy metadata."""
    from onnx import helper

    proto = onnx.load(str(model))
    g = proto.graph
    if tail is not None:
        old = g.output[0]
        for n in g.node:
            n.output[:] = ["eps_raw" if o == "eps" else o for o in n.output]
        name_out = tail(g)
        for n in g.node:
            n.output[:] = ["eps" if o == name_out else o for o in n.output]
        elem = out_type or old.type.tensor_type.elem_type
        dims = out_shape or [d.dim_value or d.dim_param for d in old.type.tensor_type.shape.dim]
        g.output.pop()
        g.output.append(helper.make_tensor_value_info("eps", elem, dims))
    if meta is not None:
        for p in proto.metadata_props:
            if p.key == "ddpm_deploy.config":
                p.value = meta(p.value)
    del proto.graph.value_info[:]
    onnx.save(proto, str(dst))
    return dst


def _const(g, name, value, dtype=np.float32):
    from onnx import numpy_helper

    g.initializer.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
    return name


def _add_node(g, op, inputs, output, **attrs):
    from onnx import helper

    g.node.append(helper.make_node(op, inputs, [output], **attrs))
    return output


def _plus(value):
    return lambda g: _add_node(g, "Add", ["eps_raw", _const(g, "c_add", value)], "eps_new")


def _mean_over_batch(g):  # the first sample's ε only: batch 1 whatever the batch
    ins = [_const(g, n, [v], np.int64) for n, v in (("s0", 0), ("e1", 1), ("a0", 0))]
    return _add_node(g, "Slice", ["eps_raw", *ins], "eps_new")


def _twice_channels(g):
    return _add_node(g, "Concat", ["eps_raw", "eps_raw"], "eps_new", axis=1)


def _to_double(g):
    from onnx import TensorProto

    return _add_node(g, "Cast", ["eps_raw"], "eps_new", to=TensorProto.DOUBLE)


def _meta_json(edit):
    def f(text):
        d = json.loads(text)
        edit(d)
        return json.dumps(d)
    return f


def _set(path, value):
    def edit(d):
        node = d
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value
    return edit


BAD_MODELS = {
    # ε non-finite: clipping x̂0 would hide it (all-black images, exit 0) — an error, at the first step
    "eps-plus-inf": (dict(tail=_plus(np.inf)), "non-finite ε"),
    "eps-nan": (dict(tail=_plus(np.nan)), "non-finite ε"),
    # ε of the wrong batch: broadcast silently before; static → refused at load, dynamic → at the first call
    "eps-batch-1-static": (dict(tail=_mean_over_batch, out_shape=[1, 1, 8, 8]), "batch"),
    "eps-batch-1-dynamic": (dict(tail=_mean_over_batch, out_shape=["b1", 1, 8, 8]), "ε of float32 [1, 1, 8, 8]"),
    "eps-channels-static": (dict(tail=_twice_channels, out_shape=["batch", 2, 8, 8]), "shape of x"),
    "eps-channels-dynamic": (dict(tail=_twice_channels, out_shape=["batch", "c2", 8, 8]), "shape of x"),  # inferred
    "eps-float64": (dict(tail=_to_double, out_type=11), "eps of type tensor(double)"),
    "meta-not-json": (dict(meta=lambda t: "{broken"), "metadata"),
    "meta-other-schema": (dict(meta=_meta_json(_set(["schema"], "someone/else"))), "schema"),
    "meta-newer-version": (dict(meta=_meta_json(_set(["schema_version"], 99))), "schema_version"),
    "meta-T-negative": (dict(meta=_meta_json(_set(["diffusion", "num_timesteps"], -5))), "num_timesteps"),
    "meta-T-text": (dict(meta=_meta_json(_set(["diffusion", "num_timesteps"], "1000"))), "num_timesteps"),
    "meta-schedule-unknown": (dict(meta=_meta_json(_set(["diffusion", "schedule"], "quadratic"))), "quadratic"),
    "meta-betas-reversed": (dict(meta=_meta_json(_set(["diffusion", "beta_end"], 1e-6))), "beta"),
    "meta-variance-unknown": (dict(meta=_meta_json(_set(["diffusion", "variance_type"], "learned"))), "learned"),
    "meta-image-size-mismatch": (dict(meta=_meta_json(_set(["data", "image_size"], 16))), "shape (1, 16, 16)"),
    "meta-channels-mismatch": (dict(meta=_meta_json(_set(["data", "channels"], 3))), "shape (3, 8, 8)"),
    "meta-data-missing": (dict(meta=_meta_json(lambda d: d.pop("data"))), "data"),
}


@pytest.mark.parametrize("case", sorted(BAD_MODELS))
def test_bad_model_is_refused_and_leaves_no_folder(model, tmp_path, case):
    kw, name = BAD_MODELS[case]
    bad = _edit(model, tmp_path / "bad.onnx", **kw)
    before = snapshot(bad)
    out = tmp_path / "new" / "samples"
    assert_user_error(invoke("ddpm-run", *_job(model=bad, out=out)), name)
    assert not (tmp_path / "new").exists(), "a failed job that finished nothing left its folder behind"
    assert_kept(before, bad)


BAD_FILES = {
    "missing": (None, "not found"),
    "empty": (b"", "bad.onnx"),
    "truncated": ("truncate", "bad.onnx"),
    "random-bytes": (os.urandom(4096), "bad.onnx"),
    "json-named-onnx": (b'{"not": "onnx"}', "bad.onnx"),
    "a-directory": ("dir", "bad.onnx"),
    "wrong-suffix": ("pt", "no runner"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_unreadable_model_file(model, tmp_path, case):
    content, name = BAD_FILES[case]
    bad = tmp_path / ("bad.pt" if content == "pt" else "bad.onnx")
    if content == "truncate":
        bad.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    elif content == "dir":
        bad.mkdir()
    elif content == "pt":
        bad.write_bytes(model.read_bytes())
    elif content is not None:
        bad.write_bytes(content)
    out = tmp_path / "new" / "samples"
    assert_user_error(invoke("ddpm-run", *_job(model=bad, out=out)), name if name != "bad.onnx" else str(bad))
    assert not (tmp_path / "new").exists()


def test_onnx_without_our_io_names(tmp_path):
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Identity", ["input"], ["output"])], "g",
                          [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["b", 1, 8, 8])],
                          [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["b", 1, 8, 8])])
    p = tmp_path / "foreign.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(p))
    assert_user_error(invoke("ddpm-run", *_job(model=p, out=tmp_path / "s")), "expected", "inputs")
    assert not (tmp_path / "s").exists()


# --- faults of the machine --------------------------------------------------------------------------------------

def _full_after(root: Path, n_ok: int):
    """A disk that fills up under ``root``: the first ``n_ok`` files opened for writing there succeed, the rest fail
    their writes with ENOSPC — an OSError without a file name, as write(2) gives it (harness.disk_full)."""
    opened = {"n": 0}

    def when(path):
        opened["n"] += 1
        return opened["n"] > n_ok

    return disk_full(root, when=when)


def test_enospc_mid_job_keeps_finished_batches_and_resume_finishes_the_same_bytes(model, done_job, tmp_path):
    out = tmp_path / "s"
    with _full_after(out / "parts", 2):  # the third batch cannot be written
        o = invoke("ddpm-run", *_job(model, out))
    line = assert_user_error(o, "No space left on device", "4 of 6 images done", "--resume")
    assert f"{out}/parts/0000000004-0000000005.npy" in line  # the file the full disk refused, named
    with np.load(out / "samples.npz") as z:  # the finished images, readable
        assert list(z["indices"]) == [0, 1, 2, 3]
    assert json.loads((out / "run.json").read_text())["status"] == "failed"
    assert_ok(invoke("ddpm-run", *_job(model, out, "--resume")))
    assert _digest(out) == _digest(done_job)
    assert json.loads((out / "run.json").read_text())["status"] == "complete"
    assert not (out / "parts").exists() and not temp_files(out)


def test_enospc_everywhere_keeps_the_parts_and_says_what_could_not_be_written(model, done_job, tmp_path):
    """The whole disk fills after two batches: samples.npz, grid.png and run.json of the interruption cannot be
    written either; the parts and the last run.json are the record, the message says so, and --resume finishes."""
    out = tmp_path / "s"
    out.mkdir()
    opened = {"n": 0, "parts": 0}

    def when(path):
        if path.parent.name == "parts":
            opened["parts"] += 1
        return opened["parts"] > 2

    with disk_full(out, when=when):
        o = invoke("ddpm-run", *_job(model, out))
    line = assert_user_error(o, "No space left on device", "4 of 6 images done", "could not be written")
    assert "samples.npz, grid.png, run.json could not be written" in line
    assert json.loads((out / "run.json").read_text())["done"] == [[0, 1], [2, 3]]  # the last one written
    assert_ok(invoke("ddpm-run", *_job(model, out, "--resume")))
    assert _digest(out) == _digest(done_job)


def test_enospc_on_the_first_write_leaves_nothing(model, tmp_path):
    out = tmp_path / "new" / "s"
    with disk_full(tmp_path / "new"):
        o = invoke("ddpm-run", *_job(model, out))
    assert_user_error(o, "No space left on device", "disk is full", f"{out}/run.json")
    assert not (tmp_path / "new").exists()


def test_enospc_writing_pngs_keeps_the_batch(model, done_job, tmp_path):
    out = tmp_path / "s"
    with _full_after(out / "images", 3):  # the 4th PNG fails: batch 2-3 is done (its part is written first)
        o = invoke("ddpm-run", *_job(model, out))
    assert_user_error(o, "No space left on device", "4 of 6 images done", f"{out}/images/000003.png")
    assert_ok(invoke("ddpm-run", *_job(model, out, "--resume")))
    assert _digest(out) == _digest(done_job)  # the missing PNG of the kept batch was written on resume


def test_resume_of_a_complete_job_writes_missing_pngs(model, done_job, tmp_path):
    out = _copy(done_job, tmp_path / "s")
    (out / "images" / "000002.png").unlink()
    o = invoke("ddpm-run", *_job(model, out, "--resume"))
    assert_ok(o)
    assert "wrote the 1 missing images/*.png" in o.stderr
    assert _digest(out) == _digest(done_job)


BAD_RUN_JSON = {
    "done-not-pairs": lambda d: d.update(done=[[0]]),
    "done-text": lambda d: d.update(done="all"),
    "diffusion-null": lambda d: d.update(diffusion=None),
    "seed-text": lambda d: d.update(seed="0"),
    "not-an-object": lambda d: d.clear(),
}


@pytest.mark.parametrize("case", sorted(BAD_RUN_JSON))
@pytest.mark.parametrize("mode", ["new", "resume"])
def test_malformed_run_json_is_named_not_a_traceback(model, done_job, tmp_path, case, mode):
    out = _copy(done_job, tmp_path / "s")
    d = json.loads((out / "run.json").read_text())
    BAD_RUN_JSON[case](d)
    (out / "run.json").write_text(json.dumps(d if d else []))
    before = snapshot(out)
    extra = ["--resume"] if mode == "resume" else []
    o = invoke("ddpm-run", *_job(model, out, *extra))
    if mode == "new":  # refused as a folder holding samples
        assert_user_error(o, "already holds samples", "--overwrite")
    else:
        assert_user_error(o, f"{out}/run.json")
    assert_kept(before, out)


# --- interruptions: SIGINT, SIGTERM, kill -9 (real processes) ---------------------------------------------------

LONG = ["--num", "12", "--batch", "2", "--steps", "250"]


@pytest.fixture(scope="module")
def long_reference(model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sample_faults_long") / "ref"
    assert_ok(invoke("ddpm-run", "sample", "--onnx", model, "--out", out, *LONG))
    return out


def _start_and_signal(model, out, signum, *extra):
    cmd = [str(BIN / "ddpm-run"), "sample", "--onnx", str(model), "--out", str(out), *LONG, *extra]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "DDPM_NO_PROGRESS": "1"})
    deadline = time.monotonic() + 120

    def batches_recorded():
        try:
            return json.loads((out / "run.json").read_text())["done"]
        except (OSError, ValueError, KeyError):
            return []

    while not batches_recorded():
        assert p.poll() is None, p.communicate()
        assert time.monotonic() < deadline, "no batch finished in 120 s"
        time.sleep(0.02)
    p.send_signal(signum)
    stdout, stderr = p.communicate(timeout=120)
    return p.returncode, stdout, stderr


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM", "SIGKILL"])
def test_interrupted_job_keeps_batches_and_resumes_to_the_same_bytes(model, long_reference, tmp_path, signame):
    signum = getattr(signal, signame)
    out = tmp_path / "s"
    code, stdout, stderr = _start_and_signal(model, out, signum)
    run = json.loads((out / "run.json").read_text())
    parts = sorted((out / "parts").glob("*.npy"))
    n_done = sum(len(np.load(p)) for p in parts)  # every finished batch readable
    assert 0 < n_done < 12, parts
    if signame == "SIGKILL":
        # run.json is written after each batch's part: at most one batch behind the parts, which --resume trusts
        assert code == -signal.SIGKILL and run["status"] == "running"
        assert 0 < sum(b - a + 1 for a, b in run["done"]) <= n_done
    else:
        from reliability.harness import Outcome

        line = assert_user_error(Outcome(code, stdout, stderr), f"interrupted by {signame}",
                                 f"{n_done} of 12 images done", "--resume", code=128 + signum)
        assert "ddpm-run sample --onnx" in line and str(out) in line
        assert run["status"] == "interrupted" and sum(b - a + 1 for a, b in run["done"]) == n_done
        with np.load(out / "samples.npz") as z:
            assert len(z["images"]) == n_done and list(z["indices"]) == list(range(n_done))
    before = snapshot(out / "parts")
    o = invoke("ddpm-run", "sample", "--onnx", model, "--out", out, *LONG, "--resume")
    assert_ok(o)
    assert f"{n_done} of 12 images done" in o.stderr
    assert _digest(out) == _digest(long_reference)
    assert json.loads((out / "run.json").read_text())["status"] == "complete"
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "images", "run.json", "samples.npz"]
    assert before  # there were parts to keep


def test_interrupted_job_is_refused_without_resume_and_by_readers(model, tmp_path):
    out = tmp_path / "s"
    code, _, stderr = _start_and_signal(model, out, signal.SIGTERM, "--no-pngs")
    assert code == 143, stderr  # once seen as 1 in CI (not reproduced in 4 runs here): the message says why
    before = snapshot(out)
    line = assert_user_error(invoke("ddpm-run", "sample", "--onnx", model, "--out", out, *LONG, "--no-pngs"),
                             "--resume")
    assert "interrupted" in line
    assert_user_error(invoke("ddpm-run", "merge", tmp_path / "merged", out), "unfinished", "--resume")
    assert_kept(before, out)
    assert not (tmp_path / "merged").exists()


# --- the same bytes whatever the batch size --------------------------------------------------------------------

def test_samples_npz_bytes_do_not_depend_on_batch_or_time(model, done_job, tmp_path):
    out = tmp_path / "s"
    time.sleep(2.1)  # zip member timestamps have 2 s resolution: this job's clock differs from done_job's
    assert_ok(invoke("ddpm-run", *_job(model, out, batch=4)))
    assert _digest(out) == _digest(done_job)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads which file an fd is from /proc (Linux)")
def test_the_merged_samples_are_durable_before_the_parts_are_removed(model, tmp_path, monkeypatch):
    """On completion the parts are merged into samples.npz and removed: samples.npz's bytes and its rename must
    reach the disk first (fsync of the file, then of the folder), or a crash right after could leave neither."""
    import shutil

    from ddpm_deploy.runtime import fileio, output

    events = []
    real_fsync, real_rmtree = os.fsync, shutil.rmtree

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def rmtree(path, *a, **kw):
        events.append(("rmtree", str(path)))
        return real_rmtree(path, *a, **kw)

    monkeypatch.setattr(output.os, "fsync", fsync)  # (the os module: output and fileio share it)
    monkeypatch.setattr(output.shutil, "rmtree", rmtree)
    assert fileio.os is output.os
    out = tmp_path / "samples"
    assert_ok(invoke("ddpm-run", *_job(model, out)))

    real_out = os.path.realpath(out)  # /proc gives resolved paths
    removed = events.index(("rmtree", str(out / "parts")))
    synced = [path for kind, path in events[:removed] if kind == "fsync"]
    npz_tmp = [k for k, path in enumerate(synced) if Path(path).name.startswith(".samples.npz")]
    assert npz_tmp, synced  # the temporary samples.npz's bytes, before its rename
    assert real_out in synced[npz_tmp[-1]:], synced  # then the folder holding the rename
    run_json = [k for k, path in enumerate(synced) if Path(path).name.startswith(".run.json")]
    assert run_json and real_out in synced[run_json[-1]:], synced  # run.json "complete", then its folder


def test_overwrite_removes_only_the_pngs_it_wrote(tmp_path, request):
    """--overwrite replaces the job that run.json records: its images/NNNNNN.png go, a user's other PNGs in images/
    stay, and a PNG the new job would write that no record says we wrote is refused before anything is removed."""
    from reliability.harness import assert_kept, assert_ok, assert_user_error, invoke, snapshot

    model = request.getfixturevalue("random_micro_onnx")
    out = tmp_path / "o"
    args = ["sample", "--onnx", model, "--out", out, "--num", 2, "--batch", 2, "--steps", 3]
    assert_ok(invoke("ddpm-run", *args))
    (out / "images" / "cover.png").write_bytes(b"mine")
    (out / "images" / "000005.png").write_bytes(b"mine too")
    assert_ok(invoke("ddpm-run", *args, "--overwrite"))
    assert (out / "images" / "cover.png").read_bytes() == b"mine"
    assert (out / "images" / "000005.png").read_bytes() == b"mine too"
    before = snapshot(out)
    o = invoke("ddpm-run", "sample", "--onnx", model, "--out", out, "--num", 6, "--batch", 2, "--steps", 3,
               "--overwrite")
    assert_user_error(o, "images/000005.png", "--no-pngs")
    assert_kept(before, out)
