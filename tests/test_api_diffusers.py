"""The Python API with diffusers' habits: ``Sampler.from_pretrained(PATH)`` for every artifact, and diffusers' call
keywords (``batch_size``, ``num_inference_steps``, ``output_type``, ``generator`` as a seed) with their meanings.
(The diffusers folder itself, converted on first use, is tested in tests/parity/test_diffusers_out.py.)"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from ddpm_deploy import Sampler
from ddpm_deploy.runtime.errors import ArtifactError, ConfigError
from ddpm_deploy.runtime.pretrained import resolve


def test_keywords_mean_what_ours_mean(random_micro_onnx):
    with Sampler.from_onnx(random_micro_onnx, threads=1) as s:
        ours = s(3, seed=5, steps=10)
        theirs = s(batch_size=3, num_inference_steps=10, generator=5)
        unit = s(batch_size=3, num_inference_steps=10, generator=5, output_type="np")
        pil = s(batch_size=3, num_inference_steps=10, generator=5, output_type="pil")
        one = s(num_inference_steps=10)  # diffusers' default batch_size: 1; seed 0

    assert np.array_equal(ours, theirs) and theirs.dtype == np.uint8
    assert unit.dtype == np.float32 and unit.shape == ours.shape and 0 <= unit.min() and unit.max() <= 1
    assert np.array_equal(np.floor(unit * 255 + 0.5).astype(np.uint8), ours)  # the same images, as [0, 1] floats
    assert [np.asarray(p)[..., None].tolist() for p in pil] == ours.tolist()
    assert one.shape == (1, 8, 8, 1)


class FakeGenerator:  # what a torch.Generator is to this API: not an integer
    pass


@pytest.mark.parametrize("call, message", [
    (dict(generator=FakeGenerator()), r"^generator must be an integer seed: our noise is keyed by \(seed, image index\)"),
    (dict(generator=[1, 2]), r"^generator must be an integer seed"),
    (dict(seed=1, generator=2), r"^give seed or generator \(an integer seed\), not both"),
    (dict(num=2, batch_size=2), r"^give num or batch_size \(diffusers' name for it\), not both"),
    (dict(steps=3, num_inference_steps=3), r"^give steps or num_inference_steps"),
    (dict(output_type="pt"), r"^output_type must be one of \['uint8', 'np', 'pil'\] \(diffusers' 'pt' and 'latent'"),
    (dict(output_type="np", pil=True), r"^pil=True and output_type='np' disagree"),
    (dict(batch_size=0), r"^num must be an integer >= 1"),
])
def test_keyword_errors_name_the_argument(random_micro_onnx, call, message):
    with Sampler.from_onnx(random_micro_onnx, threads=1) as s:
        with pytest.raises(ConfigError, match=message):
            s(**{"num_inference_steps": 3, **call} if "steps" not in call else call)
        assert s(1, steps=3).shape == (1, 8, 8, 1)


def test_from_pretrained_opens_every_artifact(random_micro_onnx, tmp_path):
    export = tmp_path / "export-folder"
    export.mkdir()
    shutil.copy(random_micro_onnx, export / "model.onnx")
    run = tmp_path / "run"
    (run / "export").mkdir(parents=True)
    (run / "model.json").write_text("{}")  # a run dir is known by its model.json; the API opens its export
    shutil.copy(random_micro_onnx, run / "export" / "model.onnx")
    with Sampler.from_onnx(random_micro_onnx, threads=1) as s:
        want = s(2, steps=5)

    for path in (random_micro_onnx, export, run):
        with Sampler.from_pretrained(path, threads=1) as s:
            assert np.array_equal(s(batch_size=2, num_inference_steps=5), want), path
    assert resolve(tmp_path / "m.plan") == ("plan", tmp_path / "m.plan")
    assert resolve(run) == ("run", run) and resolve(export) == ("onnx", export / "model.onnx")
    with pytest.raises(ArtifactError, match="found no model: expected model.json"):
        Sampler.from_pretrained(tmp_path)
    with pytest.raises(ArtifactError, match="no such file or folder"):
        Sampler.from_pretrained(tmp_path / "absent")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "unet").mkdir()
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        (tmp_path / "half" / "unet" / name).write_text("{}")
    with pytest.raises(ArtifactError, match="expected the model's scheduler_config.json"):
        Sampler.from_pretrained(tmp_path / "half")
