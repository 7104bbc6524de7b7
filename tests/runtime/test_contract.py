"""runtime.contract: every JSON artifact round-trips through its dataclass and carries schema + version;
detect_precision; atomic files keep the user's umask; the runner registry."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest

from ddpm_deploy.runtime import contract
from ddpm_deploy.runtime.backends.base import RUNNERS, DeviceRunner, Runner, open_runner, runner_class
from ddpm_deploy.runtime.errors import ArtifactError, ConfigError
from ddpm_deploy.runtime.fileio import atomic_write_bytes

# one realistic instance of each artifact (values as the writers produce them)
EXAMPLES = {
    contract.PlanSidecar: dict(
        ddpm={"schema": "ddpm-deploy/model"}, trt={"flavour": "rtx", "module": "tensorrt_rtx_bindings",
                                                   "version": "1.7.1.116"},
        precision="fp16", profile={"min": 1, "opt": 8, "max": 64},
        inputs=[{"name": "x", "dtype": "float32", "shape": [-1, 3, 32, 32]}, {"name": "t", "dtype": "int32",
                                                                               "shape": [-1]}],
        outputs=[{"name": "eps", "dtype": "float32", "shape": [-1, 3, 32, 32]}],
        onnx={"path": "model.fp16.onnx", "sha256": "ab" * 32}, plan={"path": "model.plan", "sha256": "cd" * 32,
                                                                   "bytes": 123},
        build={"seconds": 2.5, "opt_level": 3}, gpu=None, model_sha256="ab" * 32),
    contract.RunInfo: dict(
        seed=0, num=4, batch=2, start_index=0, steps=10, num_timesteps=1000, backend="onnxruntime-cpu",
        runner="OrtRunner", loop="host", precision="fp32", model="m.onnx", diffusion={"schedule": "linear"},
        total_seconds=1.5, images_per_second=2.7, timings={"steps": 10}, host={"python": "3.11"},
        model_sha256="ef" * 32, shard={"index": 1, "count": 3, "num_total": 12}, status="interrupted",
        done=[[4, 5]]),
    contract.MergeInfo: dict(
        seed=0, num=12, first_index=0, steps=10, num_timesteps=1000, precision="fp32",
        diffusion={"schedule": "linear"}, shards=[{"dir": "shard-0-of-3", "start_index": 0, "num": 4}],
        sampling_seconds=3.5, model_sha256="ef" * 32),
    contract.ExportReport: dict(onnx="model.onnx", source={"run_dir": "runs/x", "step": 30}, export_seconds=1.0,
                                verify_fp32={"passed": True, "atol": 1e-4, "max_abs": 2e-6, "cases": []}),
    contract.PrecisionReport: dict(precision="fp16-mixed", onnx_fp32="model.onnx", onnx_mixed="model.fp16.onnx",
                                   passed=True, tolerance={"value": 0.01}, calibration={"samples": 34},
                                   conversion={"nodes": {"fp16": 3}}, error={"worst_rel_l2": 1e-3}),
    contract.ParityReport: dict(passed=False, failed=["L2 eps [x vs y]"], checkpoint="runs/x", reference="ddpm-deploy",
                                onnx="m.onnx", engine=None, device="cpu", steps=20, batch=2, seed=0,
                                diffusion={"schedule": "linear"}, tolerances={"L2_EPS_FP32_ATOL": 1e-4},
                                levels=[{"level": "L2 eps", "runner": "OrtRunner", "status": "fail"}], seconds=3.0,
                                environment={"gpu": "no GPU"}),
    contract.BenchResults: dict(machine={"cpu_flags": ["avx512f"]}, date="2026-11-27", command="ddpm-run bench",
                                statistic="median", warmup=2, repeat=5, results=[{"eps_ms": 1.0}]),
    contract.FidStatsHeader: dict(count=1797, feature_dim=2048, extractor={"name": "inception-v3", "weights_sha256":
                                                                         "7f" * 32, "preprocess": "tf1-bilinear"},
                                  source="digits", image_shape=[16, 16, 1], kid_features=1797),
    contract.FidReport: dict(fid=29.2, kid={"mean": 1.5e-4, "std": 2e-4, "subsets": 100, "subset_size": 200},
                             inception_score={"value": None, "reason": "no logits"},
                             samples={"path": "samples.npz", "count": 200, "image_shape": [16, 16, 1], "run": None},
                             reference={"spec": "digits", "count": 1797, "stats_file": None, "kid_features": 1797},
                             extractor={"weights_sha256": "7f" * 32, "sha256": "d1" * 32, "backend": "onnxruntime-cpu"},
                             small_sample=True, warnings=["small sample"], seconds=12.5,
                             paired={"identical_images": 3}, gate={"max_fid": 1.0, "max_kid": None, "passed": True},
                             model_sha256="ef" * 32),
}


def test_every_artifact_has_an_example():
    assert set(EXAMPLES) == set(contract.ARTIFACTS)


@pytest.mark.parametrize("cls", contract.ARTIFACTS, ids=lambda c: c.__name__)
def test_artifact_round_trips_with_schema_and_versions(cls, tmp_path):
    art = cls(**EXAMPLES[cls])

    path = art.save(tmp_path / "a.json")
    raw = json.loads(path.read_text())
    back = cls.load(path)

    assert back == art
    assert list(raw)[:2] == ["schema", "schema_version"]
    assert raw["schema"] == cls.SCHEMA and raw["schema_version"] == cls.SCHEMA_VERSION
    assert raw["versions"]["numpy"] == np.__version__ and "ddpm-deploy" in raw["versions"]
    assert "model_sha256" in raw


@pytest.mark.parametrize("cls", contract.ARTIFACTS, ids=lambda c: c.__name__)
def test_artifact_reader_refuses_other_schema_version_and_keys(cls):
    d = cls(**EXAMPLES[cls]).to_dict()
    with pytest.raises(ArtifactError, match="expected schema"):
        cls.from_dict({**d, "schema": "someone-else"})
    with pytest.raises(ArtifactError, match="schema_version"):
        cls.from_dict({**d, "schema_version": cls.SCHEMA_VERSION + 1})
    first_required = next(f for f in EXAMPLES[cls] if f not in ("model_sha256",))
    with pytest.raises(ArtifactError, match=f"missing keys \\['{first_required}'\\]"):
        cls.from_dict({k: v for k, v in d.items() if k != first_required})
    with pytest.raises(ArtifactError, match="unknown keys \\['surprise'\\]"):
        cls.from_dict({**d, "surprise": 1})


def test_artifact_load_errors_name_the_file(tmp_path):
    with pytest.raises(ArtifactError, match="found no such file"):
        contract.RunInfo.load(tmp_path / "run.json")
    (tmp_path / "run.json").write_text("{half")
    with pytest.raises(ArtifactError, match=r"run\.json: expected JSON"):
        contract.RunInfo.load(tmp_path / "run.json")


# --- precision ------------------------------------------------------------------------------------------------

def _tiny_model(dtype):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((1,), dtype), "w")
    cast = [helper.make_node("Cast", ["x"], ["xc"], to=TensorProto.FLOAT16 if dtype == np.float16 else TensorProto.FLOAT)]
    g = helper.make_graph(cast + [helper.make_node("Mul", ["xc", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT16 if dtype == np.float16
                                                         else TensorProto.FLOAT, [1])], [w])
    return onnx, helper.make_model(g)


def test_detect_precision_walks_the_graph_and_prefers_metadata(tmp_path):
    onnx, m16 = _tiny_model(np.float16)
    _, m32 = _tiny_model(np.float32)
    assert contract.detect_precision(m16) == "fp16" and contract.detect_precision(m32) == "fp32"
    path = tmp_path / "model.onnx"  # no ".fp16." in the name: the file name is never used
    onnx.save(m16, str(path))
    assert contract.detect_precision(path) == "fp16"
    m32.metadata_props.add(key=contract.PRECISION_METADATA_KEY, value="bf16")
    assert contract.detect_precision(m32) == "bf16"
    m32.metadata_props[0].value = "fp8"
    with pytest.raises(ArtifactError, match="expected one of"):
        contract.detect_precision(m32)


# --- files ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_atomic_files_get_the_umask_not_0600(tmp_path, mask):
    old = os.umask(mask)
    try:
        atomic_write_bytes(tmp_path / "f.bin", b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f.bin").stat().st_mode) == 0o666 & ~mask
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]  # no temp file left


# --- the runner registry ----------------------------------------------------------------------------------------

def test_open_runner_picks_by_suffix_and_device(micro_onnx):
    assert runner_class("m.onnx", "cpu").__name__ == "OrtRunner"
    assert runner_class("m.onnx", "cuda").__name__ == "OrtCudaRunner"
    assert runner_class("m.plan", "cuda").__name__ == "TrtRunner"
    for suffix, device in RUNNERS:  # every registered runner honours the contract
        cls = runner_class(f"model{suffix}", device)
        assert issubclass(cls, Runner) and cls.device == device
        assert issubclass(cls, DeviceRunner) == (device == "cuda")
    with pytest.raises(ConfigError, match="no runner for a .plan file on cpu"):
        runner_class("m.plan", "cpu")
    with pytest.raises(ConfigError, match="device must be one of"):
        runner_class("m.onnx", "tpu")
    with open_runner(micro_onnx, "cpu", threads=1, cuda_graph=False) as r:  # options a runner lacks are dropped
        assert r.describe() == {"runner": "OrtRunner", "name": "onnxruntime-cpu", "device": "cpu",
                                "precision": "fp32", "path": str(micro_onnx)}
        assert r.sample_shape == (1, 8, 8) and r.card is not None


def test_run_json_v2_reads_as_complete_and_v1_is_refused():
    d = contract.RunInfo(**EXAMPLES[contract.RunInfo]).to_dict()
    v2 = {k: v for k, v in d.items() if k not in ("status", "done")} | {"schema_version": 2}
    info = contract.RunInfo.from_dict(v2)
    assert info.complete and info.done is None and info.done_count() == info.num
    with pytest.raises(ArtifactError, match="schema_version"):
        contract.RunInfo.from_dict({**v2, "schema_version": 1})
    partial = contract.RunInfo.from_dict(d)
    assert not partial.complete and partial.done_count() == 2


def test_a_package_that_is_there_but_fails_to_import_is_not_called_missing(tmp_path, monkeypatch):
    """E.g. an onnxruntime built for another Python on PYTHONPATH: 'not installed' would send the user to install
    what is there; the message says it cannot be imported and why."""
    from ddpm_deploy.runtime.errors import MissingDependencyError, lazy_import

    pkg = tmp_path / "halfinstalled"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from . import _native  # the compiled part is missing\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    with pytest.raises(MissingDependencyError, match=r"'halfinstalled', which is installed but cannot be imported "
                                                     r"\(ImportError: .*_native.*\); reinstall it for this Python"):
        lazy_import("halfinstalled", "The X backend")
    with pytest.raises(MissingDependencyError, match="'nosuch_package_xyz', which is not installed"):
        lazy_import("nosuch_package_xyz", "The X backend")


def test_fsync_dir_syncs_a_folder_and_tolerates_what_cannot_be_synced(tmp_path, monkeypatch):
    import errno
    import os

    from ddpm_deploy.runtime import fileio

    fileio.fsync_dir(tmp_path)  # a real folder: synced
    fileio.fsync_dir(tmp_path / "gone")  # nothing to open: nothing to sync

    def no_dir_sync(fd):
        raise OSError(errno.EINVAL, "Invalid argument")  # as some network and FUSE file systems answer

    monkeypatch.setattr(fileio.os, "fsync", no_dir_sync)
    fileio.fsync_dir(tmp_path)

    def broken(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(fileio.os, "fsync", broken)
    with pytest.raises(OSError, match="Input/output error"):  # a real fault is not hidden
        fileio.fsync_dir(tmp_path)
    assert os.path.isdir(tmp_path)
