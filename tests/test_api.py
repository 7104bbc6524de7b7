"""The Python API (``from ddpm_deploy import Sampler``): the README's example runs without torch, and its images
equal ``ddpm-run sample`` bit for bit."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import ddpm_deploy
from ddpm_deploy import Sampler
from ddpm_deploy.runtime.errors import ArtifactError, ConfigError
from ddpm_deploy.verify.cli import main as run_cli
from helpers import run_without_torch

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    text = README.read_text(encoding="utf-8")
    section = text.split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_public_names():
    assert ddpm_deploy.__all__ == ["Sampler", "DDPMError"]
    assert all(getattr(ddpm_deploy, n) is not None for n in ddpm_deploy.__all__)
    with pytest.raises(AttributeError):
        ddpm_deploy.Nope  # noqa: B018


def test_readme_example_runs_without_torch_and_equals_ddpm_run_sample(random_micro_onnx, tmp_path):
    example = readme_example().replace("runs/latest/export/model.onnx", str(random_micro_onnx))
    assert CliRunner().invoke(run_cli, ["sample", "--onnx", str(random_micro_onnx), "--num", "32", "--batch", "8",
                                        "--steps", "50", "--seed", "0", "--no-pngs", "--out",
                                        str(tmp_path / "cli")]).exit_code == 0
    check = f"""
import numpy as np, sys
ref = np.load({str(tmp_path / "cli" / "samples.npz")!r})["images"]
assert images.dtype == np.uint8 and images.shape == (16, 8, 8, 1), images.shape
assert np.array_equal(np.concatenate([images, more]), ref), "API images differ from ddpm-run sample"
assert len(thumbs) == 4 and thumbs[0].size == (8, 8)
assert "torch" not in sys.modules
print("EXAMPLE OK")
"""

    r = run_without_torch(example + check)

    assert r.returncode == 0 and "EXAMPLE OK" in r.stdout, r.stderr[-3000:]
    assert "(16, 8, 8, 1) uint8 4" in r.stdout


def test_batch_and_start_index_do_not_change_images(random_micro_onnx):
    with Sampler.from_onnx(random_micro_onnx, threads=1, batch=5) as s:
        a = s(6, seed=2, steps=10)
        b = s(3, seed=2, start_index=3, steps=10, batch=1)
        c = s(6, seed=3, steps=10)

    np.testing.assert_array_equal(a[3:], b)
    assert not np.array_equal(a, c)


def test_from_run_and_errors(random_micro_onnx, tmp_path):
    run = tmp_path / "run"
    (run / "export").mkdir(parents=True)
    (run / "export" / "model.onnx").write_bytes(Path(random_micro_onnx).read_bytes())
    with Sampler.from_run(run, threads=1) as s:
        assert s.sample_shape == (1, 8, 8) and s(1, steps=5).shape == (1, 8, 8, 1)
        with pytest.raises(ConfigError, match="steps"):
            s(1, steps=1)
    with pytest.raises(ArtifactError, match="ddpm-export"):
        Sampler.from_run(tmp_path / "nothing")
