"""`ddpm-run parity`: both reports on a passing model, a non-zero exit that names the level on a broken one,
and plans validated (not run) without a GPU."""

import json
import shutil

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from ddpm_deploy.verify.cli import main as run_cli
from ddpm_deploy.verify.parity import gpu_status

FAST = ["--steps", "20", "--batch", "2", "--threads", "1"]


def parity(*args):
    return CliRunner().invoke(run_cli, ["parity", *map(str, args)])


def levels(path):
    return {(lv["level"], lv["backend"]): lv for lv in json.loads(path.read_text())["levels"]}


def perturbed(onnx_path, out, delta=0.5):
    """A copy of the ONNX with one element of its largest weight changed."""
    m = onnx.load(str(onnx_path))
    init = max(m.graph.initializer, key=lambda i: int(np.prod(i.dims)))
    w = numpy_helper.to_array(init).copy()
    w.flat[0] += delta
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    onnx.save(m, str(out))
    return out


def test_passing_model_writes_both_reports(micro_run, micro_onnx, tmp_path):
    r = parity("--checkpoint", micro_run, "--onnx", micro_onnx, *FAST, "--out", tmp_path)

    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "parity.json").read_text())
    md = (tmp_path / "parity.md").read_text()
    assert rep["passed"] and rep["failed"] == [] and rep["steps"] == 20 and rep["reference"] == "ddpm-deploy"
    lv = levels(tmp_path / "parity.json")
    assert {k[0] for k in lv} == {"L0 schedule", "L1 step", "L2 eps", "L3 trajectory", "L4 backend"}
    assert all(v["status"] in ("pass", "skipped", "not run") for v in lv.values())
    assert all(v["reason"] for v in lv.values() if v["status"] in ("skipped", "not run"))  # never silent
    l2 = lv["L2 eps", "onnxruntime-cpu (fp32)"]
    assert l2["status"] == "pass" and len(l2["metrics"]["buckets"]) == 10 and l2["max_abs"] <= l2["checks"][0]["tolerance"]
    assert l2["runner"] == "OrtRunner"  # the runner `ddpm-run sample` ships, not Polygraphy's own
    l3 = lv["L3 trajectory", "onnxruntime-cpu (fp32) + host loop"]
    assert l3["status"] == "pass" and l3["metrics"]["psnr_db"] > 60 and l3["metrics"]["uint8_max_diff"] <= 1
    assert l3["runner"] == "OrtRunner + HostLoop"
    assert rep["schema"] == "ddpm-deploy/parity" and rep["schema_version"] == 2 and rep["device"] == "cpu"
    assert all(v["runner"] for v in lv.values() if v["level"] in ("L2 eps", "L3 trajectory", "L4 backend"))
    assert "[OrtRunner]" in r.output and "| runner |" in md
    assert "# Parity report: PASS" in md and "PSNR" in md and "ε error per timestep bucket" in md
    assert "wrote" in r.output and "parity.md" in r.output


def test_perturbed_weight_fails_and_names_the_level(micro_run, micro_onnx, tmp_path):
    broken = perturbed(micro_onnx, tmp_path / "broken.onnx")

    r = parity("--checkpoint", micro_run, "--onnx", broken, *FAST, "--out", tmp_path / "rep")

    assert r.exit_code == 1, r.output
    assert "parity FAILED at: L2 eps [onnxruntime-cpu (fp32) vs pytorch-cpu (ddpm-deploy)]" in r.output
    rep = json.loads((tmp_path / "rep" / "parity.json").read_text())
    assert not rep["passed"] and any(f.startswith("L2 eps") for f in rep["failed"])
    l2 = levels(tmp_path / "rep" / "parity.json")["L2 eps", "onnxruntime-cpu (fp32)"]
    worst = max(l2["checks"], key=lambda c: c["max_abs"])
    assert not worst["passed"] and worst["max_abs"] > 1e-3 and len(worst["index"]) == 4  # where, and both values
    assert "# Parity report: FAIL" in (tmp_path / "rep" / "parity.md").read_text()


def test_onnx_with_another_ddpm_config_fails_l0(micro_run, micro_onnx, tmp_path):
    from ddpm_deploy.export.onnx_io import read_card, set_card
    from ddpm_deploy.runtime.config import ModelCard
    from ddpm_deploy.runtime.schedule import DiffusionConfig

    m = onnx.load(str(micro_onnx))
    card = read_card(m)
    set_card(m, ModelCard(DiffusionConfig(variance_type="fixed_large"), card.data, card.architecture))
    onnx.save(m, str(tmp_path / "other.onnx"))

    r = parity("--checkpoint", micro_run, "--onnx", tmp_path / "other.onnx", *FAST, "--out", tmp_path / "rep")

    assert r.exit_code == 1 and "L0 schedule [artifact metadata" in r.output, r.output


def test_missing_checkpoint_is_a_clean_error(tmp_path):
    r = parity("--checkpoint", tmp_path / "nope", "--out", tmp_path)

    assert r.exit_code == 2 and "error:" in r.output and "Traceback" not in r.output


@pytest.fixture(scope="module")
def rtx_plan(micro_onnx, tmp_path_factory):
    engine = pytest.importorskip("ddpm_deploy.export.engine")
    from ddpm_deploy.runtime.errors import MissingDependencyError

    try:
        engine.load_tensorrt("rtx")
    except MissingDependencyError as e:
        pytest.skip(f"no TensorRT-RTX to build a plan with: {e}")
    plan = tmp_path_factory.mktemp("plan") / "model.plan"
    engine.build_engine(micro_onnx, plan, engine.EngineSettings(batch_min=1, batch_opt=2, batch_max=8, flavour="rtx"))
    return plan


def test_engine_is_validated_and_reported_not_run_without_gpu(micro_run, micro_onnx, rtx_plan, tmp_path):
    if gpu_status()[0]:
        pytest.skip("this machine has a GPU: the plan is run, not skipped")

    r = parity("--checkpoint", micro_run, "--onnx", micro_onnx, "--engine", rtx_plan, *FAST, "--out", tmp_path)

    assert r.exit_code == 0, r.output
    lv = levels(tmp_path / "parity.json")
    eng = lv["L2 eps", "tensorrt plan (rtx)"]
    assert eng["status"] == "not run" and "no GPU" in eng["reason"] and "sidecar was validated" in eng["reason"]
    assert eng["runner"] == "TrtRunner"  # with a GPU, L2 runs our TensorRT runner
    assert lv["L4 backend", "device loop + tensorrt plan (rtx)"]["status"] == "skipped"  # the device loop: --device cuda

    r_cuda = parity("--checkpoint", micro_run, "--onnx", micro_onnx, "--engine", rtx_plan, *FAST, "--device", "cuda",
                    "--out", tmp_path / "cuda")

    assert r_cuda.exit_code == 0, r_cuda.output
    lv = levels(tmp_path / "cuda" / "parity.json")
    dev = lv["L4 backend", "device loop + tensorrt plan (rtx)"]
    assert dev["status"] == "not run" and "no GPU" in dev["reason"] and dev["runner"] == "TrtRunner"
    ort_dev = lv["L4 backend", "device loop + onnxruntime-cuda"]
    assert ort_dev["status"] in ("skipped", "not run") and ort_dev["reason"] and ort_dev["runner"] == "OrtCudaRunner"
    assert "plan model.plan" in lv["L0 schedule", "artifact metadata"]["reason"]


def test_engine_with_a_tampered_plan_or_another_onnx_is_refused(micro_run, micro_onnx, rtx_plan, tmp_path):
    plan = tmp_path / "model.plan"
    shutil.copy(rtx_plan, plan)
    shutil.copy(str(rtx_plan) + ".json", str(plan) + ".json")
    broken = perturbed(micro_onnx, tmp_path / "broken.onnx")

    r_other = parity("--checkpoint", micro_run, "--onnx", broken, "--engine", plan, *FAST, "--out", tmp_path / "a")
    with open(plan, "ab") as f:
        f.write(b"\0")
    r_tampered = parity("--checkpoint", micro_run, "--onnx", micro_onnx, "--engine", plan, *FAST, "--out", tmp_path / "b")

    assert r_other.exit_code == 2 and "was built from" in r_other.output and "Traceback" not in r_other.output
    assert "rebuild the plan" in r_other.output and not (tmp_path / "a").exists()  # refused before any work
    assert r_tampered.exit_code == 2 and "sha256" in r_tampered.output and "Traceback" not in r_tampered.output


def test_engine_alone_is_checked_against_the_onnx_it_was_built_from(micro_run, micro_onnx, rtx_plan, tmp_path):
    """The demo's layout: export/model.onnx (fp32) and a plan built from another ONNX (model.fp16.onnx) beside it.
    `parity --engine` alone finds the plan's own source by its SHA-256 instead of failing against model.onnx; with
    the source nowhere to be found it refuses, naming the file to pass."""
    if gpu_status()[0]:
        pytest.skip("this machine has a GPU: the plan is run")
    run = tmp_path / "run"
    shutil.copytree(micro_run, run, ignore=shutil.ignore_patterns("export"))
    (run / "export").mkdir()
    perturbed(micro_onnx, run / "export" / "model.onnx")  # not the plan's source
    shutil.copy(micro_onnx, run / "export" / "model.fp16.onnx")  # the plan's source, under another name
    shutil.copy(rtx_plan, run / "export" / "model.plan")
    shutil.copy(str(rtx_plan) + ".json", run / "export" / "model.plan.json")

    r = parity("--checkpoint", run, "--engine", run / "export" / "model.plan", *FAST)

    assert r.exit_code == 0, r.output
    rep = json.loads((run / "export" / "parity" / "parity.json").read_text())
    assert rep["onnx"] == str(run / "export" / "model.fp16.onnx")
    again = parity("--checkpoint", run, "--engine", run / "export" / "model.plan", *FAST)
    assert again.exit_code == 2 and "--overwrite" in again.output  # reports are never replaced silently

    (run / "export" / "model.fp16.onnx").unlink()
    gone = parity("--checkpoint", run, "--engine", run / "export" / "model.plan", *FAST, "--out", tmp_path / "g")
    assert gone.exit_code == 2 and "pass it as --onnx" in gone.output and not (tmp_path / "g").exists()


def test_levels_without_diffusers_are_skipped_with_the_reason(monkeypatch):
    import ddpm_deploy.verify.diffusers_ref as dmod
    from ddpm_deploy.runtime.config import DataSpec, ModelCard
    from ddpm_deploy.runtime.errors import MissingDependencyError
    from ddpm_deploy.runtime.schedule import DiffusionConfig
    from ddpm_deploy.verify.parity import level0, level1

    def missing(module, feature, install=None):
        raise MissingDependencyError(module, feature, install)

    monkeypatch.setattr(dmod, "lazy_import", missing)
    results = level0(ModelCard(DiffusionConfig(), DataSpec(1, 8)), None, {}) + level1(DiffusionConfig(), None)

    skipped = [r for r in results if "diffusers" in r.reference]
    assert len(skipped) == 2 and all(r.status == "skipped" and "pip install" in r.reason for r in skipped)
    assert all(r.status == "pass" for r in results if "paper" in r.reference)


def test_parity_without_torch_says_what_to_install(micro_onnx, tmp_path):
    from helpers import run_without_torch

    r = run_without_torch(f"""
        from ddpm_deploy.verify.cli import main
        main(["parity", "--checkpoint", r"{tmp_path}", "--onnx", r"{micro_onnx}"])
    """, timeout=120)

    assert r.returncode == 2, r.stderr
    assert "torch" in r.stderr and "ddpm-deploy[export]" in r.stderr and "Traceback" not in r.stderr


def test_fp16_model_is_judged_by_relative_l2_and_its_trajectory_reported(micro_run, micro_onnx, tmp_path):
    fp16 = pytest.importorskip("ddpm_deploy.export.fp16", reason="fp16 export needs nvidia-modelopt")
    try:
        path, _ = fp16.export_fp16(micro_onnx, tmp_path / "fp16")
    except ImportError as e:
        pytest.skip(f"fp16 export unavailable: {e}")

    r = parity("--checkpoint", micro_run, "--onnx", path, *FAST, "--out", tmp_path / "rep")

    assert r.exit_code == 0, r.output
    lv = levels(tmp_path / "rep" / "parity.json")
    l2 = lv["L2 eps", "onnxruntime-cpu (fp16)"]
    assert l2["status"] == "pass" and all(c["metric"] == "rel_l2" for c in l2["checks"])
    l3 = lv["L3 trajectory", "onnxruntime-cpu (fp16) + host loop"]
    assert l3["status"] == "reported" and "not judged" in l3["reason"]


@pytest.mark.parametrize("scheduler, options", [("dpmsolver++", ["--option", "solver_order=3"]),
                                                ("sde-dpmsolver++", []), ("unipc", [])])
def test_parity_levels_per_scheduler(micro_run, micro_onnx, tmp_path, scheduler, options):
    """L1 (the plan rule vs diffusers' own scheduler class, same noise) and L3 (the ONNX through the host loop vs
    diffusers' scheduler driving the PyTorch model) along a fast scheduler's plan."""
    pytest.importorskip("diffusers")
    r = parity("--checkpoint", micro_run, "--onnx", micro_onnx, "--steps", "10", "--batch", "2", "--threads", "1",
               "--scheduler", scheduler, *options, "--out", tmp_path)

    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "parity.json").read_text())
    lv = levels(tmp_path / "parity.json")
    [l1] = [v for k, v in lv.items() if k[0] == "L1 step" and "plan rule" in k[1]]
    l3 = lv["L3 trajectory", "onnxruntime-cpu (fp32) + host loop"]
    assert rep["passed"] and rep["steps"] == 10
    assert l1["status"] == "pass" and l1["metrics"]["scheduler"]["scheduler"] in ("DPMSolverMultistepScheduler",
                                                                                  "UniPCMultistepScheduler")
    assert l3["status"] == "pass" and l3["reference"].startswith("diffusers ") and l3["metrics"]["psnr_db"] > 50
    assert not [k for k in lv if k[0] == "L0 schedule" and "DDPM" in k[1] and "fail" == lv[k]["status"]]
