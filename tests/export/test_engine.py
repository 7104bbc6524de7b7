"""TensorRT plan building (export/engine.py) and the plan sidecar checks (runtime/plan.py).

Real builds run once per TensorRT flavour that imports: TensorRT-RTX builds real engines without a GPU, so
they run on CPU-only CI; a flavour whose module is missing is skipped with the reason.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sys
import warnings
from pathlib import Path

import pytest

from ddpm_deploy.runtime.config import ONNX_METADATA_KEY, DataSpec, ModelCard
from ddpm_deploy.runtime.contract import PlanSidecar
from ddpm_deploy.runtime.errors import ArtifactError, ConfigError, MissingDependencyError
from ddpm_deploy.runtime.plan import check_plan_compat, read_plan_sidecar, runs_on, sidecar_path
from ddpm_deploy.runtime.schedule import DiffusionConfig

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
engine = pytest.importorskip("ddpm_deploy.export.engine")

CHANNELS, SIZE = 1, 8
PROFILE = {"min": 1, "opt": 4, "max": 16}


def _settings(flavour: str, **kw) -> "engine.EngineSettings":
    return engine.EngineSettings(batch_min=PROFILE["min"], batch_opt=PROFILE["opt"], batch_max=PROFILE["max"],
                                 flavour=flavour, **kw)


# --- fixtures: a tiny ε-model exported to ONNX, fp32 and fp16 (fp16 weights, fp32 I/O via Casts) ------------

class TinyEps(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_in = torch.nn.Conv2d(CHANNELS, 4, 3, padding=1)
        self.conv_out = torch.nn.Conv2d(4, CHANNELS, 3, padding=1)
        self.freq = torch.nn.Parameter(torch.linspace(0.01, 1.0, 4))

    def forward(self, x, t):
        dtype = self.conv_in.weight.dtype  # float16 in the fp16 variant: Casts at the graph boundary
        h = torch.relu(self.conv_in(x.to(dtype)))
        emb = torch.sin(t.to(torch.float32)[:, None] * self.freq.float()[None, :]).to(dtype)  # the t-dependent term
        return self.conv_out(h + emb[:, :, None, None]).to(torch.float32)


def _export_onnx(path: Path, half: bool, card: bool = True) -> Path:
    torch.manual_seed(0)
    model = TinyEps().eval()
    if half:
        model = model.half()
    x, t = torch.randn(2, CHANNELS, SIZE, SIZE), torch.tensor([0, 999], dtype=torch.int32)
    batch = {0: "batch"}
    with warnings.catch_warnings():  # the TorchScript exporter (dynamo=False) is deprecated; fine for a fixture
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (x, t), str(path), input_names=["x", "t"], output_names=["eps"],
                          dynamic_axes={"x": batch, "t": batch, "eps": batch}, opset_version=17, dynamo=False)
    if card:
        proto = onnx.load(str(path))
        entry = proto.metadata_props.add()
        entry.key, entry.value = ONNX_METADATA_KEY, ModelCard(DiffusionConfig(), DataSpec(CHANNELS, SIZE)).to_json()
        onnx.save(proto, str(path))
    return path


@pytest.fixture(scope="module")
def onnx_fp32(tmp_path_factory) -> Path:
    return _export_onnx(tmp_path_factory.mktemp("onnx") / "model.onnx", half=False)


@pytest.fixture(scope="module")
def onnx_fp16(tmp_path_factory) -> Path:
    return _export_onnx(tmp_path_factory.mktemp("onnx16") / "model.fp16.onnx", half=True)


@pytest.fixture(scope="module", params=["rtx", "tensorrt"])
def flavour(request) -> str:
    """Each TensorRT flavour whose module imports; the others skip with the reason."""
    if request.param == "tensorrt":
        pytest.importorskip("tensorrt", minversion="10", reason="tensorrt >= 10 is not installed")
    else:
        try:
            engine.load_tensorrt("rtx")
        except MissingDependencyError as e:
            pytest.skip(str(e))
    return request.param


@pytest.fixture(scope="module")
def trt(flavour):
    return engine.load_tensorrt(flavour)[0]


@pytest.fixture(scope="module")
def built_fp32(flavour, onnx_fp32, tmp_path_factory):
    plan = tmp_path_factory.mktemp(f"plan-{flavour}") / "model.plan"
    return plan, engine.build_engine(onnx_fp32, plan, _settings(flavour))


@pytest.fixture()
def plan_copy(built_fp32, tmp_path) -> Path:
    """A private copy of the built plan and its sidecar, for tests that damage them."""
    plan, _ = built_fp32
    shutil.copy(plan, tmp_path / plan.name)
    shutil.copy(sidecar_path(plan), sidecar_path(tmp_path / plan.name))
    return tmp_path / plan.name


# --- settings (no TensorRT needed) -------------------------------------------------------------------------

def test_settings_round_trip():
    settings = engine.EngineSettings(batch_min=2, batch_opt=4, batch_max=8, timing_cache="tc.bin", flavour="rtx")

    restored = engine.EngineSettings.from_dict(json.loads(json.dumps(settings.to_dict())))

    assert restored == settings


@pytest.mark.parametrize("batch", [(0, 1, 1), (1, 8, 4), (4, 2, 8), (1, 1, 0), (1.5, 2, 4)])
def test_bad_profile_raises_config_error(batch):
    with pytest.raises(ConfigError, match="min <= opt <= max"):
        engine.EngineSettings(batch_min=batch[0], batch_opt=batch[1], batch_max=batch[2])


def test_bad_settings_raise_config_error():
    with pytest.raises(ConfigError, match="flavour"):
        engine.EngineSettings(flavour="onnxruntime")
    with pytest.raises(ConfigError, match="opt_level"):
        engine.EngineSettings(opt_level=9)
    with pytest.raises(ConfigError, match="workspace_mb"):
        engine.EngineSettings(workspace_mb=0)
    with pytest.raises(ConfigError, match="unknown engine settings"):
        engine.EngineSettings.from_dict({"fp16": True})


# --- missing modules: a None entry in sys.modules makes the import fail, as if the package could not exist --

def test_rtx_module_that_cannot_exist_names_the_wheels(monkeypatch):
    for name in engine.RTX_MODULES:
        monkeypatch.setitem(sys.modules, name, None)

    with pytest.raises(MissingDependencyError) as err:
        engine.load_tensorrt("rtx")

    assert "pip install tensorrt-rtx-cu13-bindings==1.7.1.116 tensorrt-rtx-cu13-libs==1.7.1.116" in str(err.value)


def test_tensorrt_module_that_cannot_exist_names_the_wheel(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)

    with pytest.raises(MissingDependencyError, match="tensorrt>=10"):
        engine.load_tensorrt("tensorrt")


def test_no_flavour_can_exist_auto_names_both(monkeypatch):
    for name in ("tensorrt", *engine.RTX_MODULES):
        monkeypatch.setitem(sys.modules, name, None)

    with pytest.raises(MissingDependencyError) as err:
        engine.load_tensorrt("auto")

    assert "tensorrt-rtx-cu13-bindings==1.7.1.116" in str(err.value) and "tensorrt>=10" in str(err.value)


def test_tensorrt_older_than_10_is_refused(monkeypatch):
    fake = type(sys)("tensorrt")
    fake.__version__ = "8.6.1"
    monkeypatch.setitem(sys.modules, "tensorrt", fake)

    with pytest.raises(MissingDependencyError, match="found tensorrt 8.6.1"):
        engine.load_tensorrt("tensorrt")


# --- plan compatibility (pure) -----------------------------------------------------------------------------

def _sidecar(flavour="tensorrt", version="10.13.0.35", vc=False, cc="8.9"):
    module = "tensorrt" if flavour == "tensorrt" else "tensorrt_rtx_bindings"
    return PlanSidecar(ddpm={}, trt={"flavour": flavour, "module": module, "version": version}, precision="fp32",
                       profile={"min": 1, "opt": 1, "max": 1}, inputs=[], outputs=[], onnx={}, plan={},
                       build={"version_compatible": vc}, gpu={"name": "NVIDIA L4", "compute_capability": cc})


def test_compat_same_everything_has_no_reasons():
    assert check_plan_compat(_sidecar(), "tensorrt", "10.13.0.35", "8.9") == []
    assert check_plan_compat(_sidecar(), "tensorrt", "10.13.0.35", None) == []


def test_compat_reports_flavour_version_and_gpu():
    assert "flavour" in check_plan_compat(_sidecar(), "tensorrt_rtx_bindings", "1.7.1.116", "8.9")[0]
    [reason] = check_plan_compat(_sidecar(), "tensorrt", "10.14.1.48", (8, 9))
    assert "10.13.0.35" in reason and "10.14.1.48" in reason
    [reason] = check_plan_compat(_sidecar(), "tensorrt", "10.13.0.35", "9.0")
    assert "8.9" in reason and "9.0" in reason


def test_compat_version_compatible_plans():
    assert check_plan_compat(_sidecar(vc=True), "tensorrt", "10.14.1.48", "8.9") == []
    [reason] = check_plan_compat(_sidecar(vc=True), "tensorrt", "10.12.0.36", "8.9")
    assert "newer than the runtime" in reason


def test_compat_rtx_plans_are_portable_from_ampere():
    side = _sidecar("rtx", "1.7.1.116", cc=None)
    assert check_plan_compat(side, "tensorrt_rtx_bindings", "1.7.1.116", "12.0") == []
    assert check_plan_compat(side, "tensorrt_rtx", "1.7.1.116", "8.6") == []
    [reason] = check_plan_compat(side, "tensorrt_rtx_bindings", "1.7.1.116", "7.5")
    assert "7.5" in reason and "built for compute capability 8.6, 8.9, 12.0" in reason
    assert runs_on(side) == ["8.6", "8.9", "12.0"]


@pytest.mark.parametrize("cc", ["8.0", "9.0", "10.0"])
def test_compat_rtx_plans_are_refused_on_data_centre_gpus(cc):
    [reason] = check_plan_compat(_sidecar("rtx", "1.7.1.116", cc=None), "tensorrt_rtx_bindings", "1.7.1.116", cc)
    assert f"this GPU has {cc}" in reason and "7.5, 8.6, 8.9, 12.0" in reason and "ONNX Runtime CUDA" in reason


@pytest.mark.trt
@pytest.mark.parametrize("tf32", [False, True])
def test_tf32_flag_is_cleared_unless_asked_for(flavour, tf32):
    trt, _ = engine.load_tensorrt(flavour)
    builder = trt.Builder(engine._logger(trt))
    config = builder.create_builder_config()
    assert config.get_flag(trt.BuilderFlag.TF32)  # TensorRT's default: on
    io = {"inputs": [{"name": "x", "profile": {"min": [1, 1, 8, 8], "opt": [2, 1, 8, 8], "max": [4, 1, 8, 8]}}]}

    applied = engine._configure(trt, flavour, builder, config, io, _settings(flavour, tf32=tf32))

    assert applied["tf32"] is tf32 and config.get_flag(trt.BuilderFlag.TF32) is tf32


# --- sidecar refusals that need no TensorRT ----------------------------------------------------------------

def test_read_sidecar_refuses_missing_plan(tmp_path):
    with pytest.raises(ArtifactError, match="expected a TensorRT plan"):
        read_plan_sidecar(tmp_path / "model.plan")


@pytest.mark.parametrize("text, match", [("{not json", "unreadable"), ('{"schema": "other"}', "expected schema"),
                                         ('{"schema": "ddpm-deploy/plan", "schema_version": 99}', "schema_version")])
def test_read_sidecar_refuses_bad_sidecar(tmp_path, text, match):
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"plan")
    sidecar_path(plan).write_text(text)

    with pytest.raises(ArtifactError, match=match):
        read_plan_sidecar(plan)


# --- real builds -------------------------------------------------------------------------------------------

@pytest.mark.trt
def test_fp32_build_writes_plan_and_sidecar(built_fp32, onnx_fp32, flavour):
    plan, sidecar = built_fp32

    data = plan.read_bytes()

    assert PlanSidecar.load(sidecar_path(plan)) == sidecar
    assert len(data) > 0 and sidecar.plan == {"path": "model.plan", "sha256": hashlib.sha256(data).hexdigest(),
                                                 "bytes": len(data)}
    saved = json.loads(sidecar_path(plan).read_text())
    assert saved["schema"] == "ddpm-deploy/plan" and saved["schema_version"] == 2
    assert saved["model_sha256"] == hashlib.sha256(onnx_fp32.read_bytes()).hexdigest() and "numpy" in saved["versions"]
    assert ModelCard.from_dict(sidecar.ddpm) == ModelCard(DiffusionConfig(), DataSpec(CHANNELS, SIZE))
    assert sidecar.trt["flavour"] == flavour and sidecar.trt["version"]
    assert sidecar.precision == "fp32"
    assert sidecar.profile == PROFILE
    assert sidecar.inputs == [{"name": "x", "dtype": "float32", "shape": [-1, CHANNELS, SIZE, SIZE]},
                                 {"name": "t", "dtype": "int32", "shape": [-1]}]
    assert sidecar.outputs == [{"name": "eps", "dtype": "float32", "shape": [-1, CHANNELS, SIZE, SIZE]}]
    assert sidecar.onnx == {"path": "model.onnx", "sha256": hashlib.sha256(onnx_fp32.read_bytes()).hexdigest()}
    assert sidecar.gpu is None or set(sidecar.gpu) == {"name", "compute_capability"}
    build = sidecar.build
    assert build["seconds"] >= 0 and build["timestamp"].endswith("+00:00")
    assert (build["workspace_mb"], build["version_compatible"], build["timing_cache"]) == (4096, False, None)
    assert build["tf32"] is False  # fp32 layers stay full fp32 unless --tf32
    assert build["opt_level"] in (3, None)
    assert read_plan_sidecar(plan) == sidecar
    assert check_plan_compat(sidecar, sidecar.trt["module"], sidecar.trt["version"]) == []


@pytest.mark.trt
def test_fp16_build_keeps_fp32_io(flavour, onnx_fp16, tmp_path):
    plan = tmp_path / "model.fp16.plan"

    sidecar = engine.build_engine(onnx_fp16, plan, _settings(flavour))

    assert sidecar.precision == "fp16"
    assert [(t["name"], t["dtype"]) for t in sidecar.inputs + sidecar.outputs] == [
        ("x", "float32"), ("t", "int32"), ("eps", "float32")]
    assert plan.stat().st_size > 0 and read_plan_sidecar(plan).plan["sha256"] == sidecar.plan["sha256"]


@pytest.mark.trt
def test_network_io_names_dtypes_and_profile(flavour, trt, onnx_fp32):
    io = engine.network_io(onnx_fp32, _settings(flavour), trt)

    x, t = io["inputs"]
    [eps] = io["outputs"]
    assert (x["name"], x["dtype"], x["shape"]) == ("x", "float32", [-1, CHANNELS, SIZE, SIZE])
    assert x["profile"] == {k: [b, CHANNELS, SIZE, SIZE] for k, b in PROFILE.items()}
    assert (t["name"], t["dtype"], t["shape"]) == ("t", "int32", [-1])
    assert t["profile"] == {k: [b] for k, b in PROFILE.items()}
    assert (eps["name"], eps["dtype"], eps["shape"]) == ("eps", "float32", [-1, CHANNELS, SIZE, SIZE])


@pytest.mark.trt
def test_unsupported_ops(flavour, trt, onnx_fp32, onnx_fp16, tmp_path):
    proto = onnx.load(str(onnx_fp32))
    proto.graph.node.append(onnx.helper.make_node("NoSuchOpInOnnx", ["eps"], ["eps2"], domain="ddpm.test"))
    odd = tmp_path / "odd.onnx"
    onnx.save(proto, str(odd))

    assert engine.unsupported_ops(onnx_fp32, trt) == []
    assert engine.unsupported_ops(onnx_fp16, trt) == []
    assert engine.unsupported_ops(odd, trt) == ["NoSuchOpInOnnx"]
    with pytest.raises(ArtifactError, match=r"node \d+ \(op NoSuchOpInOnnx\)(.|\n)*support: \['NoSuchOpInOnnx'\]"):
        engine.network_io(odd, _settings(flavour), trt)


@pytest.mark.trt
def test_corrupt_onnx_lists_parser_errors(flavour, onnx_fp32, tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(onnx_fp32.read_bytes()[: 200] + b"\xff" * 64)

    with pytest.raises(ArtifactError, match=r"parser error\(s\):\n  - the model: ") as err:
        engine.build_engine(bad, tmp_path / "model.plan", _settings(flavour))

    assert str(bad) in str(err.value)
    assert not (tmp_path / "model.plan").exists() and not sidecar_path(tmp_path / "model.plan").exists()


@pytest.mark.trt
def test_missing_onnx_and_missing_model_card(flavour, tmp_path):
    with pytest.raises(ArtifactError, match="expected an ONNX model"):
        engine.build_engine(tmp_path / "absent.onnx", tmp_path / "model.plan", _settings(flavour))
    bare = _export_onnx(tmp_path / "bare.onnx", half=False, card=False)

    with pytest.raises(ArtifactError, match=ONNX_METADATA_KEY):
        engine.build_engine(bare, tmp_path / "model.plan", _settings(flavour))


@pytest.mark.trt
def test_fixed_batch_onnx_refuses_other_profiles(flavour, onnx_fp32, tmp_path):
    proto = onnx.load(str(onnx_fp32))
    for value in (*proto.graph.input, *proto.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = 2
    fixed = tmp_path / "fixed.onnx"
    onnx.save(proto, str(fixed))

    with pytest.raises(ConfigError, match="fixed batch of 2"):
        engine.network_io(fixed, _settings(flavour))

    assert engine.network_io(fixed, engine.EngineSettings(2, 2, 2, flavour=flavour))["inputs"][0]["shape"][0] == 2


@pytest.mark.trt
def test_failed_build_says_which_profile_and_why(flavour, onnx_fp32, tmp_path):
    if flavour != "rtx":
        pytest.skip("relies on TensorRT-RTX having no tactic for this model within 1 MiB of workspace")

    with pytest.raises(ArtifactError, match=r"min/opt/max = 1/4/16 with 1 MiB.*TensorRT reported:\n  - ") as err:
        engine.build_engine(onnx_fp32, tmp_path / "model.plan", _settings(flavour, workspace_mb=1))

    assert "workspace" in str(err.value) and not (tmp_path / "model.plan").exists()


@pytest.mark.trt
def test_timing_cache_and_version_compatible_options(flavour, onnx_fp32, tmp_path, caplog):
    cache = tmp_path / "timing.cache"
    caplog.set_level(logging.DEBUG, logger=engine.__name__)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sidecar = engine.build_engine(onnx_fp32, tmp_path / "model.plan",
                                      _settings(flavour, timing_cache=str(cache), version_compatible=True))

    if flavour == "rtx":  # both unavailable / no-ops in TensorRT-RTX: skipped quietly, and the sidecar says so
        assert sidecar.build["timing_cache"] is None and not cache.exists()
        assert sidecar.build["version_compatible"] is False
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
        assert [str(w.message) for w in caught] == []
        assert any("timing cache" in r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG)
    else:
        assert sidecar.build["timing_cache"] == str(cache) and cache.stat().st_size > 0
        assert sidecar.build["version_compatible"] is True


@pytest.mark.trt
def test_read_sidecar_refuses_missing_sidecar(plan_copy):
    sidecar_path(plan_copy).unlink()

    with pytest.raises(ArtifactError, match="expected the plan's sidecar"):
        read_plan_sidecar(plan_copy)


@pytest.mark.trt
@pytest.mark.parametrize("same_size", [True, False])
def test_read_sidecar_refuses_tampered_plan(plan_copy, same_size):
    data = bytearray(plan_copy.read_bytes())
    if same_size:
        data[len(data) // 2] ^= 0xFF
    else:
        data += b"\0"
    plan_copy.write_bytes(bytes(data))

    with pytest.raises(ArtifactError, match="modified after it was built"):
        read_plan_sidecar(plan_copy)
