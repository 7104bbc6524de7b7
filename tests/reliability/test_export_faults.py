"""Bad-input / fault corpus of `ddpm-export` (issue 15, "nothing lost, nothing silent").

Every case runs the command as a user would (in-process ``invoke``) on a copy of a real artifact that one thing was
done to, and asserts the harness contract: exit 2, one ``error:`` line naming the thing at fault, no traceback,
every file that existed before unchanged, and no output folder left behind. The micro model (8×8 digits) keeps
each case well under a second, except the full-disk cases, which export for real.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest

from reliability.harness import assert_kept, assert_user_error, disk_full, invoke, snapshot

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def test_disk_full_injection_fails_writes_under_its_root_only(tmp_path):
    """The injector itself: writes under the root fail with ENOSPC, others do not (so the cases below mean it)."""
    (tmp_path / "full").mkdir()
    with disk_full(tmp_path / "full"):
        with pytest.raises(OSError) as e:
            (tmp_path / "full" / "a.bin").write_bytes(b"x")
        (tmp_path / "other.bin").write_bytes(b"x")
    assert e.value.errno == errno.ENOSPC and (tmp_path / "other.bin").read_bytes() == b"x"


# --- run dirs ---------------------------------------------------------------------------------------------------

@pytest.fixture()
def run(micro_run, tmp_path) -> Path:
    d = tmp_path / "run"
    shutil.copytree(micro_run, d, ignore=shutil.ignore_patterns("export"))
    return d


def _edit_json(path: Path, fn) -> None:
    d = json.loads(path.read_text())
    fn(d)
    path.write_text(json.dumps(d))


def _export_fails(run_dir: Path, tmp_path: Path, *names, extra=()) -> str:
    before = snapshot(run_dir) if run_dir.exists() else {}
    out = tmp_path / "out"
    o = invoke("ddpm-export", run_dir, "--out", out, *extra)
    line = assert_user_error(o, *names)
    if run_dir.exists():
        assert_kept(before, run_dir)
    assert not out.exists(), f"{out} was created by a failed export"
    return line


def _arch(field, value):
    return lambda d: d["architecture"].__setitem__(field, value)


# model.json: the whole architecture section type-checked, by field
ARCH_TYPES = [
    ("image_size", "8", 'architecture.image_size must be a positive integer, found "8"'),
    ("in_channels", 1.5, "architecture.in_channels must be a positive integer, found 1.5"),
    ("ch", "16", 'architecture.ch must be a positive integer, found "16"'),
    ("ch", 0, "architecture.ch must be a positive integer, found 0"),
    ("ch_mult", 2, "architecture.ch_mult must be a non-empty list of positive integers, found 2"),
    ("ch_mult", [], "architecture.ch_mult must be a non-empty list"),
    ("ch_mult", [1, "2"], "architecture.ch_mult must be"),
    ("num_res_blocks", True, "architecture.num_res_blocks must be a positive integer, found true"),
    ("attn_resolutions", "4", 'architecture.attn_resolutions must be a list of positive integers, found "4"'),
    ("attn_resolutions", [5], "architecture.attn_resolutions [5]: 5 matches no level"),
    ("dropout", "0", 'architecture.dropout must be a number in [0, 1), found "0"'),
    ("dropout", 1.5, "architecture.dropout must be a number in [0, 1), found 1.5"),
    ("norm_groups", None, "architecture.norm_groups must be a positive integer, found null"),
    ("norm_groups", 7, "architecture.norm_groups 7 must divide the channels 16"),
    ("norm_eps", "1e-6", 'architecture.norm_eps must be a number > 0, found "1e-6"'),
    ("image_size", 5, "architecture.image_size 5 must be divisible by 2^(len(ch_mult)-1)"),
    ("bogus", 1, "unknown UNet config keys ['bogus']"),
]


@pytest.mark.parametrize("field,value,msg", ARCH_TYPES, ids=[f"{f}={json.dumps(v)}" for f, v, _ in ARCH_TYPES])
def test_model_json_architecture_field(run, tmp_path, field, value, msg):
    _edit_json(run / "model.json", _arch(field, value))
    _export_fails(run, tmp_path, "model.json", msg)


MODEL_JSON_CASES = {
    "truncated": (lambda p: p.write_text(p.read_text()[:40]), "not valid JSON"),
    "binary": (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe"), "not a JSON text file"),
    "list": (lambda p: p.write_text("[1, 2]"), "expected a JSON object"),
    "empty": (lambda p: p.write_text(""), "not valid JSON"),
    "schema": (lambda p: _edit_json(p, lambda d: d.__setitem__("schema", "other/model")), "expected schema"),
    "schema_version": (lambda p: _edit_json(p, lambda d: d.__setitem__("schema_version", 2)), "schema_version 2"),
    "no-diffusion": (lambda p: _edit_json(p, lambda d: d.pop("diffusion")), "diffusion section is missing"),
    "architecture-list": (lambda p: _edit_json(p, lambda d: d.__setitem__("architecture", [16])),
                          "architecture must be a JSON object"),
    "missing-ch": (lambda p: _edit_json(p, lambda d: d["architecture"].pop("ch")), "architecture.ch is missing"),
    "arch-type": (lambda p: _edit_json(p, _arch("type", "resnet")), "architecture type 'resnet'"),
    "data.channels-str": (lambda p: _edit_json(p, lambda d: d["data"].__setitem__("channels", "1")),
                          'data.channels must be a positive integer, found "1"'),
    "data-vs-arch": (lambda p: _edit_json(p, lambda d: d["data"].__setitem__("channels", 3)),
                     "data.channels 3 does not match architecture.in_channels 1"),
    "num_timesteps-str": (lambda p: _edit_json(p, lambda d: d["diffusion"].__setitem__("num_timesteps", "1000")),
                          'diffusion.num_timesteps must be an integer, found "1000"'),
    "schedule-unknown": (lambda p: _edit_json(p, lambda d: d["diffusion"].__setitem__("schedule", "quadratic")),
                         "schedule must be one of"),
    "beta-list": (lambda p: _edit_json(p, lambda d: d["diffusion"].__setitem__("beta_start", [1e-4])),
                  "diffusion.beta_start must be a number"),
    "missing": (lambda p: p.unlink(), "model config not found"),
}


@pytest.mark.parametrize("case", sorted(MODEL_JSON_CASES))
def test_model_json_variant(run, tmp_path, case):
    fn, msg = MODEL_JSON_CASES[case]
    fn(run / "model.json")
    _export_fails(run, tmp_path, "model.json", msg)


# weights that do not fit the architecture: one line naming the first tensor and the field behind it
WEIGHT_MISMATCH = {
    "ch": ({"ch": 32}, ["'temb.0.weight'", "ch = 16", "architecture.ch = 32"]),
    "num_res_blocks": ({"num_res_blocks": 2}, ["num_res_blocks = 1", "architecture.num_res_blocks = 2"]),
    "ch_mult": ({"ch_mult": [1, 1]}, ["ch_mult = [1, 2]", "architecture.ch_mult = [1, 1]"]),
    "attn-none": ({"attn_resolutions": []}, ["is not part of the architecture", "attn_resolutions = [4]"]),
    "attn-more": ({"attn_resolutions": [8, 4]}, ["'down.0.attn.norm.weight' is missing", "attn_resolutions = [4]"]),
    "in_channels": ({"in_channels": 3}, ["'conv_in.weight' has shape [16, 1, 3, 3]", "in_channels = 1"]),
}


@pytest.mark.parametrize("case", sorted(WEIGHT_MISMATCH))
def test_weights_do_not_match_model_json(run, tmp_path, case):
    arch, names = WEIGHT_MISMATCH[case]

    def edit(d):
        d["architecture"].update(arch)
        if "in_channels" in arch:
            d["data"]["channels"] = arch["in_channels"]
    _edit_json(run / "model.json", edit)
    _export_fails(run, tmp_path, "weights.safetensors", "weights do not match", *names)


def _rewrite_weights(path: Path, fn) -> None:
    from safetensors.torch import load_file, save_file

    t = load_file(str(path))
    fn(t)
    save_file(t, str(path), metadata={"step": "30", "format": "ddpm-deploy"})


SAFETENSORS_CASES = {
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), ["not a readable safetensors"]),
    "zero-bytes": (lambda p: p.write_bytes(b""), ["not a readable safetensors"]),
    "garbage": (lambda p: p.write_bytes(os.urandom(4096)), ["not a readable safetensors"]),
    "header-only": (lambda p: p.write_bytes(p.read_bytes()[:2000]), ["not a readable safetensors", "--resume-from"]),
    "no-ema": (lambda p: _rewrite_weights(p, lambda t: [t.pop(k) for k in list(t) if k.startswith("ema.")]),
               ["has no 'ema' weights"]),
    "missing-tensor": (lambda p: _rewrite_weights(p, lambda t: t.pop("ema.conv_out.bias")),
                       ["'conv_out.bias' is missing"]),
    "extra-tensor": (lambda p: _rewrite_weights(p, lambda t: t.__setitem__("ema.zzz.weight", torch.zeros(2))),
                     ["'zzz.weight' is not part of the architecture"]),
    "wrong-shape": (lambda p: _rewrite_weights(p, lambda t: t.__setitem__("ema.conv_out.bias", torch.zeros(2))),
                    ["'conv_out.bias' has shape [2]", "needs [1]"]),
    "deleted": (lambda p: p.unlink(), ["weights file not found"]),
    "directory": (lambda p: (p.unlink(), p.mkdir()), ["weights file not found"]),
}


@pytest.mark.parametrize("case", sorted(SAFETENSORS_CASES))
def test_weights_file_variant(run, tmp_path, case):
    fn, names = SAFETENSORS_CASES[case]
    fn(run / "weights.safetensors")
    _export_fails(run, tmp_path, "weights.safetensors", *names)


def test_run_dir_missing(tmp_path):
    _export_fails(tmp_path / "nope", tmp_path, "nope", "run directory not found")


def test_run_dir_is_a_file(tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("x")
    _export_fails(f, tmp_path, "file.txt")


# --- options, checked before any output exists ------------------------------------------------------------------

OPTION_CASES = {
    "calib-without-precision": (["--calib-dataset", "digits"], ["--calib-dataset", "only with --fp16"]),
    "calib-missing-path": (["--fp16", "--calib-dataset", "npz:/nonexistent/calib.npz"],
                           ["--calib-dataset", "/nonexistent/calib.npz", "does not exist"]),
    "calib-unknown-kind": (["--fp16", "--calib-dataset", "imagenet:/x"], ["--calib-dataset", "imagenet"]),
    "trt-flavour-missing": (["--engine", "--trt-flavour", "tensorrt"], ["tensorrt", "pip install"]),
    "engine-out-without-engine": (["--engine-out", "x.plan"], ["--engine-out", "add --engine"]),
    "batch-profile": (["--engine", "--batch-min", "8", "--batch-max", "4"], ["batch"]),
    "fp16-vs-bf16": (["--fp16", "--precision", "bf16"], ["--fp16 and --precision bf16 disagree"]),
    "triton-instances-0": (["--triton-repo", "repo", "--triton-instances", "0"], ["--triton-instances must be >= 1"]),
    "triton-kind-without-repo": (["--triton-kind", "gpu"], ["--triton-repo"]),
    "adopt-plan-without-onnx": (["--adopt-plan", "m.plan"], ["--adopt-plan needs --onnx"]),
}


@pytest.mark.parametrize("case", sorted(OPTION_CASES))
def test_export_option_checked_before_output(run, tmp_path, monkeypatch, case):
    monkeypatch.chdir(tmp_path)
    args, names = OPTION_CASES[case]
    _export_fails(run, tmp_path, *names, extra=args)
    assert not (tmp_path / "repo").exists()


def test_out_is_a_file(run, tmp_path):
    f = tmp_path / "out.txt"
    f.write_text("keep me")
    before = snapshot(run, f)
    o = invoke("ddpm-export", run, "--out", f)
    assert_user_error(o, "out.txt")
    assert_kept(before, run, f)


def test_two_model_sources(run, micro_onnx, tmp_path):
    _export_fails(run, tmp_path, "give one model source", extra=["--onnx", micro_onnx])


# --- ONNX inputs of `ddpm-export --onnx` ------------------------------------------------------------------------

def _foreign_onnx(path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Identity", ["a"], ["b"])], "g",
                          [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("b", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(g), str(path))


def _strip_card(src: Path, dst: Path) -> None:
    import onnx

    m = onnx.load(str(src))
    del m.metadata_props[:]
    onnx.save(m, str(dst))


ONNX_CASES = {
    "missing": (lambda src, p: None, ["ONNX file not found"]),
    "directory": (lambda src, p: p.mkdir(), ["model.onnx"]),
    "empty": (lambda src, p: p.write_bytes(b""), ["not an ONNX model"]),
    "truncated": (lambda src, p: p.write_bytes(src.read_bytes()[: src.stat().st_size // 3]), ["not a readable ONNX"]),
    "text": (lambda src, p: p.write_text("this is not a model\n" * 20), ["ONNX"]),
    "png": (lambda src, p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(512)), ["ONNX"]),
    "foreign-io": (lambda src, p: _foreign_onnx(p), ["expected inputs ['x', 't']", "found inputs ['a']"]),
    "no-card": (lambda src, p: _strip_card(src, p), ["no DDPM config in the ONNX metadata"]),
}


@pytest.mark.parametrize("case", sorted(ONNX_CASES))
def test_onnx_input_variant(micro_onnx, tmp_path, case):
    fn, names = ONNX_CASES[case]
    d = tmp_path / "in"
    d.mkdir()
    p = d / "model.onnx"
    fn(micro_onnx, p)
    before = snapshot(d)
    o = invoke("ddpm-export", "--onnx", p, "--engine", "--engine-out", tmp_path / "plans" / "m.plan")
    assert_user_error(o, "model.onnx", *names)
    assert_kept(before, d)
    assert not (tmp_path / "plans").exists()


# --- diffusers directories --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def diffusers_dir(tmp_path_factory) -> Path:
    pytest.importorskip("diffusers")
    from parity.google_ddpm import TINY_WIDTH, save_google_layout

    return save_google_layout(tmp_path_factory.mktemp("diffusers_src"), TINY_WIDTH)


def _cfg(name, key, value):
    def fn(d: Path):
        _edit_json(d / name, lambda c: c.__setitem__(key, value))
    return fn


DIFFUSERS_CASES = {
    "no-config": (lambda d: (d / "config.json").unlink(), ["found neither"]),
    "config-not-json": (lambda d: (d / "config.json").write_text("{"), ["config.json", "unreadable"]),
    "config-list": (lambda d: (d / "config.json").write_text("[]"), ["config.json", "JSON object"]),
    "no-scheduler": (lambda d: (d / "scheduler_config.json").unlink(), ["scheduler_config.json"]),
    "timesteps-str": (_cfg("scheduler_config.json", "num_train_timesteps", "1000"),
                      ["num_train_timesteps", '"1000"']),
    "beta_schedule-list": (_cfg("scheduler_config.json", "beta_schedule", ["linear"]), ["beta_schedule"]),
    "beta_start-str": (_cfg("scheduler_config.json", "beta_start", "0.0001"), ["beta_start"]),
    "clip_sample-str": (_cfg("scheduler_config.json", "clip_sample", "yes"), ["clip_sample"]),
    "v-prediction": (_cfg("scheduler_config.json", "prediction_type", "v_prediction"), ["prediction_type"]),
    "sample_size-str": (_cfg("config.json", "sample_size", "32"), ["sample_size"]),
    "in_channels-str": (_cfg("config.json", "in_channels", "3"), ["in_channels"]),
    "block_out_channels-int": (_cfg("config.json", "block_out_channels", 64), ["block_out_channels"]),
    "layers_per_block-str": (_cfg("config.json", "layers_per_block", "2"), ["layers_per_block"]),
    "no-weights": (lambda d: (d / "diffusion_pytorch_model.safetensors").unlink(),
                   ["diffusion_pytorch_model.safetensors"]),
    "truncated-weights": (lambda d: (d / "diffusion_pytorch_model.safetensors").write_bytes(b"\x10\x00"),
                          ["could not load the UNet"]),
}


@pytest.mark.parametrize("case", sorted(DIFFUSERS_CASES))
def test_diffusers_dir_variant(diffusers_dir, tmp_path, case):
    d = tmp_path / "ddpm"
    shutil.copytree(diffusers_dir, d)
    fn, names = DIFFUSERS_CASES[case]
    fn(d)
    before = snapshot(d)
    o = invoke("ddpm-export", "--from-diffusers", d)
    assert_user_error(o, *names)
    assert_kept(before, d)
    assert not (d / "export").exists()


# --- faults of the machine --------------------------------------------------------------------------------------

def test_disk_full_during_export_of_a_fresh_folder(run, tmp_path):
    out = tmp_path / "out"
    before = snapshot(run)
    with disk_full(out):
        o = invoke("ddpm-export", run, "--out", out)
    assert_user_error(o, str(out / "model.onnx"), "No space left on device", "the disk is full",
                      "nothing of this export")
    assert_kept(before, run)
    assert not out.exists()


def test_disk_full_keeps_an_earlier_export(run, tmp_path):
    """An earlier export in OUT survives a failed re-export byte for byte; the error says so."""
    out = run / "export"
    assert_exit0 = invoke("ddpm-export", run)
    assert assert_exit0.code == 0, assert_exit0.stderr
    before = snapshot(run)
    assert_user_error(invoke("ddpm-export", run), "would replace", "model.onnx", "--overwrite")  # never silently
    assert_kept(before, run)
    with disk_full(out):
        o = invoke("ddpm-export", run, "--overwrite")
    assert_user_error(o, str(out / "model.onnx"), "No space left on device",
                      "files that were there before are unchanged")
    assert_kept(before, run)


def test_disk_full_while_writing_the_report(run, tmp_path, monkeypatch):
    """The fault after model.onnx was written: the line says model.onnx was written and kept."""
    out = tmp_path / "out"
    from ddpm_deploy.runtime import contract

    real = contract.ExportReport.save

    def save(self, path):
        with disk_full(out):
            return real(self, path)
    monkeypatch.setattr(contract.ExportReport, "save", save)
    o = invoke("ddpm-export", run, "--out", out)
    assert_user_error(o, str(out / "export_report.json"), "No space left on device",
                      "written before the fault and kept: model.onnx")
    assert (out / "model.onnx").is_file() and not (out / "export_report.json").exists()


# --- ddpm-run parity loads a run through the same checks --------------------------------------------------------

PARITY_CASES = {
    "weights-vs-ch": (_arch("ch", 32), ["weights do not match", "architecture.ch = 32"]),
    "ch-str": (_arch("ch", "16"), ['architecture.ch must be a positive integer, found "16"']),
    "attn-none": (_arch("attn_resolutions", []), ["weights do not match", "attn_resolutions = [4]"]),
}


@pytest.mark.parametrize("case", sorted(PARITY_CASES))
def test_parity_checks_the_run_like_export(run, micro_onnx, tmp_path, case):
    pytest.importorskip("polygraphy")
    fn, names = PARITY_CASES[case]
    _edit_json(run / "model.json", fn)
    before = snapshot(run, micro_onnx)
    o = invoke("ddpm-run", "parity", "--checkpoint", run, "--onnx", micro_onnx, "--steps", "2", "--batch", "1",
               "--out", tmp_path / "parity")
    assert_user_error(o, "model.json", *names)
    assert_kept(before, run, micro_onnx)
    assert not (tmp_path / "parity").exists()
