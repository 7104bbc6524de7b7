"""Models from diffusers: a UNet2DModel with google/ddpm-cifar10-32's exact configuration (random seeded weights,
saved in that repository's flat layout) exported by ``ddpm-export --from-diffusers``; L2 ε at full size, and L3
a full 1000-step trajectory of our runtime against diffusers' own DDPMScheduler loop with the same noise
(a narrow variant of the same block structure keeps that run short on a CPU).
"""

import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from parity.google_ddpm import (
    GOOGLE_DDPM_CIFAR10_32_SCHEDULER,
    GOOGLE_DDPM_CIFAR10_32_UNET,
    TINY_WIDTH,
    save_google_layout,
)

from ddpm_deploy.export.cli import main as export_cli
from ddpm_deploy.export.from_diffusers import find_layout, load_diffusers, scheduler_to_diffusion, unet_card
from ddpm_deploy.export.onnx_io import read_card
from ddpm_deploy.runtime.backends.ort import OrtRunner
from ddpm_deploy.runtime.errors import ConfigError
from ddpm_deploy.runtime.sampling.config import plan_for
from ddpm_deploy.runtime.sampling.host import sample
from ddpm_deploy.runtime.schedule import DiffusionConfig
from ddpm_deploy.runtime.tolerances import L2_EPS_FP32_ATOL, L3_TRAJECTORY_FP32_ATOL, assert_close
from ddpm_deploy.verify.cli import main as run_cli
from ddpm_deploy.verify.diffusers_ref import make_scheduler, sample_diffusers

diffusers = pytest.importorskip("diffusers", reason="diffusers (a test dependency) is not installed")

GOOGLE_DIFFUSION = DiffusionConfig(schedule="linear", beta_start=1e-4, beta_end=0.02, num_timesteps=1000,
                                   variance_type="fixed_large", clip_denoised=True)


class Zero:
    @staticmethod
    def eps(x, t):
        return np.zeros_like(x)


# --- scheduler config mapping and refusals ------------------------------------------------------------------

def test_google_scheduler_config_maps_to_our_config():
    assert scheduler_to_diffusion(GOOGLE_DDPM_CIFAR10_32_SCHEDULER) == GOOGLE_DIFFUSION
    # the repository's first (2022) config: GaussianDDPMScheduler, key "timesteps", no clip_sample (default True)
    legacy = {"_class_name": "GaussianDDPMScheduler", "beta_end": 0.02, "beta_schedule": "linear",
              "beta_start": 0.0001, "timesteps": 1000, "variance_type": "fixed_large"}
    assert scheduler_to_diffusion(legacy) == GOOGLE_DIFFUSION
    cos = scheduler_to_diffusion({"beta_schedule": "squaredcos_cap_v2", "variance_type": "fixed_small_log",
                                  "clip_sample": False, "num_train_timesteps": 4000})
    assert cos == DiffusionConfig(schedule="cosine", num_timesteps=4000, variance_type="fixed_small", clip_denoised=False)


def test_other_scheduler_configs_give_the_forward_process_as_ddpmscheduler_from_config_reads_them():
    """A folder written with --diffusers-scheduler ddim: the forward process is its; the DDPM variance and clipping it
    does not state are DDPMScheduler's defaults, which is what diffusers' own DDPMScheduler.from_config gives."""
    ddim = {"_class_name": "DDIMScheduler", "beta_schedule": "linear", "beta_start": 0.0002, "beta_end": 0.03,
            "num_train_timesteps": 500, "clip_sample": False, "set_alpha_to_one": True}
    dpm = {"_class_name": "DPMSolverMultistepScheduler", "num_train_timesteps": 800, "variance_type": None}
    for cfg in (ddim, dpm):
        ours = scheduler_to_diffusion(cfg)
        theirs = diffusers.DDPMScheduler.from_config({k: v for k, v in cfg.items() if k != "variance_type"}).config
        assert (ours.num_timesteps, ours.beta_start, ours.beta_end) == (theirs.num_train_timesteps, theirs.beta_start,
                                                                        theirs.beta_end)
        assert (ours.variance_type, ours.clip_denoised) == (theirs.variance_type, theirs.clip_sample)


@pytest.mark.parametrize("override, key", [
    ({"prediction_type": "v_prediction"}, "prediction_type"),
    ({"prediction_type": "sample"}, "prediction_type"),
    ({"variance_type": "learned_range"}, "variance_type"),
    ({"variance_type": "learned"}, "variance_type"),
    ({"variance_type": "fixed_large_log"}, "variance_type"),
    ({"trained_betas": [0.1] * 1000}, "trained_betas"),
    ({"beta_schedule": "scaled_linear"}, "beta_schedule"),
    ({"beta_schedule": "sigmoid"}, "beta_schedule"),
    ({"thresholding": True}, "thresholding"),
    ({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),
    ({"clip_sample_range": 2.0}, "clip_sample_range"),
    ({"_class_name": "EulerDiscreteScheduler"}, "expected a DDPMScheduler config"),
    ({"_class_name": "DPMSolverMultistepScheduler", "variance_type": "learned_range"}, "variance_type"),
])
def test_unsupported_scheduler_configs_are_refused(override, key):
    with pytest.raises(ConfigError, match=key):
        scheduler_to_diffusion({**GOOGLE_DDPM_CIFAR10_32_SCHEDULER, **override})


@pytest.mark.parametrize("override, match", [
    ({"out_channels": 6}, "out_channels"),
    ({"num_class_embeds": 10}, "class-conditional"),
    ({"sample_size": [32, 16]}, "square"),
    ({"_class_name": "UNet2DConditionModel"}, "UNet2DModel"),
])
def test_unsupported_unets_are_refused(override, match):
    with pytest.raises(ConfigError, match=match):
        unet_card({**GOOGLE_DDPM_CIFAR10_32_UNET, **override}, GOOGLE_DIFFUSION, GOOGLE_DDPM_CIFAR10_32_SCHEDULER)


# --- layouts --------------------------------------------------------------------------------------------------

def test_flat_and_pipeline_layouts(tiny_diffusers_dir, tmp_path):
    flat = find_layout(tiny_diffusers_dir)
    assert flat.layout == "flat" and flat.unet_dir == tiny_diffusers_dir
    # DDPMPipeline.save_pretrained: ROOT/unet/ + ROOT/scheduler/scheduler_config.json; ROOT or ROOT/unet given
    unet, _, _ = load_diffusers(tiny_diffusers_dir)
    pipe = diffusers.DDPMPipeline(unet=unet.unet, scheduler=make_scheduler(GOOGLE_DDPM_CIFAR10_32_SCHEDULER))
    pipe.save_pretrained(str(tmp_path / "pipe"))
    for given in (tmp_path / "pipe", tmp_path / "pipe" / "unet"):
        lay = find_layout(given)
        assert lay.layout == "pipeline" and lay.unet_dir == tmp_path / "pipe" / "unet"
        assert lay.scheduler_config == tmp_path / "pipe" / "scheduler" / "scheduler_config.json"
        assert load_diffusers(given)[1].diffusion == GOOGLE_DIFFUSION
    # scheduler_config.json one level up from the UNet folder
    up = tmp_path / "up"
    shutil.copytree(tiny_diffusers_dir, up / "unet")
    (up / "unet" / "scheduler_config.json").rename(up / "scheduler_config.json")
    assert find_layout(up / "unet").scheduler_config == up / "scheduler_config.json"


def test_cli_errors_name_what_is_missing(tiny_diffusers_dir, tmp_path):
    no_sched = tmp_path / "no_sched"
    shutil.copytree(tiny_diffusers_dir, no_sched)
    (no_sched / "scheduler_config.json").unlink()
    only_bin = tmp_path / "only_bin"
    shutil.copytree(tiny_diffusers_dir, only_bin)
    (only_bin / "diffusion_pytorch_model.safetensors").rename(only_bin / "diffusion_pytorch_model.bin")
    vpred = tmp_path / "vpred"
    shutil.copytree(tiny_diffusers_dir, vpred)
    (vpred / "scheduler_config.json").write_text(json.dumps({**GOOGLE_DDPM_CIFAR10_32_SCHEDULER,
                                                             "prediction_type": "v_prediction"}))

    for d, needle in ((no_sched, "scheduler_config.json"), (only_bin, "diffusion_pytorch_model.safetensors"),
                      (vpred, "v_prediction"), (tmp_path / "absent", "no such directory")):
        r = CliRunner().invoke(export_cli, ["--from-diffusers", str(d), "--out", str(tmp_path / "o")])
        assert r.exit_code == 2 and "error:" in r.output and needle in r.output, r.output
        assert "Traceback" not in r.output
    r = CliRunner().invoke(export_cli, [str(tmp_path), "--from-diffusers", str(tiny_diffusers_dir)])
    assert r.exit_code == 2 and "no RUN_DIR" in r.output


# --- L2 at full size ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_google_cifar10_config_exports_and_matches_diffusers_at_full_size(tmp_path):
    src = save_google_layout(tmp_path / "ddpm-cifar10-32")
    out = tmp_path / "export"

    r = CliRunner().invoke(export_cli, ["--from-diffusers", str(src), "--out", str(out)])

    assert r.exit_code == 0, r.output
    m = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert [i.name for i in m.graph.input] == ["x", "t"] and [o.name for o in m.graph.output] == ["eps"]
    assert m.graph.input[1].type.tensor_type.elem_type == onnx.TensorProto.INT32
    card = read_card(m)
    assert card.source == "diffusers" and card.diffusion == GOOGLE_DIFFUSION
    assert (card.data.channels, card.data.image_size) == (3, 32)
    assert card.architecture["unet_config"]["block_out_channels"] == [128, 256, 256, 256]
    report = json.loads((out / "export_report.json").read_text())
    assert report["verify_fp32"]["passed"] and report["source"]["layout"] == "flat"

    model, _, _ = load_diffusers(src)
    assert sum(p.numel() for p in model.parameters()) == 35_746_307  # the paper's 35.7 M
    runner = OrtRunner(out / "model.onnx", threads=2)
    g = np.random.default_rng(0)
    outs = {}
    for b in (1, 2):
        for t in (0, 1, 500, 999):
            if b == 1 or t == 0:  # a new x per batch size (and per t at batch 1)
                x = g.standard_normal((b, 3, 32, 32)).astype(np.float32)
            tt = np.full(b, t, np.int32)
            with torch.no_grad():
                want = model(torch.from_numpy(x), torch.from_numpy(tt)).numpy()
            outs[b, t] = assert_close(f"L2 cifar10-config b={b} t={t}", runner.eps(x, tt), want, L2_EPS_FP32_ATOL)
    # the timestep reaches the output (same x for b=2, t ∈ {0, 999})
    x = g.standard_normal((1, 3, 32, 32)).astype(np.float32)
    e0, e1 = runner.eps(x, np.array([0], np.int32)), runner.eps(x, np.array([999], np.int32))
    assert np.abs(e0 - e1).max() > 1e-3


# --- L3: 1000 steps against diffusers' own loop ---------------------------------------------------------------

@pytest.mark.slow
def test_full_trajectory_matches_diffusers_ddpm_loop(tiny_diffusers_dir, tiny_diffusers_onnx):
    model, card, _ = load_diffusers(tiny_diffusers_dir)
    sched = plan_for(card.diffusion, "ddpm")
    shape = (3, 32, 32)
    assert len(sched) == 1000 and card.diffusion == GOOGLE_DIFFUSION

    got = sample(OrtRunner(tiny_diffusers_onnx, threads=1), sched, shape, seed=7, indices=[0, 1])
    want = sample_diffusers(model, make_scheduler(card.architecture["scheduler_config"]), sched.timesteps[::-1], shape,
                            seed=7, indices=[0, 1])

    assert_close("L3 1000 steps: runtime (ORT) vs diffusers DDPMScheduler loop", got, want, L3_TRAJECTORY_FP32_ATOL)
    assert np.abs(sample(Zero(), sched, shape, 7, [0, 1]) - want).max() > 0.1  # ε matters


def test_respaced_trajectory_fixed_small_matches_diffusers(tmp_path):
    """fixed_small, respaced to 50 steps (diffusers: custom timesteps). Unclipped trajectories of a random-weight
    model leave [-1, 1] by orders of magnitude (|x_0| ~ 800), where an absolute tolerance says nothing: the
    unclipped step is covered by L1."""
    src = save_google_layout(tmp_path / "m", TINY_WIDTH, {"variance_type": "fixed_small"}, seed=1)
    from ddpm_deploy.export.from_diffusers import export_diffusers

    onnx_path, _ = export_diffusers(src, tmp_path / "export")
    model, card, _ = load_diffusers(src)
    sched = plan_for(card.diffusion, "ddpm", 50)
    shape = (3, 32, 32)

    got = sample(OrtRunner(onnx_path, threads=1), sched, shape, seed=2, indices=[5])
    want = sample_diffusers(model, make_scheduler(card.architecture["scheduler_config"]), sched.timesteps[::-1], shape,
                            seed=2, indices=[5])

    assert card.diffusion.variance_type == "fixed_small" and card.diffusion.clip_denoised
    assert_close("L3 respaced 50 steps vs diffusers custom timesteps", got, want, L3_TRAJECTORY_FP32_ATOL)


def test_ddpm_run_parity_on_a_diffusers_directory(tiny_diffusers_dir, tiny_diffusers_onnx, tmp_path):
    r = CliRunner().invoke(run_cli, ["parity", "--checkpoint", str(tiny_diffusers_dir), "--onnx",
                                     str(tiny_diffusers_onnx), "--steps", "10", "--batch", "2", "--threads", "1",
                                     "--out", str(tmp_path)])

    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "parity.json").read_text())
    assert rep["passed"] and rep["reference"] == "diffusers"
    l3 = [lv for lv in rep["levels"] if lv["level"] == "L3 trajectory"][0]
    assert l3["status"] == "pass" and "diffusers DDPMScheduler loop" in l3["reference"]
