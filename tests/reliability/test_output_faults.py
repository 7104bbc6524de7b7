"""One output policy for every command that writes (runtime/outputs.py): the corpus of what can be in the way.

For every file (or folder) that a writing command produces, the same thing is put there first in four shapes — a
file with bytes, an empty file, a folder holding a file, a dangling symbolic link — and the command must refuse
before any work: exit 2, one `error:` line naming the path and `--overwrite`, no traceback, every file that was
there keeping its bytes, nothing new left behind. A target whose folder is a file is refused the same way. With
`--overwrite` only the command's own files are replaced; a user's file beside them stays.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from reliability.harness import assert_kept, assert_ok, assert_user_error, invoke, snapshot, temp_files

# writer → (command and arguments, the targets it writes); {w} is the work folder, {run} a copy of a trained run
WRITERS = {
    "export-run": (["ddpm-export", "{run}"], ["{run}/export/model.onnx", "{run}/export/export_report.json"]),
    "export-run-out": (["ddpm-export", "{run}", "--out", "{w}/x"], ["{w}/x/model.onnx", "{w}/x/export_report.json"]),
    "export-fp16": (["ddpm-export", "--onnx", "{w}/m/model.onnx", "--fp16"],
                    ["{w}/m/model.fp16.onnx", "{w}/m/precision.json"]),
    "export-bf16": (["ddpm-export", "--onnx", "{w}/m/model.onnx", "--precision", "bf16"],
                    ["{w}/m/model.bf16.onnx", "{w}/m/precision.bf16.json"]),
    "export-int8": (["ddpm-export", "--onnx", "{w}/m/model.onnx", "--int8"],
                    ["{w}/m/model.int8.xml", "{w}/m/model.int8.bin", "{w}/m/precision.int8.json"]),
    "export-engine": (["ddpm-export", "--onnx", "{w}/m/model.onnx", "--engine"],
                      ["{w}/m/model.plan", "{w}/m/model.plan.json"]),
    "export-engine-out": (["ddpm-export", "--onnx", "{w}/m/model.onnx", "--engine", "--engine-out", "{w}/p/e.plan"],
                          ["{w}/p/e.plan", "{w}/p/e.plan.json"]),
    "adopt-plan": (["ddpm-export", "--onnx", "{w}/m/model.onnx", "--adopt-plan", "{w}/a/model.plan"],
                   ["{w}/a/model.plan.json"]),
    "diffusers-out": (["ddpm-export", "{run}", "--diffusers-out", "{w}/d"],
                      ["{w}/d/model_index.json", "{w}/d/unet/config.json",
                       "{w}/d/unet/diffusion_pytorch_model.safetensors", "{w}/d/scheduler/scheduler_config.json"]),
    "triton-repo": (["ddpm-export", "{w}/m/model.onnx", "--triton-repo", "{w}/repo"], ["{w}/repo/ddpm"]),
    "merge": (["ddpm-run", "merge", "{w}/merged", "{shards}/shard-0-of-2", "{shards}/shard-1-of-2"],
              ["{w}/merged/samples.npz", "{w}/merged/grid.png", "{w}/merged/run.json"]),
    "fid": (["ddpm-run", "fid", "{shards}/shard-0-of-2", "--ref", "{shards}/shard-1-of-2", "--out", "{w}/f"],
            ["{w}/f/fid.json"]),
    "fid-stats": (["ddpm-run", "fid-stats", "{shards}/shard-0-of-2", "--out", "{w}/s/stats.npz"],
                  ["{w}/s/stats.npz"]),
    "parity": (["ddpm-run", "parity", "--checkpoint", "{run}", "--onnx", "{w}/m/model.onnx", "--out", "{w}/par"],
               ["{w}/par/parity.json", "{w}/par/parity.md"]),
    "bench": (["ddpm-run", "bench", "--presets", "tiny", "--backends", "ort-cpu", "--batches", "1", "--out",
               "{w}/b"], ["{w}/b/results.json", "{w}/b/results.md", "{w}/b/images_per_s.png"]),
}
KINDS = ("file", "empty-file", "folder", "dangling-link")
CASES = [(writer, i, kind) for writer, (_, targets) in WRITERS.items() for i in range(len(targets)) for kind in KINDS]


@pytest.fixture(scope="module")
def shards(random_micro_onnx, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("output_faults_shards") / "samples"
    for i in range(2):
        assert_ok(invoke("ddpm-run", "sample", "--onnx", random_micro_onnx, "--out", root, "--num", 4, "--batch", 2,
                         "--steps", 3, "--shard", f"{i}/2", "--no-pngs"))
    return root


@pytest.fixture()
def work(micro_run, micro_onnx, tmp_path) -> dict[str, Path]:
    w = tmp_path / "w"
    (w / "m").mkdir(parents=True)
    shutil.copy(micro_onnx, w / "m" / "model.onnx")
    (w / "a").mkdir()
    (w / "a" / "model.plan").write_bytes(b"vtrt" + os.urandom(64))
    run = tmp_path / "run"
    shutil.copytree(micro_run, run, ignore=shutil.ignore_patterns("export"))
    return {"w": w, "run": run}


def _fmt(items, work, shards) -> list[str]:
    return [str(a).format(w=work["w"], run=work["run"], shards=shards) for a in items]


def _put(path: Path, kind: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "file":
        path.write_bytes(b"someone's bytes")
    elif kind == "empty-file":
        path.write_bytes(b"")
    elif kind == "folder":
        path.mkdir()
        (path / "keep.txt").write_text("mine")
    elif kind == "dangling-link":
        os.symlink(path.parent / "nowhere", path)
    else:
        raise ValueError(kind)


def _listing(*roots: Path) -> set[str]:
    out = set()
    for r in roots:
        if r.exists():
            out |= {str(p) for p in r.rglob("*")} | {str(r)}
    return out


@pytest.mark.parametrize("writer, target, kind", CASES, ids=[f"{w}-{i}-{k}" for w, i, k in CASES])
def test_a_target_in_the_way_is_refused_before_any_work(work, shards, writer, target, kind):
    args, targets = WRITERS[writer]
    args, targets = _fmt(args, work, shards), _fmt(targets, work, shards)
    t = Path(targets[target])
    _put(t, kind)
    roots = (work["w"], work["run"])
    before, names = snapshot(*roots), _listing(*roots)
    link = os.readlink(t) if kind == "dangling-link" else None

    o = invoke(args[0], *args[1:])

    line = assert_user_error(o, str(t))
    # a folder where a file goes may be refused earlier, by the option's own check ("is a directory"), with no
    # --overwrite to offer: replacing a folder by a file is never what --overwrite means
    assert "--overwrite" in line or (kind == "folder" and "director" in line), line
    assert_kept(before, *roots)
    assert _listing(*roots) == names, f"created {sorted(_listing(*roots) - names)}"
    if link is not None:
        assert os.readlink(t) == link


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_a_target_whose_folder_is_a_file_is_refused(work, shards, writer):
    args, targets = WRITERS[writer]
    args, targets = _fmt(args, work, shards), _fmt(targets, work, shards)
    blocker = Path(targets[0]).parent
    if blocker.exists():  # the folder that holds the command's input too (--onnx M writes beside M)
        pytest.skip(f"{blocker} holds the command's input")
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_bytes(b"a file where a folder should be")
    roots = (work["w"], work["run"])
    before, names = snapshot(*roots), _listing(*roots)

    o = invoke(args[0], *args[1:])

    assert_user_error(o, str(blocker))
    assert_kept(before, *roots)
    assert _listing(*roots) == names


CHEAP = ("adopt-plan", "merge", "export-engine", "triton-repo")


@pytest.mark.parametrize("writer", CHEAP)
def test_overwrite_replaces_only_the_commands_own_files(work, shards, writer):
    """--overwrite: the targets are replaced (each now differs from the bytes put there), a user's file beside
    them stays, no temporary file is left."""
    args, targets = WRITERS[writer]
    args, targets = _fmt(args, work, shards), _fmt(targets, work, shards)
    if writer == "adopt-plan":  # a real plan to adopt: built by us, its sidecar then replaced by adoption
        o = invoke("ddpm-export", "--onnx", work["w"] / "m" / "model.onnx", "--engine", "--engine-out",
                   work["w"] / "a" / "model.plan", "--overwrite")
        if o.code != 0:
            pytest.skip(f"no TensorRT flavour to build a plan with: {o.stderr.strip()[:200]}")
    for t in targets:
        if not Path(t).exists():
            _put(Path(t), "folder" if writer == "triton-repo" else "file")
    mine = Path(targets[0]).parent / "user-notes.txt"
    mine.write_text("mine")
    held = {t: (Path(t).read_bytes() if Path(t).is_file() else None) for t in targets}

    o = invoke(args[0], *args[1:], "--overwrite")

    if o.code != 0 and "needs the Python package" in o.stderr:
        pytest.skip(o.stderr.strip())
    assert_ok(o)
    assert mine.read_text() == "mine"
    for t, old in held.items():
        assert Path(t).exists() and (old is None or Path(t).is_dir() or Path(t).read_bytes() != old), t
    assert not temp_files(work["w"])


def test_merge_writes_all_three_files_or_none(shards, tmp_path):
    """Every one of the three files failing to be written leaves none of them (and the folder's other files)."""
    from reliability.harness import disk_full

    for name in ("samples.npz", "grid.png", "run.json"):
        out = tmp_path / name
        out.mkdir()
        (out / "mine.txt").write_text("x")
        with disk_full(out, when=lambda p, n=name: n in p.name):
            o = invoke("ddpm-run", "merge", out, shards / "shard-0-of-2", shards / "shard-1-of-2")
        assert_user_error(o, "No space left")
        assert sorted(p.name for p in out.iterdir()) == ["mine.txt"], name


def test_outputs_helper_contract(tmp_path):
    """The helper itself: claim creates nothing; a failure after staging leaves nothing and removes the folders it
    made; a folder target is swapped in whole and keeps nothing of the old one."""
    from ddpm_deploy.runtime.errors import ConfigError
    from ddpm_deploy.runtime.outputs import Outputs

    out = tmp_path / "a" / "b"
    w = Outputs("cmd", [out / "x.txt", out / "y.txt"]).claim()
    assert not (tmp_path / "a").exists()
    with pytest.raises(RuntimeError):
        with w:
            w.stage(out / "x.txt").write_text("x")
            raise RuntimeError("boom")
    assert not (tmp_path / "a").exists()
    with Outputs("cmd", [out / "x.txt", out / "y.txt"]) as w:
        w.stage(out / "x.txt").write_text("x")
        w.stage(out / "y.txt").write_text("y")
    assert (out / "x.txt").read_text() == "x" and (out / "y.txt").read_text() == "y"
    with pytest.raises(ConfigError, match="--overwrite"):
        Outputs("cmd", [out / "x.txt"]).claim()
    folder = tmp_path / "repo" / "ddpm"
    folder.mkdir(parents=True)
    (folder / "old.txt").write_text("old")
    with Outputs("cmd", [folder], overwrite=True, folders=[folder]) as w:
        (w.stage(folder) / "new.txt").write_text("new")
    assert sorted(p.name for p in folder.iterdir()) == ["new.txt"]
    assert not temp_files(tmp_path)
    np.testing.assert_equal(sorted(p.name for p in (tmp_path / "repo").iterdir()), ["ddpm"])
