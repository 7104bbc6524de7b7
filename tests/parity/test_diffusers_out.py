"""Our models as diffusers pipelines (``ddpm-export RUN --diffusers-out DIR``), judged by diffusers itself:
``DDPMPipeline.from_pretrained(DIR)`` offline, its UNet's ε against our ONNX at t ∈ {0, 1, T/2, T−1} (the trained micro
run; ddpm-cifar10 with random weights), its own pipeline loop against our sampler with the same noise, and the round
trip ``--diffusers-out`` → ``--from-diffusers``.
"""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ddpm_deploy.export.cli import main as export_cli
from ddpm_deploy.export.to_diffusers import map_weights, scheduler_config, unet2d_config, write_pipeline
from ddpm_deploy.runtime.api import Sampler
from ddpm_deploy.runtime.backends.ort import OrtRunner
from ddpm_deploy.runtime.config import DataSpec, ModelCard
from ddpm_deploy.runtime.errors import ConfigError
from ddpm_deploy.runtime.tolerances import (
    DIFFUSERS_OUT_EPS_RTOL,
    DIFFUSERS_ROUND_TRIP_EPS_RTOL,
    L3_TRAJECTORY_FP32_ATOL,
    assert_close,
)
from ddpm_deploy.trainer.checkpoint import load_model
from ddpm_deploy.verify.diffusers_out import eps_errors, unet_eps
from ddpm_deploy.verify.diffusers_ref import pipeline_with_noise

diffusers = pytest.importorskip("diffusers", reason="diffusers (a test dependency) is not installed")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """No hub: every load below is from disk, and would fail rather than download."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def micro_pipe(micro_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("micro_pipe") / "pipe"
    r = CliRunner().invoke(export_cli, [str(micro_run), "--diffusers-out", str(out)])
    assert r.exit_code == 0, r.output
    return out


def assert_all_within(comparisons, tol, what):
    for c in comparisons:
        c.tol = tol
        assert c.passed, f"{what} {c.message()}"
        assert c.want_max > 1e-3  # ε is not trivially 0


def test_folder_layout_and_configs(micro_pipe, micro_run):
    files = sorted(str(p.relative_to(micro_pipe)) for p in micro_pipe.rglob("*") if p.is_file())
    assert files == ["model_index.json", "scheduler/scheduler_config.json", "unet/config.json",
                     "unet/diffusion_pytorch_model.safetensors"]
    index = json.loads((micro_pipe / "model_index.json").read_text())
    assert index["_class_name"] == "DDPMPipeline" and index["unet"] == ["diffusers", "UNet2DModel"]
    unet = json.loads((micro_pipe / "unet" / "config.json").read_text())
    # the reference TF layout: sin first with 1/(half − 1) frequencies, symmetric padding of the strided conv,
    # one attention head
    assert (unet["flip_sin_to_cos"], unet["freq_shift"], unet["downsample_padding"]) == (False, 1, 1)
    assert unet["attention_head_dim"] is None and unet["down_block_types"] == ["DownBlock2D", "AttnDownBlock2D"]
    sched = json.loads((micro_pipe / "scheduler" / "scheduler_config.json").read_text())
    card = load_model(micro_run)[1]
    assert sched["_class_name"] == "DDPMScheduler" and sched["num_train_timesteps"] == card.diffusion.num_timesteps
    assert (sched["variance_type"], sched["clip_sample"]) == (card.diffusion.variance_type, card.diffusion.clip_denoised)


def test_pipeline_unet_eps_equals_our_onnx_on_the_trained_run(micro_pipe, micro_onnx):
    pipe = diffusers.DDPMPipeline.from_pretrained(str(micro_pipe), local_files_only=True)
    runner = OrtRunner(micro_onnx, threads=1)

    assert_all_within(eps_errors(unet_eps(pipe.unet.eval()), runner.eps, runner.sample_shape,
                                 runner.card.diffusion.num_timesteps, batch=3),
                      DIFFUSERS_OUT_EPS_RTOL, "DDPMPipeline.unet vs our ONNX (micro run)")


def test_pipeline_run_matches_our_sampler(micro_pipe):
    """diffusers' own loop (DDPMPipeline.__call__, DDPMScheduler.step, its [0, 1] conversion), 5 steps, our noise
    injected, vs Sampler.from_pretrained on the same folder called with diffusers' keywords."""
    pipe = diffusers.DDPMPipeline.from_pretrained(str(micro_pipe), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    with Sampler.from_pretrained(micro_pipe, threads=1) as sampler:
        plan = sampler.plan(5)
        ours = sampler(batch_size=3, num_inference_steps=5, output_type="np", generator=11)
        other_seed = sampler(batch_size=3, num_inference_steps=5, output_type="np", generator=12)

    theirs = pipeline_with_noise(pipe, plan, 11, range(3), num_inference_steps=5, output_type="np")

    assert plan.timesteps.tolist() == [800, 600, 400, 200, 0]  # diffusers' "leading" respacing, from the folder
    assert ours.dtype == np.float32 and ours.shape == theirs.shape == (3, 8, 8, 1)
    assert_close("DDPMPipeline (5 steps, same noise) vs Sampler", ours, theirs, L3_TRAJECTORY_FP32_ATOL)
    assert np.abs(other_seed - theirs).max() > 0.1  # the comparison sees the noise


def test_round_trip_through_diffusers(micro_pipe, micro_onnx, tmp_path):
    r = CliRunner().invoke(export_cli, ["--from-diffusers", str(micro_pipe), "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    back, original = OrtRunner(tmp_path / "model.onnx", threads=1), OrtRunner(micro_onnx, threads=1)
    assert back.card.diffusion == original.card.diffusion
    assert_all_within(eps_errors(back.eps, original.eps, original.sample_shape, original.card.diffusion.num_timesteps,
                                 seed=1), DIFFUSERS_ROUND_TRIP_EPS_RTOL, "round trip")


@pytest.mark.slow
def test_cifar10_random_weights_pipeline_eps(tmp_path):
    from ddpm_deploy.verify.models import preset_card, random_preset_model, random_preset_onnx

    model, cfg = random_preset_model("ddpm-cifar10")
    card = preset_card("ddpm-cifar10")
    write_pipeline(model.state_dict(), card, tmp_path / "pipe")
    onnx_path, _ = random_preset_onnx("ddpm-cifar10", tmp_path / "cifar10.onnx")

    pipe = diffusers.DDPMPipeline.from_pretrained(str(tmp_path / "pipe"), local_files_only=True)

    assert sum(p.numel() for p in pipe.unet.parameters()) == 35_746_307
    assert_all_within(eps_errors(unet_eps(pipe.unet.eval()), OrtRunner(onnx_path, threads=2).eps, (3, 32, 32), 1000),
                      DIFFUSERS_OUT_EPS_RTOL, "DDPMPipeline.unet vs our ONNX (ddpm-cifar10, random weights)")


# --- what has no UNet2DModel equivalent is refused by name --------------------------------------------------------

def _card(micro_run, **changes):
    card = load_model(micro_run)[1]
    return ModelCard(**{**card.__dict__, **changes})


def test_refusals_name_the_field(micro_run):
    model, card, _ = load_model(micro_run)
    sd = model.state_dict()
    with pytest.raises(ConfigError, match="architecture.type 'diffusers.UNet2DModel'"):
        unet2d_config(_card(micro_run, architecture={**card.architecture, "type": "diffusers.UNet2DModel"}))
    with pytest.raises(ConfigError, match=r"data.value_range \[0.0, 1.0\]"):
        unet2d_config(_card(micro_run, data=DataSpec(1, 8, (0.0, 1.0))))
    with pytest.raises(ConfigError, match="'down.0.res.extra.weight' has no UNet2DModel equivalent"):
        map_weights({**sd, "down.0.res.extra.weight": sd["conv_in.weight"]}, card)
    with pytest.raises(ConfigError, match="'mid_attn.q.weight' of shape"):
        map_weights({**sd, "mid_attn.q.weight": sd["mid_attn.q.weight"].expand(-1, -1, 3, 3)}, card)
    with pytest.raises(ConfigError, match="UniPCMultistepScheduler has no DDPMPipeline equivalent"):
        scheduler_config(card, "unipc")


def test_cli_options_and_output_policy(micro_run, tmp_path):
    out = tmp_path / "pipe"
    ok = CliRunner().invoke(export_cli, [str(micro_run), "--diffusers-out", str(out), "--diffusers-scheduler", "ddim",
                                         "--checkpoint", "step_10", "--raw"])
    assert ok.exit_code == 0, ok.output
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == "DDIMScheduler"
    pipe = diffusers.DDPMPipeline.from_pretrained(str(out), local_files_only=True)
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    want = load_model(micro_run, "raw", micro_run / "checkpoints" / "step_00000010" / "weights.safetensors")[0]
    got = dict(pipe.unet.state_dict())
    assert torch.equal(got["conv_in.weight"], want.state_dict()["conv_in.weight"])
    assert not torch.equal(got["conv_in.weight"], load_model(micro_run)[0].state_dict()["conv_in.weight"])
    back = CliRunner().invoke(export_cli, ["--from-diffusers", str(out), "--out", str(tmp_path / "back")])
    assert back.exit_code == 0, back.output  # the named scheduler comes back too, as the model's own
    assert OrtRunner(tmp_path / "back" / "model.onnx").card.architecture["scheduler_config"]["_class_name"] == \
        "DDIMScheduler"
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    again = CliRunner().invoke(export_cli, [str(micro_run), "--diffusers-out", str(out)])
    assert again.exit_code == 2 and "--overwrite" in again.output and "model_index.json" in again.output
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    replaced = CliRunner().invoke(export_cli, [str(micro_run), "--diffusers-out", str(out), "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == "DDPMScheduler"
    assert not [p for p in out.rglob("*.tmp")]
    for args, needle in ((["--fp16"], "--fp16"), (["--out", str(tmp_path / "o")], "--out"),
                         (["--diffusers-scheduler", "unipc", "--overwrite"], "UniPCMultistepScheduler"),
                         (["--checkpoint", "7", "--overwrite"], "--checkpoint 7: no such checkpoint")):
        r = CliRunner().invoke(export_cli, [str(micro_run), "--diffusers-out", str(tmp_path / "x"), *args])
        assert r.exit_code == 2 and "error:" in r.output and needle in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "x").exists()
    r = CliRunner().invoke(export_cli, [str(micro_run), "--diffusers-scheduler", "ddim"])
    assert r.exit_code == 2 and "add --diffusers-out" in r.output


def test_from_pretrained_converts_once_with_torch_only_in_the_child(micro_pipe, micro_onnx, tmp_path):
    """The runtime half without torch: the first call exports the folder in a child `ddpm-export` (which has torch),
    the parent never imports it; a second call opens the cached ONNX, which it does not write again."""
    from helpers import run_without_torch

    cache = tmp_path / "cache"
    body = f"""
import sys, numpy as np
from ddpm_deploy import Sampler
with Sampler.from_pretrained({str(micro_pipe)!r}, threads=1, cache_dir={str(cache)!r}) as s:
    np.save({str(tmp_path / "a.npy")!r}, s(batch_size=2, num_inference_steps=5, generator=1, output_type="np"))
    print("PATH", s.runner.path)
assert "torch" not in sys.modules
"""
    first = run_without_torch(body)
    assert first.returncode == 0, first.stderr[-3000:]
    onnx = next(cache.glob("*/model.onnx"))
    stamp = onnx.stat().st_mtime_ns
    with Sampler.from_pretrained(micro_pipe, threads=1, cache_dir=cache) as again:
        second = again.runner.path

    assert f"PATH {onnx}" in first.stdout and second == onnx
    assert onnx.stat().st_mtime_ns == stamp and len(list(cache.iterdir())) == 1
    assert not [p for p in cache.rglob("*.tmp")]
    with Sampler.from_onnx(micro_onnx, threads=1, scheduler="ddpm", timestep_spacing="leading") as s:
        want = s(batch_size=2, num_inference_steps=5, generator=1, output_type="np")
    assert_close("from_pretrained(diffusers folder) vs our ONNX", np.load(tmp_path / "a.npy"), want,
                 L3_TRAJECTORY_FP32_ATOL)
