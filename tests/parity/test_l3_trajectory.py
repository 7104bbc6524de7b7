"""L3 trajectory: the runtime (ONNX Runtime, NumPy step) vs the PyTorch reference loop, same noise, 1000 steps."""

import numpy as np
import pytest

from ddpm_deploy.runtime.backends.ort import OrtRunner
from ddpm_deploy.runtime.sampling.config import plan_for
from ddpm_deploy.runtime.sampling.host import sample
from ddpm_deploy.runtime.tolerances import L3_TRAJECTORY_FP32_ATOL, assert_close
from ddpm_deploy.trainer.checkpoint import load_model
from ddpm_deploy.trainer.sample import sample_torch


@pytest.fixture(scope="module")
def tiny_trained(tmp_path_factory):
    """The `tiny` preset (1.1 M params, 16×16), trained briefly so ε is a real, non-zero function."""
    from helpers import train_run

    from ddpm_deploy.export.cli import export_onnx_from_run
    from ddpm_deploy.trainer.presets import PRESETS

    d = tmp_path_factory.mktemp("tiny_run")
    train_run(d, steps=40, unet=PRESETS["tiny"].unet.to_dict(), batch_size=16, save_every=40)
    onnx_path, _ = export_onnx_from_run(d, d / "export")
    return d, onnx_path


def test_full_1000_step_trajectory_matches_pytorch(tiny_trained):
    run, onnx_path = tiny_trained
    model, card, _ = load_model(run)
    sched = plan_for(card.diffusion, "ddpm")
    assert len(sched) == 1000
    shape = (card.data.channels, card.data.image_size, card.data.image_size)
    idx = [0, 1, 2, 3]
    want = sample_torch(model, sched, shape, seed=11, indices=idx)
    got = sample(OrtRunner(onnx_path), sched, shape, seed=11, indices=idx)
    assert_close("L3 tiny 1000 steps ORT vs PyTorch", got, want, L3_TRAJECTORY_FP32_ATOL)
    # the model is not trivial: its ε moves samples away from the ε=0 trajectory
    zero = sample(type("Z", (), {"eps": staticmethod(lambda x, t: np.zeros_like(x))})(), sched, shape, 11, idx)
    assert np.abs(zero - want).max() > 0.1
