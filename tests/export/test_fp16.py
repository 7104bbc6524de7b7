"""fp16 calibration: calibration data, ModelOpt AutoCast conversion, fp32 islands with reasons, ε error per bucket.

Real ONNX Runtime sessions and the real ModelOpt AutoCast; the conversion tests skip when nvidia-modelopt is
not installed.
"""

import dataclasses
import importlib.util
import json
import sys
import time

import numpy as np
import onnx
import pytest

from ddpm_deploy.export.fp16 import (
    FP16_ONNX_NAME,
    MODELOPT_INSTALL,
    PRECISION_JSON_NAME,
    calibration_batch,
    calibration_images,
    calibration_timesteps,
    convert_to_fp16,
    export_fp16,
    timestep_buckets,
    timestep_embedding_nodes,
)
from ddpm_deploy.export.onnx_io import read_card
from ddpm_deploy.runtime.backends.ort import OrtRunner
from ddpm_deploy.runtime.config import DataSpec, ModelCard
from ddpm_deploy.runtime.contract import PRECISION_METADATA_KEY, detect_precision
from ddpm_deploy.runtime.errors import ArtifactError, ConfigError, MissingDependencyError
from ddpm_deploy.runtime.schedule import DiffusionConfig
from ddpm_deploy.runtime.tolerances import L2_EPS_FP16_REL_L2
from ddpm_deploy.trainer.data import load_dataset
from ddpm_deploy.verify.models import random_preset_onnx

# Found without importing (importing modelopt takes seconds): the packages AutoCast's import and run need.
_MISSING = [m for m in ("modelopt", "onnxslim", "lief", "polygraphy", "onnx_graphsurgeon")
            if importlib.util.find_spec(m) is None]
_MODELOPT = f"ModelOpt AutoCast needs {', '.join(_MISSING)}, not installed: {MODELOPT_INSTALL}" if _MISSING else None
needs_modelopt = pytest.mark.skipif(_MODELOPT is not None, reason=_MODELOPT or "")

T = 1000


def _card(channels=1, size=8, dataset="digits"):
    return ModelCard(DiffusionConfig(), DataSpec(channels, size), training={"dataset": dataset} if dataset else {})


def _digits(card):
    return load_dataset("digits", image_size=card.data.image_size, channels=card.data.channels).images


def _types(model):
    m = onnx.shape_inference.infer_shapes(model)
    g = m.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.value_info, *g.input, *g.output]}
    types.update({i.name: i.data_type for i in g.initializer})
    return m, types


def _assert_within_tolerance(err):
    ts = [t for b in err["buckets"] for t in b["timesteps"]]
    assert min(ts) == 0 and max(ts) == T - 1
    for b in err["buckets"]:
        assert b["passed"] and 0 < b["rel_l2"] <= L2_EPS_FP16_REL_L2, b  # > 0: fp16 really differs from fp32
    assert err["passed"] and err["failing_buckets"] == []


# --- calibration data (no ModelOpt needed) ----------------------------------------------------------------

def test_calibration_timesteps_include_both_ends():
    ts = calibration_timesteps(T, 16)
    assert ts[0] == 0 and ts[-1] == T - 1 and len(ts) == 16 and np.all(np.diff(ts) > 0)
    assert list(calibration_timesteps(T, 2)) == [0, T - 1]
    with pytest.raises(ConfigError, match="at least 2"):
        calibration_timesteps(T, 1)


def test_calibration_batch_covers_0_to_T_minus_1_and_pure_noise():
    card = _card()
    images = _digits(card)
    feeds = calibration_batch(card, images, n_timesteps=5, per_t=3, seed=0)
    x, t = feeds["x"], feeds["t"]
    assert set(feeds) == {"x", "t"} and x.dtype == np.float32 and t.dtype == np.int32
    assert x.shape == (5 * 3 + 3, 1, 8, 8) and t.shape == (18,)
    assert sorted(set(t.tolist())) == [0, 250, 500, 749, 999]
    # t = 0: x_0 ≈ a training image (√ᾱ_0 = 0.99995, noise scale 0.01)
    for xi in x[t == 0]:
        assert np.abs(images - xi).max(axis=(1, 2, 3)).min() < 0.05
    # the last per_t samples are pure N(0, I) noise at T−1, not forward-process samples of images
    assert np.all(t[-3:] == T - 1)
    assert abs(float(x[-3:].std()) - 1.0) < 0.2 and abs(float(x[-3:].mean())) < 0.2
    again = calibration_batch(card, images, n_timesteps=5, per_t=3, seed=0)
    assert np.array_equal(again["x"], x) and np.array_equal(again["t"], t)


def test_calibration_batch_refuses_mismatched_images():
    with pytest.raises(Exception, match=r"\[N,1,8,8\]"):
        calibration_batch(_card(), np.zeros((4, 3, 8, 8), np.float32))


def test_calibration_images_come_from_the_card_or_the_caller():
    assert calibration_images(_card()).shape[1:] == (1, 8, 8)
    assert calibration_images(_card(3, 16, dataset=None), "digits").shape[1:] == (3, 16, 16)
    with pytest.raises(ConfigError, match="names no training dataset; pass one"):
        calibration_images(_card(dataset=None))
    with pytest.raises(ConfigError, match=r"cifar10:/nonexistent/cifar.*Pass the dataset explicitly"):
        calibration_images(_card(3, 32, dataset="cifar10:/nonexistent/cifar"))


def test_timestep_buckets_cover_every_timestep_once():
    b = timestep_buckets(T, 10)
    assert b[0] == (0, 99) and b[-1] == (900, 999)
    assert all(hi + 1 == lo for (_, hi), (lo, _) in zip(b[:-1], b[1:]))
    with pytest.raises(ConfigError):
        timestep_buckets(T, 0)


def test_timestep_embedding_nodes_stop_at_the_time_mlp(micro_onnx):
    m = onnx.load(str(micro_onnx))
    names = set(timestep_embedding_nodes(m))
    ops = {n.name: n.op_type for n in m.graph.node}
    assert {ops[n] for n in names} >= {"Cast", "Sin", "Cos", "Concat"}
    assert not {ops[n] for n in names} & {"Gemm", "MatMul", "Conv"}
    # every one of them depends on t only: none is reachable from x
    x_dep = {"x"}
    for n in m.graph.node:
        if any(i in x_dep for i in n.input):
            x_dep.update(n.output)
    assert not any(o in x_dep for n in m.graph.node if n.name in names for o in n.output)


def test_missing_modelopt_names_the_package(micro_onnx, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "modelopt.onnx.autocast", None)  # import → ImportError
    feeds = {"x": np.zeros((1, 1, 8, 8), np.float32), "t": np.zeros(1, np.int32)}
    with pytest.raises(MissingDependencyError, match="nvidia-modelopt==0.47.0"):
        convert_to_fp16(micro_onnx, tmp_path / "m.onnx", feeds)


# --- conversion on the micro model ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def micro_fp16(micro_onnx, tmp_path_factory):
    if _MODELOPT:
        pytest.skip(_MODELOPT)
    out = tmp_path_factory.mktemp("micro_fp16")
    card = read_card(micro_onnx)
    t0 = time.perf_counter()
    path, report = export_fp16(micro_onnx, out, card, _digits(card))
    report.wall_s = time.perf_counter() - t0  # not a field: measured here
    return path, report


@needs_modelopt
def test_fp16_model_keeps_float32_io_and_metadata(micro_onnx, micro_fp16):
    path, _ = micro_fp16
    src, m = onnx.load(str(micro_onnx)), onnx.load(str(path))
    io = lambda model: [(v.name, v.type.tensor_type.elem_type, [d.dim_param or d.dim_value for d in  # noqa: E731
                                                                  v.type.tensor_type.shape.dim])
                        for v in [*model.graph.input, *model.graph.output]]
    assert io(m) == io(src)
    assert io(m)[0] == ("x", onnx.TensorProto.FLOAT, ["batch", 1, 8, 8])
    assert io(m)[1][1] == onnx.TensorProto.INT32 and io(m)[2][1] == onnx.TensorProto.FLOAT
    meta = lambda model: {p.key: p.value for p in model.metadata_props}  # noqa: E731
    assert meta(src)[PRECISION_METADATA_KEY] == "fp32" and meta(m)[PRECISION_METADATA_KEY] == "fp16"
    assert {k: v for k, v in meta(m).items() if k != PRECISION_METADATA_KEY} == \
        {k: v for k, v in meta(src).items() if k != PRECISION_METADATA_KEY}
    assert detect_precision(path) == "fp16" and detect_precision(micro_onnx) == "fp32"
    assert read_card(path) == read_card(micro_onnx)
    runner = OrtRunner(path)  # our I/O contract check, in ONNX Runtime CPU
    for b in (1, 3):
        eps = runner.eps(np.zeros((b, 1, 8, 8), np.float32), np.full(b, 999, np.int32))
        assert eps.dtype == np.float32 and eps.shape == (b, 1, 8, 8) and np.isfinite(eps).all()


@needs_modelopt
def test_fp16_model_really_holds_float16_weights(micro_onnx, micro_fp16):
    path, report = micro_fp16
    m = onnx.load(str(path))
    inits = {i.name: i for i in m.graph.initializer}
    conv_w = [inits[n.input[1]] for n in m.graph.node if n.op_type == "Conv" and n.input[1] in inits]
    n_conv = sum(n.op_type == "Conv" for n in onnx.load(str(micro_onnx)).graph.node)
    assert len(conv_w) == n_conv and all(w.data_type == onnx.TensorProto.FLOAT16 for w in conv_w)
    assert report.conversion["initializers"]["conv_weights"] == {"float16": n_conv, "float32": 0}
    assert path.stat().st_size < 0.7 * micro_onnx.stat().st_size
    nodes = report.conversion["nodes"]
    assert nodes["fp16"] > 4 * nodes["fp32"]
    assert nodes["fp16"] + nodes["fp32"] + nodes["non_float"] + nodes["removed"] == nodes["total"]
    assert nodes["autocast_total"] == nodes["total"]


@needs_modelopt
def test_embedding_and_normalisation_stay_fp32_with_reasons(micro_onnx, micro_fp16):
    path, report = micro_fp16
    conv = report.conversion
    listed = {f["name"]: f for f in conv["fp32_nodes"]}
    src = onnx.load(str(micro_onnx))
    emb = timestep_embedding_nodes(src)
    norms = [n.name for n in src.graph.node if n.op_type == "InstanceNormalization"]
    assert emb and norms and conv["timestep_embedding_nodes"] == emb
    assert all(listed[n]["reason"] == "timestep-embedding" for n in emb)
    assert all(listed[n]["reason"] == "normalisation" for n in norms)
    assert all(f["reason"] and f["detail"] for f in conv["fp32_nodes"])
    # and in the model itself: their float inputs and outputs are float32
    m, types = _types(onnx.load(str(path)))
    for n in m.graph.node:
        if n.name in emb or n.name in norms:
            float_io = [types[v] for v in [*n.input, *n.output] if types.get(v) in (1, 10)]
            assert float_io and all(ty == onnx.TensorProto.FLOAT for ty in float_io), n.name


@needs_modelopt
def test_micro_error_per_bucket_within_tolerance(micro_fp16, tmp_path):
    path, report = micro_fp16
    _assert_within_tolerance(report.error)
    saved = json.loads((path.parent / PRECISION_JSON_NAME).read_text())
    assert saved["passed"] and saved["onnx_mixed"] == FP16_ONNX_NAME
    assert saved["tolerance"] == {"name": "L2_EPS_FP16_REL_L2", "metric": "rel_l2", "value": L2_EPS_FP16_REL_L2}
    assert 0 in saved["calibration"]["timesteps"] and T - 1 in saved["calibration"]["timesteps"]
    assert saved["conversion"]["fp32_nodes"] == report.conversion["fp32_nodes"]


@needs_modelopt
def test_precision_is_decided_from_calibration_data(micro_onnx, tmp_path):
    """Without the embedding rule, AutoCast's reference run alone keeps the t-scaled nodes fp32 (|t·f| ≈ 999)."""
    card = read_card(micro_onnx)
    feeds = calibration_batch(card, _digits(card), n_timesteps=4)
    rep = convert_to_fp16(micro_onnx, tmp_path / "a.onnx", feeds, keep_embedding_fp32=False)
    by_data = {f["name"]: f for f in rep["fp32_nodes"] if f["reason"] in ("activation-range", "overflow")}
    assert {"Sin", "Cos", "Cast"} <= {f["op_type"] for f in by_data.values()}
    assert all("999" in f["detail"] for f in by_data.values() if f["op_type"] in ("Sin", "Cos"))
    # calibration data that never reaches large t: nothing exceeds data_max, so the same nodes go fp16
    low = {"x": feeds["x"][:2], "t": np.zeros(2, np.int32)}
    rep_low = convert_to_fp16(micro_onnx, tmp_path / "b.onnx", low, keep_embedding_fp32=False)
    assert not [f for f in rep_low["fp32_nodes"] if f["reason"] in ("activation-range", "overflow")]


@needs_modelopt
def test_tolerance_violation_raises_naming_the_buckets(micro_onnx, tmp_path):
    card = read_card(micro_onnx)
    (tmp_path / FP16_ONNX_NAME).write_bytes(b"stale")
    with pytest.raises(ArtifactError, match=r"buckets \[0, 99\], \[100, 199\].*\[900, 999\]") as ei:
        export_fp16(micro_onnx, tmp_path, card, _digits(card), tol=1e-9, n_timesteps=4)
    assert "precision.json" in str(ei.value)
    saved = json.loads((tmp_path / PRECISION_JSON_NAME).read_text())
    assert not saved["passed"] and len(saved["error"]["failing_buckets"]) == 10
    assert saved["tolerance"]["value"] == 1e-9 and saved["onnx_mixed"] is None
    assert not (tmp_path / FP16_ONNX_NAME).exists()  # no fp16 model that the report rejects
    assert (tmp_path / "model.fp16.rejected.onnx").is_file()


# --- bf16 -------------------------------------------------------------------------------------------------------

def test_bf16_emulation_rounds_where_the_model_stores_bf16(tmp_path):
    """y = Conv_bf16(Cast_bf16(x), w_bf16) cast back to fp32: ONNX Runtime CPU has no bf16 Conv, the emulation runs
    it in fp32 between Casts, so the result is the fp32 conv of bf16-rounded x and w, rounded to bf16."""
    from onnx import TensorProto, helper

    from ddpm_deploy.export.fp16 import bf16_emulation

    def bf16(a):  # round-to-nearest-even to bfloat16, returned as float32
        u = np.asarray(a, np.float32).view(np.uint32).astype(np.uint64)
        return (((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16).astype(np.uint32).view(np.float32)

    g = np.random.default_rng(0)
    w = g.standard_normal((2, 1, 3, 3)).astype(np.float32)
    w16 = helper.make_tensor("w", TensorProto.BFLOAT16, w.shape, bf16(w).ravel().tolist())  # exact in bf16
    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["xb"], to=TensorProto.BFLOAT16),
         helper.make_node("Conv", ["xb", "w"], ["yb"], pads=[1, 1, 1, 1]),
         helper.make_node("Cast", ["yb"], ["y"], to=TensorProto.FLOAT)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 5, 5])], [w16])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = g.standard_normal((1, 1, 5, 5)).astype(np.float32)
    import onnxruntime as ort

    with pytest.raises(Exception):  # the reason the emulation exists
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    emulated = bf16_emulation(model)
    got = ort.InferenceSession(emulated.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    xb, wb = bf16(x)[0, 0], bf16(w)
    want = np.zeros((2, 5, 5), np.float32)
    pad = np.pad(xb, 1)
    for o in range(2):
        for i in range(5):
            for j in range(5):
                want[o, i, j] = np.sum(pad[i:i + 3, j:j + 3] * wb[o, 0], dtype=np.float32)
    np.testing.assert_array_equal(got[0], bf16(want))


@needs_modelopt
def test_bf16_export_reports_per_bucket_with_the_fp16_tolerance(micro_onnx, tmp_path):
    """bf16 AutoCast with the same error report and tolerance as fp16. Whether this briefly trained micro model
    passes is the measurement (it did not on our machine: bf16's 8-bit mantissa costs ~20x fp16's error at small
    t); either way the outcome, the files and the message must agree."""
    card = read_card(micro_onnx)
    try:
        path, report = export_fp16(micro_onnx, tmp_path, card, _digits(card), n_timesteps=4, precision="bf16")
        passed, message = True, ""
    except ArtifactError as e:
        passed, message, path = False, str(e), None
    saved = json.loads((tmp_path / "precision.bf16.json").read_text())

    assert saved["precision"] == "bf16-mixed" and saved["passed"] is passed
    assert saved["tolerance"]["value"] == L2_EPS_FP16_REL_L2 and len(saved["error"]["buckets"]) == 10
    assert "bf16 emulated" in saved["error"]["backend"] and saved["conversion"]["nodes"]["bf16"] > 0
    assert saved["conversion"]["initializers"]["conv_weights"]["bfloat16"] > 0
    written = tmp_path / ("model.bf16.onnx" if passed else "model.bf16.rejected.onnx")
    assert written.is_file() and detect_precision(written) == "bf16"
    if passed:
        assert path == written and saved["onnx_mixed"] == "model.bf16.onnx"
    else:
        assert not (tmp_path / "model.bf16.onnx").exists() and saved["onnx_mixed"] is None
        assert all(b in message for b in saved["error"]["failing_buckets"]) and "use fp16" in message
    assert not (tmp_path / PRECISION_JSON_NAME).exists()  # the fp16 report is not touched


@needs_modelopt
def test_convert_refuses_feeds_that_do_not_match_the_inputs(micro_onnx, tmp_path):
    with pytest.raises(ConfigError, match="calibration feeds"):
        convert_to_fp16(micro_onnx, tmp_path / "m.onnx", {"x": np.zeros((1, 1, 8, 8), np.float32)})


@needs_modelopt
def test_fp16_export_needs_a_model_card(micro_onnx, tmp_path):
    m = onnx.load(str(micro_onnx))
    del m.metadata_props[:]
    onnx.save(m, str(tmp_path / "nocard.onnx"))
    with pytest.raises(ArtifactError, match="no DDPM config"):
        export_fp16(tmp_path / "nocard.onnx", tmp_path / "out")


# --- the presets ------------------------------------------------------------------------------------------

def _preset_onnx(preset, tmp_path, train_steps=0):
    """The preset's UNet in ONNX: briefly trained on digits (train_steps > 0) or seeded random weights."""
    from ddpm_deploy.trainer.presets import PRESETS

    cfg = PRESETS[preset].unet
    if train_steps:
        from ddpm_deploy.export.cli import export_onnx_from_run
        from helpers import train_run

        train_run(tmp_path / "run", steps=train_steps, unet=dataclasses.asdict(cfg), image_size=cfg.image_size,
                  batch_size=16, save_every=train_steps)
        path, _ = export_onnx_from_run(tmp_path / "run", tmp_path)
        return path
    return random_preset_onnx(preset, tmp_path / "model.onnx", dataset=PRESETS[preset].dataset)[0]


@needs_modelopt
def test_tiny_preset_fp16_within_tolerance(tmp_path):
    onnx_path = _preset_onnx("tiny", tmp_path, train_steps=20)
    card = read_card(onnx_path)
    t0 = time.perf_counter()
    path, report = export_fp16(onnx_path, tmp_path / "fp16", card)  # images: the card's dataset (digits)
    print(f"tiny fp16: {time.perf_counter() - t0:.1f}s, nodes {report.conversion['nodes']}, "
          f"worst rel L2 {report.error['worst_rel_l2']:.2e}")
    _assert_within_tolerance(report.error)
    assert report.conversion["fp32_reasons"].get("timestep-embedding", 0) >= 5
    assert OrtRunner(path).card == card


@pytest.mark.slow
@needs_modelopt
def test_cifar10_preset_fp16_within_tolerance(tmp_path):
    onnx_path = _preset_onnx("ddpm-cifar10", tmp_path)
    card = read_card(onnx_path)
    images = load_dataset("digits", image_size=32, channels=3).images  # CIFAR-10 itself is not downloaded in CI
    t0 = time.perf_counter()
    path, report = export_fp16(onnx_path, tmp_path / "fp16", card, images)
    print(f"ddpm-cifar10 fp16: {time.perf_counter() - t0:.1f}s, nodes {report.conversion['nodes']}, "
          f"worst rel L2 {report.error['worst_rel_l2']:.2e}")
    _assert_within_tolerance(report.error)
    assert report.conversion["initializers"]["conv_weights"]["float32"] == 0
    assert path.stat().st_size < 0.6 * onnx_path.stat().st_size
