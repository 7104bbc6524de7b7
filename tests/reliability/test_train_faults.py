"""Bad-input / fault corpus of `ddpm-train` (issue 15, "nothing lost, nothing silent").

Each case runs the command as a user would — in-process (``invoke``) unless it needs a real process (signals) — and
asserts the harness contract: the exit status, one ``error:`` line naming the thing at fault, no traceback, every
file that existed before unchanged, and no empty run folder left behind. Runs are the micro model (8×8 digits);
resumed runs train two steps.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from reliability.harness import SIGNALS, assert_kept, assert_ok, assert_user_error, disk_full, invoke, run, snapshot

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

MICRO_SET = ["--set", "image_size=8", "--set", "ch=16", "--set", "ch_mult=1,2", "--set", "attn_resolutions=4",
             "--set", "norm_groups=8"]
FAST = ["--sample-every", "0", "--no-progress"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


# --- options, checked before a run dir exists -------------------------------------------------------------------

OPTION_CASES = {
    "steps-0": (["--steps", "0"], ["--steps must be a positive integer, found 0"]),
    "steps-negative": (["--steps", "-5"], ["--steps must be a positive integer, found -5"]),
    "batch-size-0": (["--batch-size", "0"], ["--batch-size must be a positive integer"]),
    "lr-0": (["--lr", "0"], ["--lr must be a number > 0"]),
    "lr-nan": (["--lr", "nan"], ["--lr must be a number > 0"]),
    "keep-0": (["--keep", "0"], ["--keep must be a positive integer"]),
    "save-every-0": (["--save-every", "0"], ["--save-every must be a positive integer"]),
    "log-every-0": (["--log-every", "0"], ["--log-every must be a positive integer"]),
    "warmup-negative": (["--warmup-steps", "-1"], ["--warmup-steps must be an integer >= 0"]),
    "grad-clip-negative": (["--grad-clip", "-1"], ["--grad-clip must be a number >= 0"]),
    "ema-decay-1": (["--ema-decay", "1"], ["--ema-decay must be a number in [0, 1)"]),
    "sample-every-negative": (["--sample-every", "-1"], ["--sample-every must be an integer >= 0"]),
    "num-timesteps-1": (["--num-timesteps", "1"], ["--num-timesteps 1", "num_timesteps must be >= 2"]),
    "steps-not-int": (["--steps", "ten"], ["--steps", "ten"]),
    "set-attn-5": (["--set", "attn_resolutions=5"], ["attn_resolutions", "5 matches no level"]),
    "set-ch-0": (["--set", "ch=0"], ["--set", "ch must be a positive integer, found 0"]),
    "set-ch-str": (["--set", "ch=abc"], ["--set ch", "'abc'"]),
    "set-dropout": (["--set", "dropout=1.5"], ["--set", "dropout must be a number in [0, 1), found 1.5"]),
    "set-norm-groups": (["--set", "norm_groups=7"], ["--set", "norm_groups 7 must divide"]),
    "set-ch-mult-empty": (["--set", "ch_mult="], ["--set", "ch_mult must be a non-empty list"]),
    "set-image-size": (["--set", "image_size=9"], ["--set", "image_size 9 must be divisible"]),
    "set-unknown": (["--set", "bogus=1"], ["unknown field 'bogus'"]),
    "set-no-value": (["--set", "ch"], ["FIELD=VALUE"]),
    "set-steps-0": (["--set", "steps=0"], ["--set", "steps must be a positive integer"]),
    "set-flip-maybe": (["--set", "flip=maybe"], ["--set flip", "'maybe'"]),
    "channels-5": (["--channels", "5"], ["--channels"]),
    "resume-from-missing": (["--resume-from", "checkpoints/step_5"], ["run directory", "not found"]),
}


@pytest.mark.parametrize("case", sorted(OPTION_CASES))
def test_option_checked_before_a_run_dir_exists(tmp_path, monkeypatch, case):
    monkeypatch.chdir(tmp_path)
    args, names = OPTION_CASES[case]
    out = tmp_path / "out"
    # a case that failed to fail trains one micro step, not a preset's run
    o = invoke("ddpm-train", "--steps", "1", *FAST, *MICRO_SET, *args, "--out", out,
               env={"DDPM_RUNS_DIR": str(tmp_path / "runs")})
    assert_user_error(o, *names)
    assert not out.exists() and not (tmp_path / "runs").exists()


def test_out_is_a_file(tmp_path):
    f = tmp_path / "run.txt"
    f.write_text("keep me")
    before = snapshot(f)
    assert_user_error(invoke("ddpm-train", "--out", f, "--steps", "1", *FAST, *MICRO_SET), "run.txt")
    assert_kept(before, f)


def test_out_already_holds_a_run(micro_run, tmp_path):
    r = shutil.copytree(micro_run, tmp_path / "run")
    before = snapshot(r)
    assert_user_error(invoke("ddpm-train", "--out", r, "--steps", "1", *FAST, *MICRO_SET), str(r), "--resume")
    assert_kept(before, r)


# --- datasets ---------------------------------------------------------------------------------------------------

def _cifar_batch(n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {b"batch_label": b"training batch", b"labels": [int(v) for v in rng.integers(0, 10, n)],
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"filenames": [f"img_{i}.png".encode() for i in range(n)]}


class _CallsSystem:
    def __reduce__(self):
        return (os.system, ("echo PWNED",))


class _Rot13:
    """A protocol-2 pickle that uses _codecs.encode for something other than latin-1 bytes."""

    def __reduce__(self):
        import _codecs

        return (_codecs.encode, ("uryyb", "rot13"))


def _pickle(path: Path, obj, protocol: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


def _npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


DATASET_CASES = {
    "npz-missing": (lambda d: "npz:" + str(d / "none.npz"), ["none.npz", "does not exist"]),
    "folder-empty": (lambda d: (d / "imgs").mkdir() or f"folder:{d / 'imgs'}", ["imgs"]),
    "folder-broken-png": (lambda d: ((d / "imgs").mkdir(), (d / "imgs" / "a.png").write_bytes(b"not a png"))
                          and f"folder:{d / 'imgs'}", ["a.png"]),
    "npz-corrupt": (lambda d: ((d / "x.npz").write_bytes(b"PK\x03\x04garbage"), f"npz:{d / 'x.npz'}")[1], ["x.npz"]),
    "npz-wrong-shape": (lambda d: f"npz:{_npz(d / 'x.npz', images=np.zeros((4, 5), np.float32))}", ["x.npz"]),
    "npz-no-known-key": (lambda d: f"npz:{_npz(d / 'x.npz', a=np.zeros((4, 8, 8), np.uint8), b=np.zeros(4))}",
                         ["x.npz", "Rename the image array to 'images'"]),
    "npz-nan": (lambda d: f"npz:{_npz(d / 'x.npz', images=np.full((4, 8, 8, 1), np.nan, np.float32))}", ["x.npz"]),
    "npz-empty": (lambda d: f"npz:{_npz(d / 'x.npz', images=np.zeros((0, 8, 8, 1), np.uint8))}",
                  ["x.npz", "no images"]),
    "cifar-corrupt": (lambda d: ((d / "c").mkdir(), (d / "c" / "data_batch_1").write_bytes(
        pickle.dumps(_cifar_batch(2, 0), protocol=4)[:100])) and f"cifar10:{d / 'c'}", ["data_batch_1"]),
    "cifar-malicious": (lambda d: f"cifar10:{_pickle(d / 'c' / 'data_batch_1', {**_cifar_batch(2, 0), b'x': _CallsSystem()}, 2)}",
                        ["Refused", "data_batch_1", "system"]),
    "cifar-p2-codecs-abuse": (lambda d: f"cifar10:{_pickle(d / 'c' / 'data_batch_1', {**_cifar_batch(2, 0), b'x': _Rot13()}, 2)}",
                              ["data_batch_1", "rot13"]),
    "cifar-no-batches": (lambda d: (d / "c").mkdir() or f"cifar10:{d / 'c'}", ["data_batch"]),
    "unknown-kind": (lambda d: "imagenet:/data", ["imagenet"]),
}


@pytest.mark.parametrize("case", sorted(DATASET_CASES))
def test_dataset_variant(tmp_path, capfd, case):
    make, names = DATASET_CASES[case]
    spec = make(tmp_path)
    before = snapshot(tmp_path)
    out = tmp_path / "out"
    o = invoke("ddpm-train", "--dataset", spec, "--out", out, "--steps", "1", *FAST, *MICRO_SET)
    assert_user_error(o, *names)
    assert_kept(before, tmp_path)
    assert not out.exists()
    assert "PWNED" not in capfd.readouterr().out


def test_cifar_protocol2_batches_are_valid_data(tmp_path):
    """CIFAR batches pickled with protocol 2 by Python 3 (bytes as _codecs.encode(str, 'latin1')) train."""
    d = tmp_path / "cifar"
    _pickle(d / "data_batch_1", _cifar_batch(6, 1), 2)
    assert b"_codecs\nencode" in (d / "data_batch_1").read_bytes()
    o = invoke("ddpm-train", "--dataset", f"cifar10:{d}", "--out", tmp_path / "out", "--steps", "1", "--batch-size",
               "4", *FAST, *MICRO_SET)
    assert_ok(o)
    card = json.loads((tmp_path / "out" / "model.json").read_text())
    assert card["training"]["num_images"] == 6


# --- resume -----------------------------------------------------------------------------------------------------

@pytest.fixture()
def rundir(micro_run, tmp_path) -> Path:
    return shutil.copytree(micro_run, tmp_path / "run", ignore=shutil.ignore_patterns("export", "parity"))


def _edit_json(path: Path, fn) -> None:
    d = json.loads(path.read_text())
    fn(d)
    path.write_text(json.dumps(d))


def _resume_fails(rundir: Path, *names, args=("--steps", "32")) -> str:
    before = snapshot(rundir)
    o = invoke("ddpm-train", "--resume", "--out", rundir, *args, *FAST)
    line = assert_user_error(o, *names)
    assert_kept(before, rundir)
    return line


LAST = "checkpoints/step_00000030"
RESUME_CASES = {
    "steps-below-done": (lambda r: None, ["--steps 10 is below the 30 steps already done", "model.json is unchanged"],
                         ("--steps", "10")),
    "last-weights-truncated": (lambda r: (r / LAST / "weights.safetensors").write_bytes(b"\x08\x00\x00"),
                               ["step_00000030/weights.safetensors", "--resume-from"], ("--steps", "32")),
    "last-state-truncated": (lambda r: (r / LAST / "state.safetensors").write_bytes(
        (r / LAST / "state.safetensors").read_bytes()[:300]), ["step_00000030/state.safetensors", "truncated"],
        ("--steps", "32")),
    "last-state-missing": (lambda r: (r / LAST / "state.safetensors").unlink(), ["state.safetensors", "not found"],
                           ("--steps", "32")),
    "no-checkpoints": (lambda r: shutil.rmtree(r / "checkpoints"), ["has no checkpoints/step_*"], ("--steps", "32")),
    "resume-from-unknown": (lambda r: None, ["--resume-from checkpoints/step_7", "step_00000010"],
                            ("--resume-from", "checkpoints/step_7", "--steps", "32")),
    "model-json-missing": (lambda r: (r / "model.json").unlink(), ["model.json", "not found"], ("--steps", "32")),
    "model-json-ch-str": (lambda r: _edit_json(r / "model.json", lambda d: d["architecture"].__setitem__("ch", "16")),
                          ['architecture.ch must be a positive integer, found "16"'], ("--steps", "32")),
    "arch-vs-checkpoint": (lambda r: _edit_json(r / "model.json", lambda d: d["architecture"].__setitem__("ch", 32)),
                           ["weights do not match", "architecture.ch = 32"], ("--steps", "32")),
    "training-steps-str": (lambda r: _edit_json(r / "model.json", lambda d: d["training"].__setitem__("steps", "30")),
                           ['training.steps must be a positive integer, found "30"'], ("--steps", "32")),
    "training-missing": (lambda r: _edit_json(r / "model.json", lambda d: d.pop("training")),
                         ["training.steps is missing"], ("--steps", "32")),
    "change-schedule": (lambda r: None, ["--schedule", "--num-timesteps", "cannot change it"],
                        ("--schedule", "cosine", "--num-timesteps", "100", "--steps", "32")),
    "change-architecture": (lambda r: None, ["cannot change the architecture"], ("--set", "ch=32", "--steps", "32")),
    "loss-jsonl-corrupt-middle": (lambda r: (r / "loss.jsonl").write_text('{"step": 5}\nnot json\n{"step": 10}\n'),
                                  ["loss.jsonl", "line 2"], ("--steps", "32")),
}


@pytest.mark.parametrize("case", sorted(RESUME_CASES))
def test_resume_refuses(rundir, case):
    fn, names, args = RESUME_CASES[case]
    fn(rundir)
    _resume_fails(rundir, *names, args=args)


def test_resume_of_a_missing_run(tmp_path):
    o = invoke("ddpm-train", "--resume", "--out", tmp_path / "nope", "--steps", "3", *FAST)
    assert_user_error(o, "nope", "not found")
    assert not (tmp_path / "nope").exists()


def _steps(rundir: Path) -> list[int]:
    return [json.loads(ln)["step"] for ln in (rundir / "loss.jsonl").read_text().splitlines()]


def test_resume_from_an_older_checkpoint_when_the_last_is_corrupt(rundir):
    """The advice of the corrupt-checkpoint error is true: --resume-from an older checkpoint continues."""
    (rundir / LAST / "weights.safetensors").write_bytes(b"\x08\x00\x00")
    o = invoke("ddpm-train", "--resume-from", "checkpoints/step_00000020", "--out", rundir, "--steps", "31", *FAST)
    assert_ok(o)
    assert "trained 31/31 steps" in o.stdout
    assert _steps(rundir) == [5, 10, 15, 20, 25, 30, 31]
    from ddpm_deploy.trainer.checkpoint import load_weights

    assert load_weights(rundir / LAST / "weights.safetensors", "ema")[1] == 30  # the corrupt one was re-done


def test_resume_from_by_step_number(rundir):
    o = invoke("ddpm-train", "--resume-from", "10", "--out", rundir, "--steps", "12", "--save-every", "100", *FAST)
    assert_ok(o)
    assert _steps(rundir)[-1] == 12 and 15 not in _steps(rundir)


def test_resume_from_an_older_checkpoint_sets_the_newer_ones_aside(rundir):
    """Resuming from step 10 abandons steps 20 and 30: they are moved to abandoned/ (nothing deleted), so neither a
    later --resume continues from the stale step 30 nor pruning (--keep 1) deletes the new work in their favour."""
    newer = {n: snapshot(rundir / "checkpoints" / n) for n in ("step_00000020", "step_00000030")}
    o = invoke("ddpm-train", "--resume-from", "10", "--out", rundir, "--steps", "12", "--save-every", "2",
               "--keep", "1", *FAST)
    assert_ok(o)
    assert "moved the 2 newer checkpoint(s)" in o.stderr
    assert [c.name for c in sorted((rundir / "checkpoints").iterdir())] == ["step_00000012"]
    (aside,) = (rundir / "abandoned").iterdir()
    for name, files in newer.items():  # the abandoned branch, byte for byte
        assert {Path(k).name: v for k, v in snapshot(aside / name).items()} == \
            {Path(k).name: v for k, v in files.items()}
    o = invoke("ddpm-train", "--resume", "--out", rundir, "--steps", "14", "--save-every", "2", *FAST)
    assert_ok(o)
    assert _steps(rundir)[-3:] == [10, 12, 14]  # continued from 12, not from the abandoned 30


def test_resume_from_a_checkpoint_of_another_run_is_refused(rundir, micro_run):
    other = micro_run / "checkpoints" / "step_00000020"
    before = snapshot(rundir)
    assert_user_error(invoke("ddpm-train", "--resume-from", other, "--out", rundir, "--steps", "32", *FAST),
                      str(other), "not a checkpoint of")
    assert_kept(before, rundir)


def test_resume_survives_a_torn_last_line_of_loss_jsonl(rundir):
    with open(rundir / "loss.jsonl", "a") as f:
        f.write('{"step": 31, "lo')
    o = invoke("ddpm-train", "--resume", "--out", rundir, "--steps", "32", *FAST)
    assert_ok(o)
    assert "warning:" in o.stderr and "torn last line" in o.stderr and not o.error_lines
    assert _steps(rundir) == [5, 10, 15, 20, 25, 30, 32]


def test_resume_cleans_temp_files_of_a_killed_write(rundir):
    left = [rundir / ".model.json.abc123.tmp", rundir / ".weights.safetensors.x1.tmp",
            rundir / "checkpoints" / ".tmp_step_q9"]
    left[0].write_text("{")
    left[1].write_bytes(b"\0" * 10)
    left[2].mkdir()
    (left[2] / "weights.safetensors").write_bytes(b"\0" * 10)
    o = invoke("ddpm-train", "--resume", "--out", rundir, "--steps", "32", *FAST)
    assert_ok(o)
    assert not any(p.exists() for p in left)
    assert o.stderr.count("left by an interrupted write") == 3


# --- faults of the machine --------------------------------------------------------------------------------------

def test_disk_full_while_writing_a_checkpoint(rundir):
    ckpts = rundir / "checkpoints"
    before = snapshot(ckpts)
    with disk_full(ckpts):
        o = invoke("ddpm-train", "--resume", "--out", rundir, "--steps", "33", "--save-every", "1", *FAST)
    assert_user_error(o, str(ckpts / "step_00000031"), "No space left on device",
                      "checkpoint step_00000030 kept", f"ddpm-train --resume --out {rundir}")
    assert_kept(before, ckpts)
    assert not list(ckpts.glob(".tmp_step_*"))


def test_disk_full_while_refreshing_the_top_level_weights(rundir):
    before = snapshot(rundir / "checkpoints", rundir / "weights.safetensors")
    # the atomic write's temporary file beside weights.safetensors (checkpoints/ is written first, and whole)
    with disk_full(rundir, when=lambda p: p.parent == rundir and "weights.safetensors" in p.name):
        o = invoke("ddpm-train", "--resume", "--out", rundir, "--steps", "32", *FAST)
    assert_user_error(o, "weights.safetensors", "No space left on device", "checkpoint step_00000032 kept")
    assert (rundir / "checkpoints" / "step_00000032").is_dir()
    assert_kept(before, rundir / "checkpoints", rundir / "weights.safetensors")


def test_disk_full_on_a_new_run_leaves_no_folder(tmp_path):
    out = tmp_path / "out"
    with disk_full(out):
        o = invoke("ddpm-train", "--out", out, "--steps", "2", *FAST, *MICRO_SET)
    assert_user_error(o, "model.json", "No space left on device", "cannot be resumed")
    assert not out.exists()


def test_disk_full_on_the_loss_log(tmp_path):
    out = tmp_path / "out"
    with disk_full(out / "loss.jsonl"):
        o = invoke("ddpm-train", "--out", out, "--steps", "6", "--log-every", "2", *FAST, *MICRO_SET)
    assert_user_error(o, str(out / "loss.jsonl"), "No space left on device", "at step 2")


# --- signals (real processes) -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(SIGNALS))
def test_signal_saves_a_checkpoint_and_resume_continues(tmp_path, name):
    signum, code = SIGNALS[name]
    out = tmp_path / "run"
    o = run("ddpm-train", "--out", out, "--steps", "100000", "--save-every", "100000", "--log-every", "1", "-vv",
            *FAST, *MICRO_SET, cwd=tmp_path, signal_after=("step 3/100000", signum), timeout=300)
    line = assert_user_error(o, f"interrupted by {name}", f"--resume --out {out}", code=code)
    assert "resume with" in o.stdout
    step = int(line.split(" at step ")[1].split("/")[0])
    assert step >= 3 and (out / "checkpoints" / f"step_{step:08d}").is_dir()
    before = snapshot(out / "checkpoints")
    r = invoke("ddpm-train", "--resume", "--out", out, "--steps", str(step + 2), *FAST)
    assert_ok(r)
    assert f"trained {step + 2}/{step + 2} steps" in r.stdout
    assert_kept(before, out / "checkpoints")


def test_a_second_train_on_a_run_in_use_is_refused(tmp_path):
    """Two `ddpm-train --resume` on one run dir interleaved their checkpoints and loss.jsonl (a session lost steps that
    way): while one trains, a second is refused with one line and changes nothing."""
    import subprocess
    import time

    from reliability.harness import BIN

    out = tmp_path / "run"
    assert_ok(invoke("ddpm-train", "--out", out, "--steps", "2", *FAST, *MICRO_SET))
    env = {**os.environ, "DDPM_NO_PROGRESS": "1"}
    log = tmp_path / "first.log"
    with open(log, "w") as f:  # a file, not a pipe: an unread pipe would block the first training
        first = subprocess.Popen([str(BIN / "ddpm-train"), "--resume", "--out", str(out), "--steps", "100000", "-vv",
                                  "--log-every", "1", *map(str, FAST)], stdout=subprocess.DEVNULL, stderr=f, text=True, env=env)
    try:
        deadline = time.monotonic() + 240
        while "step 4/100000" not in log.read_text() and time.monotonic() < deadline and first.poll() is None:
            time.sleep(0.1)
        assert first.poll() is None, "the first training ended early:\n" + log.read_text()[-2000:]
        o = run("ddpm-train", "--resume", "--out", out, "--steps", "100000", *FAST, timeout=120)  # not refused: hangs
        assert_user_error(o, str(out), "in use by another ddpm-train")
    finally:
        first.terminate()
        first.wait(timeout=120)
