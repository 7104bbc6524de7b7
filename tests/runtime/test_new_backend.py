"""The extension point of docs/architecture.md, exercised: a backend in its own module plus one RUNNERS line is
picked by open_runner, driven by the shipped host loop, and sampled from by `ddpm-run sample` unchanged."""

import json

import numpy as np
from click.testing import CliRunner

from ddpm_deploy.runtime.backends import base
from ddpm_deploy.runtime.sampling.config import plan_for
from ddpm_deploy.runtime.sampling.host import sample
from ddpm_deploy.runtime.schedule import DiffusionConfig
from ddpm_deploy.verify.cli import main as run_cli


def test_a_new_backend_is_one_module_and_one_line(tmp_path, monkeypatch):
    model = tmp_path / "model.npz"
    np.savez(model, a=np.float32(0.3), b=np.float32(-0.2), shape=np.array([1, 4, 4]))
    monkeypatch.setitem(base.RUNNERS, (".npz", "cpu"), "toy_backend:LinearNpzRunner")  # the one line

    runner = base.open_runner(model, "cpu", threads=1)
    r = CliRunner().invoke(run_cli, ["sample", "--onnx", str(model), "--schedule", "linear", "--num-timesteps",
                                     "1000", "--steps", "20", "--num", "3", "--batch", "2", "--seed", "5",
                                     "--out", str(tmp_path / "out"), "--no-progress"])

    assert type(runner).__name__ == "LinearNpzRunner"
    assert r.exit_code == 0, r.output
    info = json.loads((tmp_path / "out" / "run.json").read_text())
    assert (info["runner"], info["backend"], info["loop"]) == ("LinearNpzRunner", "toy-linear-npz", "host")
    got = np.load(tmp_path / "out" / "samples.npz")["images"]
    want = sample(runner, plan_for(DiffusionConfig(), "ddpm", 20), (1, 4, 4), seed=5, indices=[0, 1, 2])
    want_u8 = np.round(np.clip((want + 1) / 2, 0, 1) * 255).astype(np.uint8).transpose(0, 2, 3, 1)
    assert np.array_equal(got, want_u8)
