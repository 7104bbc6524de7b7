"""Precision per timestep band (runtime/backends/banded.py): bands parsed and checked, each image's ε from its
band's runner whatever its batch-mates, and `ddpm-run sample --precision-bands` with real OpenVINO runners."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from ddpm_deploy.runtime.backends.banded import BandedRunner, parse_bands
from ddpm_deploy.runtime.backends.base import Runner
from ddpm_deploy.runtime.errors import ConfigError


class ScaleRunner(Runner):
    """A stand-in runner whose ε is x times a constant (which runner answered is visible in the output)."""

    def __init__(self, scale: float, precision: str):
        self.scale, self.precision, self.calls = scale, precision, []
        self.path, self.sample_shape = None, (1, 2, 2)

    @property
    def name(self):
        return "scale"

    def eps(self, x, t):
        self.calls.append(len(t))
        return (x * self.scale).astype(np.float32)


@pytest.mark.parametrize("text, why", [("bf16:0-99", "end at 99"), ("bf16:0-99,int8:101-999", "a gap"),
                                       ("bf16:0-99,int8:99-999", "an overlap"), ("bf16:0-", "expected"),
                                       ("0-999", "expected"), ("bf16:9-2", "expected")])
def test_bands_must_cover_every_timestep_once(text, why):
    with pytest.raises(ConfigError, match=why):
        parse_bands(text, 1000)


def test_bands_past_the_models_last_timestep_are_cut():
    assert parse_bands("bf16:0-99,int8:100-599,bf16:600-999", 100) == [(0, 99, "bf16")]
    assert parse_bands("bf16:0-49,int8:50-599", 100) == [(0, 49, "bf16"), (50, 99, "int8")]


def test_each_image_gets_its_bands_runner_whatever_its_batch():
    a, b = ScaleRunner(2.0, "bf16"), ScaleRunner(3.0, "int8")
    r = BandedRunner({"bf16": a, "int8": b}, parse_bands("bf16:0-99,int8:100-599,bf16:600-999", 1000))
    x = np.random.default_rng(0).standard_normal((5, 1, 2, 2)).astype(np.float32)
    t = np.array([0, 150, 999, 600, 599], np.int32)
    got = r.eps(x, t)
    want = np.stack([x[i] * (3.0 if 100 <= t[i] <= 599 else 2.0) for i in range(5)])
    np.testing.assert_array_equal(got, want)
    assert a.calls == [3] and b.calls == [2]  # one call per band present in the batch
    assert r.eps(x[:1], t[:1]).shape == (1, 1, 2, 2) and a.calls[-1] == 1  # a single band: one call, no split
    assert r.precision == "bf16:0-99,int8:100-599,bf16:600-999"


def test_sample_with_precision_bands_on_openvino(micro_onnx, tmp_path):
    """All timesteps in an fp32 band: the same bytes as --backend openvino --precision fp32; a two-band job records
    its bands as the precision that ran, with BandedRunner as the runner."""
    pytest.importorskip("openvino")
    from ddpm_deploy.verify.cli import main

    common = ["sample", "--onnx", str(micro_onnx), "--num", "3", "--batch", "3", "--steps", "8", "--no-progress",
              "--no-pngs"]
    r1 = CliRunner().invoke(main, [*common, "--backend", "openvino", "--out", str(tmp_path / "ov")])
    r2 = CliRunner().invoke(main, [*common, "--precision-bands", "fp32:0-999", "--out", str(tmp_path / "band")])
    assert r1.exit_code == 0 and r2.exit_code == 0, r1.output + r2.output
    with np.load(tmp_path / "ov" / "samples.npz") as a, np.load(tmp_path / "band" / "samples.npz") as b:
        assert np.array_equal(a["images"], b["images"])
    r3 = CliRunner().invoke(main, [*common, "--precision-bands", "fp32:0-499,bf16:500-999", "--out",
                                   str(tmp_path / "two")])
    assert r3.exit_code == 0, r3.output
    info = json.loads((tmp_path / "two" / "run.json").read_text())
    assert info["runner"] == "BandedRunner" and info["precision"].startswith("fp32:0-499,")
    bad = CliRunner().invoke(main, [*common, "--precision-bands", "fp32:0-499", "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "cover every timestep" in bad.output and not (tmp_path / "bad").exists()


def test_api_takes_precision_bands_as_its_precision(micro_onnx, tmp_path):
    """``Sampler.from_onnx(path, precision="fp32:0-499,bf16:500-999")``: the same images as the CLI's
    --precision-bands (one runner per band, each image by its timestep); bands off the CPU are refused by name."""
    pytest.importorskip("openvino")
    from ddpm_deploy.runtime.api import Sampler
    from ddpm_deploy.verify.cli import main

    bands = "fp32:0-499,bf16:500-999"
    r = CliRunner().invoke(main, ["sample", "--onnx", str(micro_onnx), "--num", "3", "--batch", "3", "--steps", "8",
                                  "--seed", "5", "--no-progress", "--no-pngs", "--precision-bands", bands,
                                  "--out", str(tmp_path / "cli")])
    assert r.exit_code == 0, r.output
    with Sampler.from_onnx(micro_onnx, precision=bands, batch=3) as s:
        assert type(s.runner).__name__ == "BandedRunner" and s.runner.precision.startswith("fp32:0-499,")
        images = s(3, seed=5, steps=8)
    with np.load(tmp_path / "cli" / "samples.npz") as cli:
        assert np.array_equal(images, cli["images"])
    with pytest.raises(ConfigError, match="precision"):
        Sampler.from_onnx(micro_onnx, precision=bands, backend="onnxruntime")
