"""Training: run dir contents, exact resume, DDP (2 gloo processes) ≡ one process, signals, bad checkpoints."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import MICRO_UNET, train_run
from safetensors.torch import load_file

from ddpm_deploy.runtime.errors import ArtifactError
from ddpm_deploy.trainer.checkpoint import load_model, load_state, load_weights
from ddpm_deploy.trainer.cli import main as train_cli

VENV_BIN = Path(sys.executable).parent
MICRO_SET = ["--set", "image_size=8", "--set", "ch=16", "--set", "ch_mult=1,2", "--set", "attn_resolutions=4",
             "--set", "norm_groups=8"]


def test_run_dir_has_every_artifact(micro_run):
    for name in ("model.json", "weights.safetensors", "state.safetensors", "loss.jsonl", "loss.png"):
        assert (micro_run / name).is_file(), name
    card = json.loads((micro_run / "model.json").read_text())
    assert card["schema_version"] == 1 and card["diffusion"]["num_timesteps"] == 1000
    assert card["data"] == {"channels": 1, "image_size": 8, "value_range": [-1.0, 1.0]}
    assert card["architecture"]["type"] == "ddpm-unet" and card["training"]["dataset"] == "digits"
    keys = load_file(str(micro_run / "weights.safetensors")).keys()
    assert any(k.startswith("ema.") for k in keys) and any(k.startswith("raw.") for k in keys)
    rows = [json.loads(x) for x in (micro_run / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [5, 10, 15, 20, 25, 30]
    assert rows[-1]["loss"] < rows[0]["loss"]  # it learns


def test_keeps_last_k_checkpoints(tmp_path):
    train_run(tmp_path, steps=40, save_every=10, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000030", "step_00000040"]


def test_resume_is_bitwise_exact(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    train_run(straight, steps=20)
    train_run(split, steps=10)
    from ddpm_deploy.runtime.schedule import DiffusionConfig
    from ddpm_deploy.trainer.config import TrainConfig
    from ddpm_deploy.trainer.data import load_dataset
    from ddpm_deploy.trainer.train import Trainer
    from ddpm_deploy.trainer.unet import UNetConfig

    data = load_dataset("digits", image_size=8, channels=1)
    tcfg = TrainConfig(steps=20, batch_size=16, lr=2e-3, warmup_steps=5, ema_decay=0.9, sample_every=0,
                       save_every=10, log_every=5, seed=0)
    Trainer(split, UNetConfig(**MICRO_UNET), tcfg, DiffusionConfig(), data.images, data.name, resume=True).run()
    a, b = load_file(str(straight / "weights.safetensors")), load_file(str(split / "weights.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the optimizer state too, and the loss log has no duplicated steps
    sa, sb = load_state(straight / "state.safetensors"), load_state(split / "state.safetensors")
    assert sa["optimizer"]["param_groups"] == sb["optimizer"]["param_groups"]
    for pid, st in sa["optimizer"]["state"].items():
        for name, v in st.items():
            assert torch.equal(v, sb["optimizer"]["state"][pid][name]), (pid, name)
    assert sa["step"] == sb["step"] == 20
    steps = [json.loads(x)["step"] for x in (split / "loss.jsonl").read_text().splitlines()]
    assert steps == [5, 10, 15, 20]


@pytest.mark.slow
def test_ddp_two_gloo_processes_train_the_same_model_as_one_process(tmp_path):
    args = ["--preset", "tiny", "--dataset", "digits", "--steps", "6", "--batch-size", "8", "--sample-every", "0",
            "--save-every", "6", "--warmup-steps", "2", "--no-progress", *MICRO_SET]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([str(VENV_BIN / "ddpm-train"), *args, "--out", str(tmp_path / "one")], env=env,
                            capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr
    ddp = subprocess.run([str(VENV_BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", "-m",
                          "ddpm_deploy.trainer.cli", *args, "--out", str(tmp_path / "ddp")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a = load_file(str(tmp_path / "one" / "weights.safetensors"))
    b = load_file(str(tmp_path / "ddp" / "weights.safetensors"))
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    moved = max(float((a[k] - load_file(str(tmp_path / "one" / "checkpoints" / "step_00000006" /
                                             "weights.safetensors"))[k]).abs().max()) for k in a)
    assert moved == 0.0  # top-level weights are the last checkpoint
    # Same global batch, averaged gradients: only the all-reduce summation order differs.
    assert worst < 1e-5, f"DDP vs single process: max |Δw| = {worst}"
    # and training actually changed the weights (the comparison is not trivially equal)
    assert max(float(a[k].abs().max()) for k in a if k.startswith("raw.conv_out")) > 0


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    out = tmp_path / "run"
    p = subprocess.Popen([str(VENV_BIN / "ddpm-train"), "--steps", "100000", "--save-every", "100000",
                          "--sample-every", "0", "--out", str(out), "--no-progress", *MICRO_SET],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "loss.jsonl").exists():
        time.sleep(0.2)
    time.sleep(1.0)
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 143, stderr  # 128 + SIGTERM, as the shell reports a TERM-ed job
    assert "Traceback" not in stderr
    assert "resume with" in stdout
    ckpts = list((out / "checkpoints").iterdir())
    assert len(ckpts) == 1
    _, step = load_weights(out / "weights.safetensors", "ema")
    assert 0 < step < 100000


def test_truncated_weights_give_clear_error(micro_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(micro_run, run)
    w = run / "weights.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    with pytest.raises(ArtifactError, match="truncated or corrupt"):
        load_model(run)


def test_corrupt_state_gives_clear_error(micro_run, tmp_path):
    bad = tmp_path / "state.safetensors"
    bad.write_bytes((micro_run / "state.safetensors").read_bytes()[:200])
    with pytest.raises(ArtifactError, match="state is truncated or corrupt"):
        load_state(bad)


def test_a_pickle_in_place_of_the_state_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.getcwd, ())

    bad = tmp_path / "state.safetensors"
    torch.save({"x": Evil()}, bad)  # a torch pickle where our safetensors state should be: never unpickled
    with pytest.raises(ArtifactError, match="truncated or corrupt"):
        load_state(bad)


def test_cli_trains_writes_latest_and_refuses_overwrite(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(train_cli, ["--steps", "4", "--sample-every", "4", "--save-every", "2", *MICRO_SET])
    assert r.exit_code == 0, r.output
    assert "trained 4/4 steps" in r.output
    latest = tmp_path / "runs" / "latest"
    assert latest.is_symlink() and (latest / "model.json").is_file()
    assert (latest / "samples" / "step_00000004.png").is_file()
    again = CliRunner().invoke(train_cli, ["--out", str(latest.resolve()), "--steps", "2", *MICRO_SET])
    assert again.exit_code == 2 and "already holds a run" in again.output
    assert "Traceback" not in again.output


def test_cli_resume_continues_latest(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert CliRunner().invoke(train_cli, ["--steps", "4", "--sample-every", "0", *MICRO_SET]).exit_code == 0
    r = CliRunner().invoke(train_cli, ["--resume", "--steps", "6", "--sample-every", "0"])
    assert r.exit_code == 0, r.output
    assert "trained 6/6 steps" in r.output


@pytest.mark.parametrize("args,msg", [
    (["--set", "bogus=1"], "unknown field 'bogus'"),
    (["--set", "ch"], "FIELD=VALUE"),
    (["--dataset", "nope:x"], "nope"),
    (["--resume", "--out", "/nonexistent/run"], "not found"),
    (["--ema-decay", "1.5"], "--ema-decay must be a number in [0, 1), found 1.5"),
])
def test_cli_errors_are_clean(args, msg, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(train_cli, args + ["--steps", "1"])
    assert r.exit_code == 2, r.output
    assert msg in r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)


def test_cli_help_documents_options():
    r = CliRunner().invoke(train_cli, ["--help"])
    assert r.exit_code == 0 and "--ema-decay" in r.output and "torchrun" in r.output
