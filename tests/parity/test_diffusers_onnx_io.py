"""An ONNX exported by another tool with diffusers' I/O names (``sample``, ``timestep`` int64 [B] or a float scalar →
``out_sample``) runs without re-export: the runner maps the names, the DDPM schedule comes from the
scheduler_config.json beside it, and ``ddpm-run info`` says what was mapped. The files are made here the way such
tools make them: ``torch.onnx.export`` of diffusers' own ``UNet2DModel`` with those names."""

import json
import shutil
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from parity.google_ddpm import export_diffusers_named

from ddpm_deploy.export.from_diffusers import load_diffusers
from ddpm_deploy.runtime.api import Sampler
from ddpm_deploy.runtime.backends.ort import OrtRunner
from ddpm_deploy.runtime.errors import ArtifactError
from ddpm_deploy.runtime.tolerances import L2_EPS_FP32_ATOL, L3_TRAJECTORY_FP32_ATOL, assert_close
from ddpm_deploy.verify.cli import main as run_cli

diffusers = pytest.importorskip("diffusers", reason="diffusers (a test dependency) is not installed")


@pytest.fixture(scope="module")
def named(tiny_diffusers_dir, tmp_path_factory):
    """{kind: ONNX path} beside a copy of the folder's scheduler_config.json; and the diffusers model."""
    model, _, _ = load_diffusers(tiny_diffusers_dir)
    root = tmp_path_factory.mktemp("named_onnx")
    out = {}
    for kind, t, axes in (("int64", torch.tensor([3, 5]), {"timestep": {0: "batch"}}),
                          ("float", torch.tensor(7.0), {})):
        d = root / kind
        d.mkdir()
        shutil.copy(tiny_diffusers_dir / "scheduler_config.json", d / "scheduler_config.json")
        out[kind] = export_diffusers_named(model.unet, d / "model.onnx", t, axes)
    return out, model


@pytest.mark.parametrize("kind", ["int64", "float"])
def test_eps_through_the_mapped_names(named, kind):
    paths, model = named
    runner = OrtRunner(paths[kind], threads=1)
    g = np.random.default_rng(0)

    assert runner.io is not None and runner.card.diffusion.num_timesteps == 1000
    assert runner.card.diffusion.variance_type == "fixed_large" and runner.sample_shape == (3, 32, 32)
    for t in (0, 1, 500, 999):
        x = g.standard_normal((2, 3, 32, 32)).astype(np.float32)
        tt = np.full(2, t, np.int32)
        with torch.no_grad():
            want = model(torch.from_numpy(x), torch.from_numpy(tt)).numpy()
        assert_close(f"{kind} t={t}", runner.eps(x, tt), want, L2_EPS_FP32_ATOL)
    # images at different timesteps in one call (step-level batching): a scalar-timestep model runs once per t
    x = g.standard_normal((3, 3, 32, 32)).astype(np.float32)
    tt = np.array([10, 900, 10], np.int32)
    with torch.no_grad():
        want = np.concatenate([model(torch.from_numpy(x[i:i + 1]), torch.from_numpy(tt[i:i + 1])).numpy()
                               for i in range(3)])
    assert_close(f"{kind} mixed t", runner.eps(x, tt), want, L2_EPS_FP32_ATOL)


def test_info_says_what_it_mapped(named):
    paths, _ = named
    for kind, text in (("int64", "timestep (int64, [B])"), ("float", "timestep (float32, a scalar, one run per")):
        r = CliRunner().invoke(run_cli, ["info", "--onnx", str(paths[kind])])
        assert r.exit_code == 0, r.output
        line = [ln for ln in r.output.splitlines() if ln.startswith("io: ")]
        assert line and "x → sample" in line[0] and "out_sample → eps" in line[0] and text in line[0], r.output
        assert str(paths[kind].parent / "scheduler_config.json") in line[0]


def test_samples_equal_the_reexported_model(named, tiny_diffusers_onnx):
    """The same images as `ddpm-export --from-diffusers` of that folder, through the same Sampler call."""
    paths, _ = named
    with Sampler.from_pretrained(paths["int64"], threads=1) as a, \
            Sampler.from_onnx(tiny_diffusers_onnx, threads=1) as b:
        got = a(batch_size=2, num_inference_steps=10, output_type="np", generator=3)
        want = b(batch_size=2, num_inference_steps=10, output_type="np", generator=3, scheduler="ddpm",
                 timestep_spacing="leading")
        assert a.scheduler.timestep_spacing == "leading"  # its scheduler_config.json's (diffusers' default)
    assert_close("diffusers-named ONNX vs re-exported", got, want, L3_TRAJECTORY_FP32_ATOL)


def test_missing_scheduler_config_is_named(named, tmp_path):
    paths, _ = named
    shutil.copy(paths["int64"], tmp_path / "model.onnx")

    with pytest.raises(ArtifactError, match="scheduler_config.json beside it"):
        OrtRunner(tmp_path / "model.onnx")
    (tmp_path / "scheduler_config.json").write_text(json.dumps({"prediction_type": "v_prediction"}))
    with pytest.raises(Exception, match="prediction_type"):
        OrtRunner(tmp_path / "model.onnx")
