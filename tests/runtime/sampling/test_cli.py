"""Schedulers everywhere a user samples: ``ddpm-run sample --scheduler/--eta/--order/--option/--scheduler-config``,
the Python API, run.json and --resume; every wrong option is one ``error:`` line."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from ddpm_deploy import Sampler
from ddpm_deploy.verify.cli import main as run_cli


def _sample(onnx, out, *extra):
    args = ["sample", "--onnx", str(onnx), "--num", "3", "--batch", "2", "--seed", "4", "--threads", "1",
            "--no-pngs", "--out", str(out), *extra]
    return CliRunner().invoke(run_cli, args)


@pytest.mark.parametrize("extra, scheduler, steps, options", [
    (["--scheduler", "dpmsolver++", "--steps", "10"], "dpmsolver++", 10, {}),
    (["--scheduler", "ddim", "--steps", "8", "--eta", "0.5"], "ddim", 8, {"eta": 0.5}),
    (["--scheduler", "unipc", "--order", "3", "--steps", "6"], "unipc", 6, {"solver_order": 3}),
    (["--scheduler", "sde-dpmsolver++", "--option", "use_karras_sigmas=true", "--steps", "7"], "sde-dpmsolver++", 7,
     {"use_karras_sigmas": True}),
    (["--scheduler", "DDIMScheduler"], "ddim", 20, {}),  # a diffusers class name; the fast default of 20 calls
])
def test_sample_with_a_scheduler_equals_the_python_api(micro_onnx, tmp_path, extra, scheduler, steps, options):
    r = _sample(micro_onnx, tmp_path / "s", *extra)

    assert r.exit_code == 0, r.output
    info = json.loads((tmp_path / "s" / "run.json").read_text())
    got = np.load(tmp_path / "s" / "samples.npz")["images"]
    with Sampler.from_onnx(micro_onnx, threads=1) as s:
        want = s(3, seed=4, steps=steps, scheduler=scheduler, batch=2, **options)
        plan = s.plan(steps, scheduler, **options)
    np.testing.assert_array_equal(got, want)
    assert info["scheduler"] == json.loads(json.dumps(plan.describe())) and info["steps"] == steps
    assert f"{plan.scheduler}, {steps} ε calls each" in r.output


def test_a_diffusers_scheduler_config_file_is_read_as_is(micro_onnx, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    diffusers.UniPCMultistepScheduler(solver_order=3).save_config(tmp_path / "cfg")
    a = _sample(micro_onnx, tmp_path / "a", "--scheduler-config", str(tmp_path / "cfg" / "scheduler_config.json"),
                "--steps", "6")
    b = _sample(micro_onnx, tmp_path / "b", "--scheduler", "unipc", "--order", "3", "--steps", "6")

    assert a.exit_code == 0 and b.exit_code == 0, a.output + b.output
    np.testing.assert_array_equal(np.load(tmp_path / "a" / "samples.npz")["images"],
                                  np.load(tmp_path / "b" / "samples.npz")["images"])


@pytest.mark.parametrize("extra, message", [
    (["--scheduler", "ddim", "--order", "2"], "--order is not an option of DDIMScheduler"),
    (["--eta", "0.3"], "--eta is not an option of DDPMScheduler"),
    (["--scheduler", "euler"], "unknown scheduler 'euler'"),
    (["--scheduler", "unipc", "--option", "thresholding=true"], "--option thresholding is not an option of"),
    (["--scheduler", "dpmsolver++", "--option", "nonsense"], "--option must be KEY=VALUE"),
    (["--scheduler", "ddim", "--variance-type", "fixed_large"], "--variance-type is an option of the ddpm scheduler"),
    (["--scheduler", "unipc", "--no-clip"], "--clip/--no-clip is not an option of UniPCMultistepScheduler"),
    (["--scheduler", "ddim", "--eta", "2"], r"eta must be in \[0.0, 1.0\]"),
    (["--scheduler-config", "/nonexistent/scheduler_config.json"], "scheduler config not found"),
])
def test_a_wrong_scheduler_option_is_one_error_line(micro_onnx, tmp_path, extra, message):
    import re

    r = _sample(micro_onnx, tmp_path / "s", *extra)

    assert r.exit_code == 2, r.output
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.search(message, errors[0]), r.output
    assert "Traceback" not in r.output


def test_resume_refuses_another_scheduler_and_continues_the_same(micro_onnx, tmp_path):
    out = tmp_path / "job"
    assert _sample(micro_onnx, out, "--scheduler", "ddim", "--steps", "5").exit_code == 0

    other = _sample(micro_onnx, out, "--scheduler", "dpmsolver++", "--steps", "5", "--resume")
    same = _sample(micro_onnx, out, "--scheduler", "ddim", "--steps", "5", "--resume")

    assert other.exit_code == 2 and "holds another job (scheduler" in other.output
    assert same.exit_code == 0 and "already done" in same.output


def test_a_v3_run_json_resumes_as_ddpm(micro_onnx, tmp_path):
    """run.json before v4 has no scheduler: it was DDPM, and --resume of the same DDPM job is accepted."""
    out = tmp_path / "job"
    assert _sample(micro_onnx, out, "--steps", "5").exit_code == 0
    info = json.loads((out / "run.json").read_text())
    info["schema_version"] = 3
    del info["scheduler"]
    (out / "run.json").write_text(json.dumps(info))

    assert _sample(micro_onnx, out, "--steps", "5", "--resume").exit_code == 0
    assert _sample(micro_onnx, out, "--steps", "5", "--scheduler", "ddim", "--resume").exit_code == 2


def test_api_scheduler_at_construction_and_per_call(micro_onnx):
    with Sampler.from_onnx(micro_onnx, threads=1, scheduler="ddim", eta=1.0) as s:
        a = s(2, seed=1, steps=6)
        b = s(2, seed=1, steps=6, scheduler="ddim", eta=1.0)
        c = s(2, seed=1, steps=6, scheduler="ddim")  # η = 0: another image
        d = s(2, seed=1, steps=6, scheduler="unipc")
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c) and not np.array_equal(c, d)
