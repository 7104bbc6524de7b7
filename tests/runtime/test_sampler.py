"""Host sampling loop: batch independence, NaN detection, respacing, the sample command's files and errors."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from ddpm_deploy.runtime.backends.ort import OrtRunner
from ddpm_deploy.runtime.errors import SamplingError
from ddpm_deploy.runtime.sampling.config import plan_for
from ddpm_deploy.runtime.sampling.host import HostLoop, sample
from ddpm_deploy.runtime.schedule import DiffusionConfig
from ddpm_deploy.runtime.tolerances import L4_BATCH_INDEPENDENCE_ATOL
from ddpm_deploy.verify.cli import main as run_cli


class ConstEps:
    def __init__(self, value):
        self.value = value

    def eps(self, x, t):
        return np.full_like(x, self.value)


def test_sample_i_is_the_same_alone_or_in_a_batch(micro_onnx):
    r = OrtRunner(micro_onnx)
    s = plan_for(DiffusionConfig(), "ddpm", 20)
    batch = sample(r, s, (1, 8, 8), seed=3, indices=range(10, 17))
    alone = sample(r, s, (1, 8, 8), seed=3, indices=[13])
    np.testing.assert_allclose(alone[0], batch[3], rtol=0, atol=L4_BATCH_INDEPENDENCE_ATOL)
    other_seed = sample(r, s, (1, 8, 8), seed=4, indices=[13])
    assert np.abs(other_seed[0] - alone[0]).max() > 0.1


def test_nan_names_step_and_sample():
    s = plan_for(DiffusionConfig(), "ddpm", 10)
    with pytest.raises(SamplingError, match=r"step t=999 .* sample index 5"):
        sample(ConstEps(np.nan), s, (1, 2, 2), seed=0, indices=[5, 6])


def test_timings_cover_every_step():
    s = plan_for(DiffusionConfig(), "ddpm", 10)
    _, tm = HostLoop(ConstEps(0.0), (1, 2, 2), 1).sample(s, seed=0, indices=[0])
    summ = tm.summary()
    assert summ["steps"] == 10 and summ["total_seconds"] >= summ["eps_seconds"] > 0


def test_sample_command_writes_all_outputs(micro_onnx, tmp_path):
    out = tmp_path / "s"
    r = CliRunner().invoke(run_cli, ["sample", "--onnx", str(micro_onnx), "--num", "5", "--batch", "2", "--steps", "10",
                                     "--seed", "7", "--out", str(out)])
    assert r.exit_code == 0, r.output
    npz = np.load(out / "samples.npz")
    assert npz["images"].shape == (5, 8, 8, 1) and npz["images"].dtype == np.uint8
    assert npz["indices"].tolist() == [0, 1, 2, 3, 4]
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"{i:06d}.png" for i in range(5)]
    png = np.asarray(Image.open(out / "images" / "000003.png"))
    np.testing.assert_array_equal(png, npz["images"][3, :, :, 0])
    assert Image.open(out / "grid.png").size[0] > 8
    info = json.loads((out / "run.json").read_text())
    assert info["seed"] == 7 and info["steps"] == 10 and info["backend"] == "onnxruntime-cpu"
    assert info["timings"]["steps"] == 30  # 3 batches × 10 steps


def test_start_index_shards_reproduce_the_same_images(micro_onnx, tmp_path):
    common = ["sample", "--onnx", str(micro_onnx), "--steps", "10", "--seed", "1"]
    assert CliRunner().invoke(run_cli, common + ["--num", "6", "--batch", "4", "--out", str(tmp_path / "all")]).exit_code == 0
    assert CliRunner().invoke(run_cli, common + ["--num", "3", "--batch", "1", "--start-index", "3",
                                                 "--out", str(tmp_path / "shard")]).exit_code == 0
    a = np.load(tmp_path / "all" / "samples.npz")["images"]
    b = np.load(tmp_path / "shard" / "samples.npz")
    assert b["indices"].tolist() == [3, 4, 5]
    assert np.abs(a[3:].astype(int) - b["images"].astype(int)).max() <= 1  # uint8 rounding at most


@pytest.mark.parametrize("args,msg", [
    (["--num", "0"], "--num and --batch must be positive"),
    (["--onnx", "/nonexistent.onnx"], "not found"),
    (["--steps", "1"], "--steps"),
    # CPU-only onnxruntime (CI): the provider is checked before any GPU is touched, and the message names the package
    (["--device", "cuda"], "install onnxruntime-gpu instead of onnxruntime"),
])
def test_sample_errors_are_clean(args, msg, micro_onnx, tmp_path):
    if "--device" in args and "CUDAExecutionProvider" in __import__("onnxruntime").get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here: --device cuda is not an error")
    base = ["sample", "--onnx", str(micro_onnx), "--out", str(tmp_path / "o")]
    r = CliRunner().invoke(run_cli, base + args)
    assert r.exit_code == 2, r.output
    assert msg in r.output


def test_corrupt_onnx_is_clean(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    r = CliRunner().invoke(run_cli, ["sample", "--onnx", str(bad), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "cannot load" in r.output


def test_unwritable_output_dir_is_clean(micro_onnx, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = CliRunner().invoke(run_cli, ["sample", "--onnx", str(micro_onnx), "--out", str(blocker / "sub"), "--steps", "5"])
    assert r.exit_code == 2 and "cannot write" in r.output


def test_onnx_without_metadata_needs_schedule_flags(micro_onnx, tmp_path):
    import onnx

    m = onnx.load(str(micro_onnx))
    del m.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(m, str(bare))
    r = CliRunner().invoke(run_cli, ["sample", "--onnx", str(bare), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "--schedule" in r.output
    r = CliRunner().invoke(run_cli, ["sample", "--onnx", str(bare), "--out", str(tmp_path / "o"), "--schedule", "linear",
                                     "--num-timesteps", "1000", "--steps", "5", "--num", "2"])
    assert r.exit_code == 0, r.output


def test_wrong_io_names_are_refused(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Identity", ["a"], ["b"])], "g",
                          [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 1, 8, 8])],
                          [helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 1, 8, 8])])
    p = tmp_path / "id.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(p))
    r = CliRunner().invoke(run_cli, ["sample", "--onnx", str(p), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "expected inputs x float32 [B,C,H,W] and t int32 [B]" in r.output
