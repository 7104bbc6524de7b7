"""The documented base install (`pip install .`: the runtime only, no torch, no onnx) in a real venv: every command
and option that needs an extra says which one, as one ``error:`` line with exit 2 — never a ModuleNotFoundError
traceback. One venv per test session (module fixture), pinned by requirements-ci.txt as constraints.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from reliability.harness import Outcome, assert_user_error

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def base_venv(tmp_path_factory) -> Path:
    venv = tmp_path_factory.mktemp("base_venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    # the CI pins as constraints (pip takes the cached versions); constraints may not carry extras
    pins = [re.sub(r"\[[^\]]*\]", "", line) for line in (ROOT / "requirements-ci.txt").read_text().splitlines()]
    constraints = venv.parent / "constraints.txt"
    constraints.write_text("\n".join(pins) + "\n")
    r = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                        "-c", str(constraints), str(ROOT)], capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    for module in ("torch", "onnx", "safetensors", "diffusers", "modelopt", "nncf", "polygraphy", "sklearn"):
        probe = subprocess.run([str(venv / "bin" / "python"), "-c", f"import {module}"], capture_output=True)
        assert probe.returncode != 0, f"the base install pulled in {module}"
    return venv / "bin"


def _run(bin_dir: Path, cmd: str, *args, cwd: Path | None = None) -> Outcome:
    p = subprocess.run([str(bin_dir / cmd), *map(str, args)], capture_output=True, text=True, timeout=300, cwd=cwd,
                       env={"PATH": f"{bin_dir}:/usr/bin:/bin", "DDPM_NO_PROGRESS": "1", "HOME": str(cwd or ROOT)})
    return Outcome(p.returncode, p.stdout, p.stderr)


def _onnx(tmp: Path) -> Path:
    """Any bytes do: the extra is missing before the file would be read."""
    p = tmp / "model.onnx"
    p.write_bytes(b"\x08\x07")
    return p


CASES = {
    "train": (lambda t: ["ddpm-train", "--steps", "1", "--out", t / "run"], ["ddpm-train", "'ddpm-deploy[train]'"]),
    "train-resume": (lambda t: ["ddpm-train", "--resume", "--out", t / "run"], ["'ddpm-deploy[train]'"]),
    "export-run-dir": (lambda t: ["ddpm-export", t], ["ddpm-export", "'ddpm-deploy[export]'"]),
    "export-run-dir-fp16": (lambda t: ["ddpm-export", t, "--fp16"], ["'ddpm-deploy[export,fp16]'"]),
    "export-from-diffusers": (lambda t: ["ddpm-export", "--from-diffusers", t], ["'ddpm-deploy[diffusers]'"]),
    "export-diffusers-out": (lambda t: ["ddpm-export", t, "--diffusers-out", t / "pipe"], ["'ddpm-deploy[diffusers]'"]),
    "export-onnx-engine": (lambda t: ["ddpm-export", "--onnx", _onnx(t), "--engine"], ["'ddpm-deploy[engine]'"]),
    "export-onnx-fp16": (lambda t: ["ddpm-export", "--onnx", _onnx(t), "--precision", "fp16"],
                         ["'ddpm-deploy[fp16]'"]),
    "export-onnx-int8": (lambda t: ["ddpm-export", "--onnx", _onnx(t), "--int8"], ["'ddpm-deploy[int8]'"]),
    "run-parity": (lambda t: ["ddpm-run", "parity", "--checkpoint", t], ["parity", "'ddpm-deploy[export]'"]),
    "run-bench": (lambda t: ["ddpm-run", "bench", "--out", t / "bench"], ["bench", "'ddpm-deploy[test]'"]),
    "run-fid-extractor": (lambda t: ["ddpm-run", "fid-extractor", "--out", t / "fid.onnx"],
                          ["fid-extractor", "'ddpm-deploy[quality]'"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_command_that_needs_an_extra_names_it(base_venv, tmp_path, case):
    make, names = CASES[case]
    cmd, *args = make(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    o = _run(base_venv, cmd, *args, cwd=tmp_path)
    assert_user_error(o, *names)
    assert "ModuleNotFoundError" not in o.stderr
    assert sorted(tmp_path.rglob("*")) == before, "a command that cannot run wrote something"


@pytest.mark.parametrize("args", [["ddpm-train", "--help"], ["ddpm-train", "--list-presets"], ["ddpm-export", "--help"],
                                  ["ddpm-run", "--help"]], ids=lambda a: " ".join(a))
def test_help_works_on_the_base_install(base_venv, tmp_path, args):
    o = _run(base_venv, *args, cwd=tmp_path)
    assert o.code == 0 and "Traceback" not in o.stderr, o.stderr
