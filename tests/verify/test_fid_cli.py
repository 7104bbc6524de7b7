"""`ddpm-run fid`, `fid-stats`, `fid-extractor` and `fid-compare` with the real Inception, on small sets: fid.json
and its warnings, cached statistics give the same number as a live reference, statistics of another extractor
are refused, the precision/backend gate passes on identical models and fails on a changed one, and `fid` runs
with torch blocked (a serving machine)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import run_without_torch

from ddpm_deploy.runtime.contract import FidReport
from ddpm_deploy.runtime.fid import FeatureStats
from ddpm_deploy.runtime.tolerances import FID_SELF_ATOL, FID_SMALL_SAMPLE
from ddpm_deploy.verify.cli import main as run_cli

pytestmark = pytest.mark.slow  # Inception-v3 on ~300 images in all

KID = ["--kid-subsets", "10"]


def run(*args):
    return CliRunner().invoke(run_cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """Two small disjoint sets of real digits as samples.npz files (what ddpm-run sample writes)."""
    from ddpm_deploy.runtime.imageio import to_uint8
    from ddpm_deploy.trainer.data import load_dataset

    d = tmp_path_factory.mktemp("fid_sets")
    digits = to_uint8(load_dataset("digits").images)
    np.savez(d / "samples.npz", images=digits[:24])
    np.savez(d / "ref.npz", images=digits[100:140])
    return d


def test_fid_writes_the_report_and_cached_statistics_give_the_same_number(fid_extractor, sets, tmp_path):
    stats = run("fid-stats", sets / "ref.npz", "--out", tmp_path / "ref-stats.npz", "--extractor", fid_extractor)
    cached = run("fid", sets / "samples.npz", "--ref", tmp_path / "ref-stats.npz", "--extractor", fid_extractor,
                 "--out", tmp_path / "cached", *KID)
    live = run("fid", sets / "samples.npz", "--ref", f"npz:{sets / 'ref.npz'}", "--extractor", fid_extractor,
               "--out", tmp_path / "live", *KID)  # a dataset spec, read by the trainer's loader

    assert stats.exit_code == 0 and "wrote" in stats.output, stats.output
    assert cached.exit_code == 0 and live.exit_code == 0, cached.output + live.output
    c, lv = FidReport.load(tmp_path / "cached" / "fid.json"), FidReport.load(tmp_path / "live" / "fid.json")
    assert c.fid == lv.fid and c.kid == lv.kid and c.fid > 0
    assert c.samples["count"] == 24 and c.reference["count"] == 40 and c.reference["stats_file"]
    assert lv.reference["kind"] == "dataset" and lv.reference["cached"] is False  # computed, then cached
    assert "computed and cached in" in live.output
    again = run("fid", sets / "samples.npz", "--ref", f"npz:{sets / 'ref.npz'}", "--extractor", fid_extractor,
                "--out", tmp_path / "again", *KID)
    a = FidReport.load(tmp_path / "again" / "fid.json")
    assert a.reference["cached"] is True and "read from the cache" in again.output
    assert a.fid == lv.fid and a.kid == lv.kid and a.reference["stats_file"] == lv.reference["stats_file"]
    (sets / "ref.npz").touch()  # the dataset's file changed: another cache entry, computed again
    os.utime(sets / "ref.npz", ns=(1, 1))
    changed = run("fid", sets / "samples.npz", "--ref", f"npz:{sets / 'ref.npz'}", "--extractor", fid_extractor,
                  "--out", tmp_path / "changed", *KID)
    ch = FidReport.load(tmp_path / "changed" / "fid.json")
    assert ch.reference["cached"] is False and ch.reference["stats_file"] != lv.reference["stats_file"]
    refused = run("fid", sets / "samples.npz", "--ref", tmp_path / "ref-stats.npz", "--extractor", fid_extractor,
                  "--out", tmp_path / "cached", *KID)
    assert refused.exit_code == 2 and "--overwrite" in refused.output  # fid.json is never replaced silently
    assert c.small_sample and 24 < FID_SMALL_SAMPLE and "small sample: 24 samples vs 40" in c.warnings[0]
    assert "warning: small sample" in cached.output and "FID " in cached.output and "KID " in cached.output
    assert c.extractor["weights_sha256"] == FeatureStats.load(tmp_path / "ref-stats.npz").extractor["weights_sha256"]
    assert c.inception_score["value"] is None and "logits" in c.inception_score["reason"]
    raw = json.loads((tmp_path / "cached" / "fid.json").read_text())
    assert raw["schema"] == "ddpm-deploy/fid" and raw["kid"]["subsets"] == 10 and raw["kid"]["subset_size"] == 24


def test_statistics_of_another_extractor_are_refused(fid_extractor, sets, tmp_path):
    s = FeatureStats.from_features(np.random.default_rng(0).normal(size=(8, 2048)).astype(np.float32),
                                   {"name": "other", "weights_sha256": "00" * 32, "preprocess": "other"}, "x")
    s.save(tmp_path / "other.npz")

    r = run("fid", sets / "samples.npz", "--ref", tmp_path / "other.npz", "--extractor", fid_extractor)

    assert r.exit_code == 2 and r.output.startswith("error: ") and "weights_sha256" in r.output


def test_user_errors_are_one_line(fid_extractor, sets, tmp_path):
    not_paired = run("fid", sets / "samples.npz", "--ref", sets / "ref.npz", "--paired", "--extractor", fid_extractor)
    bad_spec = run("fid", sets / "samples.npz", "--ref", "imagenet", "--extractor", fid_extractor)
    bad_out = run("fid-stats", "digits", "--out", tmp_path / "x.json", "--extractor", fid_extractor)

    for r in (not_paired, bad_spec, bad_out):
        assert r.exit_code == 2 and r.output.startswith("error: ") and "Traceback" not in r.output, r.output
    assert "same seeds" in not_paired.output and "Unknown dataset spec" in bad_spec.output
    assert ".npz" in bad_out.output


def test_fid_extractor_command_keeps_an_existing_file(fid_extractor):
    r = run("fid-extractor", "--out", fid_extractor)
    assert r.exit_code == 0 and "exists" in r.output


def test_fid_compare_gate_passes_on_the_same_model_and_fails_on_a_changed_one(fid_extractor, micro_onnx, tmp_path):
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(micro_onnx))  # the same model with its largest weight tensor scaled: another "precision"
    init = max(m.graph.initializer, key=lambda i: int(np.prod(i.dims)))
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.5, init.name))
    onnx.save(m, str(tmp_path / "changed.onnx"))
    changed = tmp_path / "changed.onnx"
    common = ["--num", 16, "--sample-batch", 8, "--steps", 10, "--extractor", fid_extractor, *KID]

    same = run("fid-compare", "--onnx", micro_onnx, "--against", micro_onnx, "--out", tmp_path / "same",
               "--max-fid", FID_SELF_ATOL, *common)
    other = run("fid-compare", "--onnx", micro_onnx, "--against", changed, "--out", tmp_path / "other",
                "--max-fid", FID_SELF_ATOL, *common)

    assert same.exit_code == 0, same.output
    rep = FidReport.load(tmp_path / "same" / "fid.json")
    assert abs(rep.fid) <= FID_SELF_ATOL and rep.gate["passed"]
    assert rep.kid["paired"] and abs(rep.kid["mean"]) <= 1e-12  # identical rows: every paired term cancels
    assert rep.paired["identical_images"] == 16 and rep.paired["uint8_max_diff"] == 0
    assert rep.paired["speed"]["reference"]["backend"] == "onnxruntime-cpu"
    assert rep.paired["speed"]["samples"]["images_per_second"] > 0 and "images/s" in same.output
    assert (tmp_path / "same" / "reference" / "samples.npz").is_file()
    assert (tmp_path / "same" / "candidate" / "run.json").is_file()
    assert other.exit_code == 1 and "quality gate FAILED" in other.output
    rep = FidReport.load(tmp_path / "other" / "fid.json")
    assert rep.fid > FID_SELF_ATOL and not rep.gate["passed"] and rep.paired["identical_images"] < 16


def test_fid_runs_with_torch_blocked(fid_extractor, sets, tmp_path):
    """A serving machine: the ONNX extractor and a statistics file, no torch (not even importable)."""
    shutil.copy(sets / "samples.npz", tmp_path / "samples.npz")
    stats = run("fid-stats", sets / "ref.npz", "--out", tmp_path / "ref.npz", "--extractor", fid_extractor)
    assert stats.exit_code == 0, stats.output

    r = run_without_torch(f"""
        import os
        from ddpm_deploy.verify.cli import main
        try:
            main(["fid", r"{tmp_path / 'samples.npz'}", "--ref", r"{tmp_path / 'ref.npz'}", "--extractor",
                  r"{fid_extractor}", "--kid-subsets", "10", "--no-progress"])
        except SystemExit as e:
            assert e.code in (0, None), e.code
        assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules), "torch was imported"
        try:
            main(["fid", r"{tmp_path / 'samples.npz'}", "--ref", "digits", "--extractor", r"{tmp_path / 'no.onnx'}",
                  "--out", r"{tmp_path / 'second'}"])
        except SystemExit as e:
            print("exit", e.code)
    """)

    assert r.returncode == 0, r.stderr
    assert FidReport.load(tmp_path / "fid.json").samples["count"] == 24
    assert "exit 2" in r.stdout and "error: " in r.stderr and "ddpm-deploy[quality]" in r.stderr


def test_fid_compare_of_two_schedulers_on_one_model(fid_extractor, micro_onnx, tmp_path):
    """1000-step-style DDPM (here 10 steps) vs DPM-Solver++ at 5 calls on the same model and seeds; a candidate
    option its scheduler does not take is refused before anything is sampled."""
    common = ["--num", 8, "--sample-batch", 8, "--extractor", fid_extractor, *KID]
    ok = run("fid-compare", "--onnx", micro_onnx, "--steps", 10, "--against-scheduler", "dpmsolver++",
             "--against-steps", 5, "--out", tmp_path / "cmp", *common)
    bad = run("fid-compare", "--onnx", micro_onnx, "--scheduler", "ddim", "--option", "eta=0.5",
              "--against-scheduler", "unipc", "--against-option", "eta=0.5", "--out", tmp_path / "bad", *common)

    assert ok.exit_code == 0, ok.output
    rep = FidReport.load(tmp_path / "cmp" / "fid.json")
    ref, cand = rep.paired["speed"]["reference"], rep.paired["speed"]["samples"]
    assert ref["scheduler"]["scheduler"] == "DDPMScheduler" and ref["steps"] == 10
    assert cand["scheduler"]["scheduler"] == "DPMSolverMultistepScheduler" and cand["steps"] == 5
    assert rep.paired["identical_images"] < 8  # other samplers, other images (from the same x_T)
    assert bad.exit_code == 2 and "--option eta is not an option of UniPCMultistepScheduler" in bad.output
    assert not (tmp_path / "bad" / "reference").exists()


def test_fid_compare_of_a_backend_and_precision(fid_extractor, micro_onnx, tmp_path):
    """The bf16 quality gate: the same seeds through ONNX Runtime fp32 and OpenVINO bf16 (--against-backend,
    --against-precision); each side's run.json records its backend and the precision that ran."""
    pytest.importorskip("openvino")
    from ddpm_deploy.runtime.cpu import cpu_precisions

    r = run("fid-compare", "--onnx", micro_onnx, "--against-backend", "openvino", "--against-precision", "bf16",
            "--num", 8, "--sample-batch", 8, "--steps", 10, "--extractor", fid_extractor, *KID,
            "--out", tmp_path / "cmp")
    assert r.exit_code == 0, r.output
    rep = FidReport.load(tmp_path / "cmp" / "fid.json")
    ref, cand = rep.paired["speed"]["reference"], rep.paired["speed"]["samples"]
    assert ref["backend"] == "onnxruntime-cpu" and ref["precision"] == "fp32"
    assert cand["backend"] == "openvino-cpu"
    assert cand["precision"] == ("bf16" if cpu_precisions().native_bf16 else "fp32")  # OpenVINO's own choice
    bad = run("fid-compare", "--onnx", micro_onnx, "--against-backend", "openvino", "--against-precision", "int8",
              "--num", 8, "--extractor", fid_extractor, "--out", tmp_path / "bad")
    assert bad.exit_code == 2 and "model.int8.xml" in bad.output and not (tmp_path / "bad").exists()
