"""The Python API (``from ddpm_deploy import Sampler``): the README's example runs without torch, and its images
equal ``ddpm-run sample`` bit for bit."""

from __future__ import annotations

import json
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


# --- issue 24, "Defaults and the API": backends, __version__, errors in the API's words, progress, close ---------


def test_version_is_the_installed_distributions():
    from importlib import metadata

    assert ddpm_deploy.__version__ == metadata.version("ddpm-deploy")
    assert "__version__" in dir(ddpm_deploy)


def test_version_falls_back_to_pyproject_in_a_source_tree(monkeypatch):
    from importlib import metadata

    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", not_installed)
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    want = re.search(r'^version = "([^"]+)"', pyproject, re.M).group(1)
    assert ddpm_deploy._version() == f"{want}+source"


def test_closed_sampler_raises_a_clear_error(random_micro_onnx):
    from ddpm_deploy.runtime.errors import DDPMError, SamplerClosedError

    with Sampler.from_onnx(random_micro_onnx, threads=1) as s:
        assert s(1, steps=3).shape == (1, 8, 8, 1) and not s.closed
    assert s.closed and "closed" in repr(s)
    with pytest.raises(SamplerClosedError, match=r"is closed \(close\(\) was called, or its with block ended\)"):
        s(1, steps=3)
    with pytest.raises(SamplerClosedError):
        with s:
            pass
    s.close()  # idempotent
    assert issubclass(SamplerClosedError, DDPMError)
    assert s.plan(10).describe()["scheduler"] == "DDPMScheduler"  # what it would sample needs no runner


def test_progress_callback_counts_image_steps_and_bar_writes_to_stderr(random_micro_onnx, capsys):
    seen, batches = [], []
    with Sampler.from_onnx(random_micro_onnx, threads=1, batch=2) as s:
        plain = s(5, seed=1, steps=4)
        capsys.readouterr()
        with_cb = s(5, seed=1, steps=4, progress=lambda d, t: seen.append((d, t)),
                    callback=lambda d, t: batches.append((d, t)))
        quiet = capsys.readouterr()
        with_bar = s(5, seed=1, steps=4, progress=True)
        bar = capsys.readouterr()
        with pytest.raises(ConfigError, match=r"progress must be True .* found 'yes'"):
            s(1, steps=4, progress="yes")

    np.testing.assert_array_equal(plain, with_cb)
    np.testing.assert_array_equal(plain, with_bar)
    # batches of 2, 2, 1 images × 4 ε calls: done grows after every ε call, in image·steps, up to 5 × 4
    assert seen == [(d, 20) for d in (2, 4, 6, 8, 10, 12, 14, 16, 17, 18, 19, 20)]
    assert batches == [(2, 5), (4, 5), (5, 5)]
    assert quiet.err == "" and "img·step" in bar.err and "100%" in bar.err


@pytest.mark.parametrize("call, message", [
    (dict(steps=0), r"^steps must be between 2 and 1000 \(the model's T\), found 0$"),
    (dict(steps=5000), r"^steps must be between 2 and 1000"),
    (dict(batch=0), r"^batch must be an integer >= 1 \(images per model call\), found 0$"),
    (dict(seed=-1), r"^seed must be an integer in \[0, 2\*\*64 - 1\], found -1$"),
    (dict(seed=2 ** 64), r"^seed must be"),
    (dict(start_index=-3), r"^start_index and num=1 must keep"),
    (dict(start_index=2 ** 32), r"^start_index and num=1 must keep the sample indices in \[0, 2\*\*32 - 2\]"),
    (dict(num=0), r"^num must be an integer >= 1 \(the number of images\), found 0$"),
    (dict(num=1.5), r"^num must be an integer"),
])
def test_call_errors_name_the_arguments_not_cli_flags(random_micro_onnx, call, message):
    with Sampler.from_onnx(random_micro_onnx, threads=1) as s:
        kw = {"num": 1, **call}
        with pytest.raises(ConfigError, match=message) as e:
            s(kw.pop("num"), **kw)
        assert "--" not in str(e.value)
        assert s(1, steps=3).shape == (1, 8, 8, 1)  # still usable


@pytest.mark.parametrize("opened, message", [
    (dict(device="tpu"), r"^device must be one of \['cpu', 'cuda'\], found 'tpu'$"),
    (dict(backend="foo"), r"^backend must be one of \['onnxruntime', 'openvino', 'tensorrt'\]"),
    (dict(precision="fp16"), r"^precision must be one of \['fp32', 'bf16', 'int8', 'int8-bf16', 'auto'\], found 'fp16'$"),
    (dict(precision="bf16"), r"^precision='bf16' is an OpenVINO option: add backend='openvino'"),
    (dict(backend="openvino", device="cuda"), r"^the OpenVINO backend runs on the CPU: use device='cpu'$"),
    (dict(threads=-1), r"^threads must be >= 0 \(0: ONNX Runtime's default\), found -1$"),
    (dict(batch=0), r"^batch must be an integer >= 1"),
])
def test_constructor_errors_name_the_arguments(random_micro_onnx, opened, message):
    with pytest.raises(ConfigError, match=message) as e:
        Sampler.from_onnx(random_micro_onnx, **opened)
    assert "--" not in str(e.value)


def test_the_cli_still_names_its_flags(random_micro_onnx, tmp_path):
    """The same checks (shared with the API) keep naming flags in ddpm-run sample."""
    base = ["sample", "--onnx", str(random_micro_onnx), "--num", "1", "--no-progress", "--out", str(tmp_path / "o")]
    steps = CliRunner().invoke(run_cli, [*base, "--steps", "1"])
    bf16 = CliRunner().invoke(run_cli, [*base, "--precision", "bf16"])

    assert steps.exit_code == 2 and "error: --steps must be between 2 and 1000 (the model's T), found 1" in steps.output
    assert bf16.exit_code == 2
    assert "error: --precision bf16 is an OpenVINO option: add --backend openvino" in bf16.output


def test_int8_without_its_model_names_the_file_and_the_command(random_micro_onnx, tmp_path):
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(Path(random_micro_onnx).read_bytes())
    pytest.importorskip("openvino", reason="OpenVINO is not installed (pip install '.[openvino]')")
    with pytest.raises(ArtifactError, match=r"^precision='int8' needs the int8 model .*model\.int8\.xml; write it "
                                            r"with `ddpm-export --onnx .*model\.onnx --int8`$"):
        Sampler.from_onnx(onnx, backend="openvino", precision="int8")


@pytest.fixture()
def openvino_models(random_micro_onnx, tmp_path, monkeypatch):
    """model.onnx and an OpenVINO IR of it saved as model.int8.xml beside it (an fp32 IR: what the test checks is
    which file the API and the CLI open for precision int8, not NNCF's quantisation, which test_openvino covers)."""
    ov = pytest.importorskip("openvino", reason="OpenVINO is not installed (pip install '.[openvino]')")
    monkeypatch.setenv("DDPM_OPENVINO_CACHE", str(tmp_path / "ov-cache"))
    onnx = tmp_path / "m" / "model.onnx"
    onnx.parent.mkdir()
    onnx.write_bytes(Path(random_micro_onnx).read_bytes())
    ov.save_model(ov.Core().read_model(str(onnx)), str(onnx.with_name("model.int8.xml")), compress_to_fp16=False)
    return onnx


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
def test_openvino_backend_opens_what_the_cli_opens_and_gives_its_bytes(openvino_models, tmp_path, precision):
    onnx = openvino_models
    r = CliRunner().invoke(run_cli, ["sample", "--onnx", str(onnx), "--backend", "openvino", "--precision", precision,
                                     "--num", "3", "--batch", "2", "--steps", "5", "--seed", "7", "--threads", "1",
                                     "--no-progress", "--no-pngs", "--out", str(tmp_path / "cli")])
    assert r.exit_code == 0, r.output
    info = json.loads((tmp_path / "cli" / "run.json").read_text())

    with Sampler.from_onnx(onnx, backend="openvino", precision=precision, threads=1, batch=2) as s:
        images = s(3, seed=7, steps=5)
        runner = s.runner

    assert runner.name == "openvino-cpu" and str(runner.path) == info["model"]
    assert runner.path.name == ("model.int8.xml" if precision == "int8" else "model.onnx")
    assert runner.precision == info["precision"]
    np.testing.assert_array_equal(images, np.load(tmp_path / "cli" / "samples.npz")["images"])


def test_openvino_ir_path_and_from_run(openvino_models, tmp_path):
    onnx = openvino_models
    with Sampler.from_onnx(onnx.with_name("model.int8.xml"), threads=1) as s:  # a .xml: OpenVINO by its suffix
        assert s.runner.name == "openvino-cpu" and s(2, steps=3).shape == (2, 8, 8, 1)
    run = tmp_path / "run"
    (run / "export").mkdir(parents=True)
    for name in ("model.onnx", "model.int8.xml", "model.int8.bin"):
        (run / "export" / name).write_bytes(onnx.with_name(name).read_bytes())
    with Sampler.from_run(run, backend="openvino", precision="int8", threads=1) as s:
        assert s.runner.path == run / "export" / "model.int8.xml"
    with Sampler.from_run(run, threads=1) as s:
        assert s.runner.name == "onnxruntime-cpu"
