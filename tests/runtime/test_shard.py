"""Sharded jobs: the shard of a process (--shard, Slurm, torchrun), three shards as three processes at once merge
to one unsharded run bit for bit, and merge refuses overlapping or missing indices by name."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from ddpm_deploy.runtime.contract import MergeInfo, RunInfo
from ddpm_deploy.runtime.errors import ConfigError
from ddpm_deploy.runtime.shard import Shard, device_id_from, shard_from
from ddpm_deploy.verify.cli import main as run_cli

DDPM_RUN = str(Path(sys.executable).with_name("ddpm-run"))


def test_shard_comes_from_the_option_then_slurm_then_torchrun():
    assert shard_from("1/3", {"RANK": "0", "WORLD_SIZE": "2"}) == Shard(1, 3)
    assert shard_from(None, {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "4",
                             "SLURM_ARRAY_TASK_COUNT": "3", "RANK": "0", "WORLD_SIZE": "2"}) == Shard(1, 3)
    assert shard_from(None, {"RANK": "1", "WORLD_SIZE": "2"}) == Shard(1, 2)
    assert shard_from(None, {"RANK": "0", "WORLD_SIZE": "1"}) is None
    assert shard_from(None, {}) is None
    assert device_id_from(None, {"LOCAL_RANK": "3"}) == 3 and device_id_from(1, {"LOCAL_RANK": "3"}) == 1
    with pytest.raises(ConfigError, match="0 <= I < N"):
        shard_from("3/3")
    with pytest.raises(ConfigError, match="I/N"):
        shard_from("half")


def test_shards_cover_the_job_once():
    ranges = [Shard(i, 3).range(10, 100) for i in range(3)]
    assert ranges == [(100, 103), (103, 106), (106, 110)]
    with pytest.raises(ConfigError, match="no images"):
        Shard(0, 4).range(3)  # 3 images in 4 shards: shard 0 gets [0, 0)


def _sample_args(onnx, out):
    return ["sample", "--onnx", str(onnx), "--num", "10", "--batch", "3", "--steps", "8", "--seed", "7",
            "--threads", "1", "--no-pngs", "--out", str(out)]


@pytest.fixture(scope="module")
def three_shards(random_micro_onnx, tmp_path_factory):
    job = tmp_path_factory.mktemp("job")
    env = {**os.environ, "DDPM_NO_PROGRESS": "1"}
    procs = [subprocess.Popen([DDPM_RUN, *_sample_args(random_micro_onnx, job), "--shard", f"{i}/3"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(3)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    return job


def test_three_concurrent_shards_merge_to_the_unsharded_run_bit_for_bit(three_shards, random_micro_onnx, tmp_path):
    whole = tmp_path / "whole"
    assert CliRunner().invoke(run_cli, _sample_args(random_micro_onnx, whole)).exit_code == 0
    shards = sorted(three_shards.glob("shard-*-of-3"))

    r = CliRunner().invoke(run_cli, ["merge", str(tmp_path / "merged"), *map(str, reversed(shards))])

    assert r.exit_code == 0, r.output
    assert [s.name for s in shards] == ["shard-0-of-3", "shard-1-of-3", "shard-2-of-3"]
    assert [RunInfo.load(s / "run.json").shard for s in shards] == [
        {"index": i, "count": 3, "num_total": 10} for i in range(3)]
    merged, ref = np.load(tmp_path / "merged" / "samples.npz"), np.load(whole / "samples.npz")
    assert sorted(merged.files) == ["arr_0", "images", "indices"]
    np.testing.assert_array_equal(merged["images"], ref["images"])
    np.testing.assert_array_equal(merged["arr_0"], ref["images"])
    np.testing.assert_array_equal(merged["indices"], np.arange(10))
    info = MergeInfo.load(tmp_path / "merged" / "run.json")
    assert info.num == 10 and [s["shard"]["index"] for s in info.shards] == [2, 1, 0]
    assert (tmp_path / "merged" / "grid.png").is_file()


def test_merge_refuses_missing_and_overlapping_indices_by_name(three_shards, random_micro_onnx, tmp_path):
    s0, s1, s2 = (three_shards / f"shard-{i}-of-3" for i in range(3))
    extra, late = tmp_path / "extra", tmp_path / "late"  # unsharded runs of indices 2-4 and 7-8 of the same job
    for out, start, num in ((extra, 2, 3), (late, 7, 2)):
        assert CliRunner().invoke(run_cli, ["sample", "--onnx", str(random_micro_onnx), "--num", str(num),
                                            "--start-index", str(start), "--steps", "8", "--seed", "7", "--no-pngs",
                                            "--out", str(out)]).exit_code == 0

    missing = CliRunner().invoke(run_cli, ["merge", str(tmp_path / "m1"), str(s0), str(s2)])
    overlap = CliRunner().invoke(run_cli, ["merge", str(tmp_path / "m2"), str(s0), str(extra)])
    gap = CliRunner().invoke(run_cli, ["merge", str(tmp_path / "m3"), str(extra), str(late)])

    assert missing.exit_code == 2 and "missing shards 1/3 (shard 1/3 holds indices 3-5)" in missing.output
    assert overlap.exit_code == 2 and f"{s0} and {extra} both hold 2" in overlap.output
    assert gap.exit_code == 2 and "missing indices 5-6 between 2 and 8" in gap.output
    assert not (tmp_path / "m1" / "samples.npz").exists() and not (tmp_path / "m2" / "samples.npz").exists()


def test_merge_refuses_shards_of_another_seed(three_shards, random_micro_onnx, tmp_path):
    other = tmp_path / "other"
    args = _sample_args(random_micro_onnx, other)
    args[args.index("--seed") + 1] = "8"
    assert CliRunner().invoke(run_cli, args + ["--shard", "1/3"]).exit_code == 0

    r = CliRunner().invoke(run_cli, ["merge", str(tmp_path / "m"), str(three_shards / "shard-0-of-3"),
                                     str(other / "shard-1-of-3"), str(three_shards / "shard-2-of-3")])

    assert r.exit_code == 2 and "seed 8 differs" in r.output


def test_slurm_array_variables_pick_the_shard(random_micro_onnx, tmp_path):
    env = {"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "2"}

    r = CliRunner().invoke(run_cli, _sample_args(random_micro_onnx, tmp_path), env=env)

    assert r.exit_code == 0, r.output
    info = RunInfo.load(tmp_path / "shard-1-of-2" / "run.json")
    assert (info.start_index, info.num, info.shard) == (5, 5, {"index": 1, "count": 2, "num_total": 10})
