"""Engines where they run (issue 12): build from an ONNX with no torch, adopt a plan built elsewhere, target compute
capabilities, report build progress, and refuse a run dir where a plan path is expected. Real TensorRT-RTX builds."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from ddpm_deploy.export.cli import main as export_cli
from ddpm_deploy.runtime.contract import PlanSidecar
from ddpm_deploy.runtime.plan import read_plan_sidecar, runs_on, sidecar_path
from ddpm_deploy.verify.cli import main as run_cli
from helpers import run_without_torch

ROOT = Path(__file__).resolve().parents[2]
rtx = pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT-RTX is not installed (pip install '.[trt-rtx]')")
pytestmark = pytest.mark.trt


@pytest.fixture()
def onnx_copy(random_micro_onnx, tmp_path):
    """The ONNX alone in a folder, as on a serving machine."""
    path = tmp_path / "model.onnx"
    shutil.copy(random_micro_onnx, path)
    return path


def export(*args):
    return CliRunner().invoke(export_cli, [str(a) for a in args])


# --- the plan path is unambiguous ---------------------------------------------------------------------------

def test_engine_followed_by_a_run_dir_is_refused_naming_the_confusion(micro_run, tmp_path):
    r = export("--engine", micro_run, "--out", tmp_path)

    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "--engine is a flag" in r.output and "a run directory follows it" in r.output
    assert f"ddpm-export {micro_run} --engine" in r.output and "--engine-out" in r.output
    assert not (tmp_path / "model.onnx").exists()


def test_engine_out_that_is_a_directory_is_refused(onnx_copy, tmp_path):
    r = export("--onnx", onnx_copy, "--engine", "--engine-out", tmp_path)

    assert r.exit_code == 2 and "expected a plan file path, found a directory" in r.output


# --- build from the ONNX alone --------------------------------------------------------------------------------

def test_engine_from_onnx_with_torch_blocked(onnx_copy, tmp_path):
    plan = tmp_path / "out" / "m.plan"
    r = run_without_torch(f"""
        from ddpm_deploy.export.cli import main
        try:
            main(["--onnx", r"{onnx_copy}", "--engine", "--engine-out", r"{plan}", "--batch-opt", "2",
                  "--batch-max", "4", "--trt-flavour", "rtx", "--no-progress"])
        except SystemExit as e:
            assert e.code in (0, None), e.code
        assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules), "torch was imported"
        print("OK")
    """)

    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]
    side = read_plan_sidecar(plan)
    assert side.profile == {"min": 1, "opt": 2, "max": 4} and side.onnx["path"] == "model.onnx"
    assert runs_on(side) == ["8.6", "8.9", "12.0"]


@pytest.mark.slow
def test_clean_venv_without_torch_builds_a_plan(onnx_copy, tmp_path):
    """The acceptance: pip install '.[engine,trt-rtx]' in a new venv (no torch), then ddpm-export --onnx --engine."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    # the CI pins as constraints (so pip takes the cached versions); constraints may not carry extras
    pins = [re.sub(r"\[[^\]]*\]", "", line) for line in (ROOT / "requirements-ci.txt").read_text().splitlines()]
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("\n".join(pins) + "\n")
    r = subprocess.run([*pip, "-c", str(constraints), f"{ROOT}[engine,trt-rtx]"],
                       capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stderr[-3000:]
    no_torch = subprocess.run([str(venv / "bin" / "python"), "-c", "import torch"], capture_output=True, timeout=60)
    assert no_torch.returncode != 0  # the extra did not pull torch in

    plan = tmp_path / "plan" / "model.plan"
    r = subprocess.run([str(venv / "bin" / "ddpm-export"), "--onnx", str(onnx_copy), "--engine", "--engine-out",
                        str(plan), "--batch-max", "8", "--no-progress"], capture_output=True, text=True, timeout=600)

    assert r.returncode == 0, r.stderr[-3000:]
    assert plan.is_file() and PlanSidecar.load(sidecar_path(plan)).trt["flavour"] == "rtx"


# --- targets and progress ---------------------------------------------------------------------------------------

def test_compute_capability_targets_are_recorded_and_checked(onnx_copy, tmp_path):
    r = export("--onnx", onnx_copy, "--engine", "--engine-out", tmp_path / "t.plan", "--compute-capability", "8.9",
               "--batch-opt", "2", "--batch-max", "4", "--no-progress")

    assert r.exit_code == 0, r.output
    side = read_plan_sidecar(tmp_path / "t.plan")
    assert side.build["compute_capabilities"] == ["8.9"] and runs_on(side) == ["8.9"]
    assert "runs on compute capability 8.9" in r.output
    # Turing takes fp16 plans: TensorRT-RTX itself refuses fp32 GEMMs for SM75, and the error says so
    turing = export("--onnx", onnx_copy, "--engine", "--engine-out", tmp_path / "t75.plan", "--compute-capability",
                    "7.5", "--batch-opt", "2", "--batch-max", "4", "--no-progress")
    assert turing.exit_code == 2 and "Turing" in turing.output and "Traceback" not in turing.output
    bad = export("--onnx", onnx_copy, "--engine", "--compute-capability", "9.0", "--trt-flavour", "rtx")
    assert bad.exit_code == 2 and "9.0 cannot be targeted" in bad.output and "H100" in bad.output


def test_build_progress_reports_balanced_phases(onnx_copy, tmp_path):
    from ddpm_deploy.export.engine import BuildProgress, EngineSettings, build_engine

    class Record(BuildProgress):
        def __init__(self):
            self.events = []

        def phase_start(self, name, parent, num_steps):
            self.events.append(("start", name, parent, num_steps))

        def step(self, name, step):
            self.events.append(("step", name, step))
            return True

        def phase_finish(self, name):
            self.events.append(("finish", name))

    rec = Record()
    build_engine(onnx_copy, tmp_path / "p.plan", EngineSettings(batch_opt=2, batch_max=4, flavour="rtx"), progress=rec)

    starts = [e[1] for e in rec.events if e[0] == "start"]
    finishes = [e[1] for e in rec.events if e[0] == "finish"]
    assert starts and sorted(starts) == sorted(finishes)
    assert any(e[0] == "start" and e[2] is None for e in rec.events)  # a top-level phase
    assert rec.events[-1] == ("finish", rec.events[0][1])  # the first phase opened is the last one closed


# --- adopting a plan built elsewhere -----------------------------------------------------------------------------

def _trtexec_equivalent(onnx_path: Path, plan: Path, lo=1, opt=4, hi=8) -> None:
    """What `trtexec --onnx=model.onnx --minShapes=x:1x1x8x8,t:1 --optShapes=x:4x1x8x8,t:4 --maxShapes=x:8x1x8x8,t:8
    --stronglyTyped --saveEngine=model.plan` does, through TensorRT-RTX's builder API (no ddpm-deploy code)."""
    logger = rtx.Logger(rtx.Logger.WARNING)
    builder = rtx.Builder(logger)
    network = builder.create_network(1 << int(rtx.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = rtx.OnnxParser(network, logger)
    assert parser.parse_from_file(str(onnx_path))
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape("x", (lo, 1, 8, 8), (opt, 1, 8, 8), (hi, 1, 8, 8))
    profile.set_shape("t", (lo,), (opt,), (hi,))
    config.add_optimization_profile(profile)
    plan.write_bytes(bytes(builder.build_serialized_network(network, config)))


def test_adopted_trtexec_plan_gets_a_sidecar_and_info_explains(onnx_copy, tmp_path):
    plan = tmp_path / "model.plan"
    _trtexec_equivalent(onnx_copy, plan)
    refused = CliRunner().invoke(run_cli, ["info", "--engine", str(plan)])
    assert refused.exit_code == 2 and "sidecar" in refused.output  # a bare plan is refused

    r = export("--onnx", onnx_copy, "--adopt-plan", plan, "--batch-min", 1, "--batch-opt", 4, "--batch-max", 8)

    assert r.exit_code == 0, r.output
    side = read_plan_sidecar(plan)  # hash checked against the plan bytes
    assert side.build["adopted"] and side.build["header"] == {
        "flavour": "rtx", "version": ".".join(rtx.__version__.split(".")[:3]), "length": plan.stat().st_size}
    assert side.trt["version"] == rtx.__version__ and side.profile == {"min": 1, "opt": 4, "max": 8}
    assert [t["name"] for t in side.inputs] == ["x", "t"] and side.precision == "fp32"
    info = CliRunner().invoke(run_cli, ["info", "--engine", str(plan)])
    assert "batch profile: min/opt/max = 1/4/8" in info.output and "runs on compute capability: 8.6, 8.9, 12.0" \
        in info.output
    assert side.build["runs_on"] == ["8.6", "8.9", "12.0"]
    if info.exit_code != 0:  # no usable GPU here (or one TensorRT-RTX does not run on): info says why
        assert "runnable here: no" in info.output and "Traceback" not in info.output
    else:  # a supported GPU: the adopted plan samples
        r = CliRunner().invoke(run_cli, ["sample", "--engine", str(plan), "--num", "2", "--batch", "2", "--steps",
                                         "5", "--out", str(tmp_path / "s"), "--no-progress"])
        assert r.exit_code == 0, r.output
        assert (tmp_path / "s" / "samples.npz").is_file()


@pytest.mark.parametrize("content, match", [(b"not a plan at all" * 10, "expected a TensorRT plan"),
                                            (b"ftrt" + b"\x00" * 400, "tensorrt")])
def test_adopt_refuses_what_is_not_a_plan_here(onnx_copy, tmp_path, content, match):
    """Not a plan at all; a plan of the other flavour (TensorRT proper's magic) where only TensorRT-RTX exists."""
    if content.startswith(b"ftrt") and shutil.which("trtexec") or _has_tensorrt():
        pytest.skip("TensorRT proper is installed here")
    plan = tmp_path / "model.plan"
    plan.write_bytes(content)

    r = export("--onnx", onnx_copy, "--adopt-plan", plan)

    assert r.exit_code == 2 and match in r.output and not sidecar_path(plan).exists()


def _has_tensorrt() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorrt") is not None


def test_adopt_needs_the_onnx(tmp_path):
    r = export("--adopt-plan", tmp_path / "model.plan")
    assert r.exit_code == 2 and "--adopt-plan needs --onnx" in r.output


@pytest.mark.parametrize("how", ["truncated", "one-byte-short", "appended"])
def test_adopt_refuses_a_plan_whose_length_is_not_its_headers(onnx_copy, tmp_path, how):
    """The header states the plan's length: a truncated copy (or one with bytes appended) is refused on a CPU."""
    plan = tmp_path / "model.plan"
    _trtexec_equivalent(onnx_copy, plan)
    data = plan.read_bytes()
    plan.write_bytes({"truncated": data[: len(data) // 2], "one-byte-short": data[:-1],
                      "appended": data + b"\0" * 16}[how])
    r = export("--onnx", onnx_copy, "--adopt-plan", plan)
    assert r.exit_code == 2 and "the plan's header says" in r.output, r.output
    assert not sidecar_path(plan).exists()


def test_adopt_says_what_it_could_not_check_and_takes_the_stated_precision(onnx_copy, tmp_path):
    """Without a GPU the I/O, profile, precision and source ONNX of a foreign plan cannot be checked: the sidecar and
    `ddpm-run info` say so; --precision records what the builder says it built (trtexec --fp16 → fp16)."""
    from ddpm_deploy.runtime.device.info import probe_gpu

    plan = tmp_path / "model.plan"
    _trtexec_equivalent(onnx_copy, plan)
    r = export("--onnx", onnx_copy, "--adopt-plan", plan, "--precision", "fp16", "--batch-opt", 4, "--batch-max", 8)
    assert r.exit_code == 0, r.output
    side = read_plan_sidecar(plan)
    assert side.precision == "fp16" and side.build["onnx_precision"] == "fp32"
    unchecked = " | ".join(side.build["unchecked"])
    assert "precision fp16: as given" in unchecked
    if probe_gpu(0)[0] is None:
        assert "no GPU here" in unchecked and "built from model.onnx" in unchecked
        assert "not checked here:" in r.output
    info = CliRunner().invoke(run_cli, ["info", "--engine", str(plan)])
    assert "adopted without checking" in info.output and "precision fp16" in info.output


def test_adopt_never_replaces_a_sidecar_silently(onnx_copy, tmp_path):
    plan = tmp_path / "model.plan"
    _trtexec_equivalent(onnx_copy, plan)
    args = ("--onnx", onnx_copy, "--adopt-plan", plan, "--batch-opt", 4, "--batch-max", 8)
    assert export(*args).exit_code == 0
    before = sidecar_path(plan).read_bytes()
    r = export(*args)
    assert r.exit_code == 2 and "--overwrite" in r.output and sidecar_path(plan).read_bytes() == before
    assert export(*args, "--overwrite").exit_code == 0
