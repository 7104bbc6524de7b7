"""The bad-input / fault corpus harness: run a CLI as a user would and check what a user sees.

Every case asserts the same contract (README "Reliability"): the expected exit status (2 for a user mistake or a
fault of the machine, 130 for SIGINT, 143 for SIGTERM), exactly one ``error:`` line on stderr that names the thing
at fault, no traceback, and nothing that existed before lost or changed (``snapshot`` before, ``assert_kept``
after). Two ways to run: ``invoke`` (in-process, click's CliRunner: fast) and ``run`` (a real subprocess of the
installed console script: signals, exit statuses as the shell sees them, fresh interpreters).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from click.testing import CliRunner

BIN = Path(sys.executable).parent
ERROR_LINE = re.compile(r"^(error|Error): ")  # ours ("error: …") and click's usage errors ("Error: …")


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str
    exception: BaseException | None = None

    @property
    def error_lines(self) -> list[str]:
        return [ln for ln in self.stderr.splitlines() if ERROR_LINE.match(ln)]


def _cli(command: str):
    if command == "ddpm-run":
        from ddpm_deploy.verify.cli import main
    elif command == "ddpm-export":
        from ddpm_deploy.export.cli import main
    elif command == "ddpm-train":
        from ddpm_deploy.trainer.cli import main
    else:
        raise ValueError(command)
    return main


def invoke(command: str, *args, env: dict | None = None) -> Outcome:
    """Run ``command args`` in this process (CliRunner: stdout and stderr apart, exceptions caught)."""
    env = {"DDPM_NO_PROGRESS": "1", **(env or {})}
    r = CliRunner().invoke(_cli(command), [str(a) for a in args], env=env, prog_name=command)
    exc = r.exception if not isinstance(r.exception, SystemExit) else None
    return Outcome(r.exit_code, r.stdout, r.stderr, exc)


def run(command: str, *args, env: dict | None = None, cwd: Path | None = None, timeout: float = 600,
        signal_after: tuple[str, int] | None = None) -> Outcome:
    """Run the installed console script in a subprocess. ``signal_after=(text, signum)``: send ``signum`` once
    ``text`` appears on stderr (progress lines are printed there) or stdout."""
    full_env = {**os.environ, "DDPM_NO_PROGRESS": "1", **(env or {})}
    cmd = [str(BIN / command), *map(str, args)]
    if signal_after is None:
        p = subprocess.run(cmd, capture_output=True, text=True, env=full_env, cwd=cwd, timeout=timeout)
        return Outcome(p.returncode, p.stdout, p.stderr)
    text, signum = signal_after
    log = Path(cwd or ".") / f".harness-{os.getpid()}-{time.monotonic_ns()}.log"
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=f, text=True, env=full_env, cwd=cwd)
        deadline = time.monotonic() + timeout
        while text not in log.read_text():
            if p.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        else:
            p.send_signal(signum)
        out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
    err = log.read_text()
    log.unlink()
    return Outcome(p.returncode, out, err)


def assert_user_error(o: Outcome, *names: str, code: int = 2) -> str:
    """Exit ``code``, exactly one error line that contains every one of ``names``, no traceback. Returns the line."""
    both = o.stdout + o.stderr
    assert o.exception is None, f"uncaught {type(o.exception).__name__}: {o.exception}\n{both}"
    assert "Traceback (most recent call last)" not in both, both
    assert o.code == code, f"exit {o.code}, expected {code}\n{both}"
    lines = o.error_lines
    assert len(lines) == 1, f"expected one error line, found {len(lines)}:\n{both}"
    for n in names:
        assert str(n) in lines[0], f"the error line does not name {n!r}: {lines[0]}"
    return lines[0]


def assert_ok(o: Outcome) -> None:
    both = o.stdout + o.stderr
    assert o.exception is None and o.code == 0, f"exit {o.code} {o.exception!r}\n{both}"
    assert "Traceback (most recent call last)" not in both, both


def snapshot(*roots: Path) -> dict[str, str]:
    """SHA-256 of every file under ``roots`` (what must survive a failed command unchanged)."""
    out = {}
    for root in roots:
        root = Path(root)
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for p in files:
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def assert_kept(before: dict[str, str], *roots: Path) -> None:
    """Every file of ``before`` is still there with the same bytes, and no temporary file was left behind."""
    after = snapshot(*roots)
    lost = [p for p in before if p not in after]
    changed = [p for p in before if p in after and after[p] != before[p]]
    assert not lost and not changed, f"lost {lost}, changed {changed}"
    assert not temp_files(*roots), f"temporary files left behind: {temp_files(*roots)}"


def temp_files(*roots: Path) -> list[str]:
    found = []
    for root in roots:
        root = Path(root)
        if root.is_dir():
            found += [str(p) for p in root.rglob("*")
                      if p.name.endswith(".tmp") or ".tmp." in p.name or p.name.startswith(".tmp")]  # .tmp_step_N/
    return found


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


SIGNALS = {"SIGINT": (signal.SIGINT, 130), "SIGTERM": (signal.SIGTERM, 143)}


# --- a full disk, injected -----------------------------------------------------------------------------------------

class _FullFile:
    """A file opened for writing on a full disk: every write fails with ENOSPC (no file name, as the OS says it)."""

    def __init__(self, f):
        self._f = f

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def writelines(self, lines):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()

    def __getattr__(self, name):
        return getattr(self._f, name)


@contextlib.contextmanager
def disk_full(root: Path, when=lambda p: True):
    """Every file opened for writing under ``root`` (a folder or one file; by open, Path.write_*, os.fdopen: all go
    through io.open) for which ``when(path)`` holds fails its writes with ENOSPC, as on a full disk. Creating files and
    folders still works, as it does there. In this process only (in-process ``invoke`` cases)."""
    import builtins

    root = Path(root).resolve()
    real = io.open

    def fake_open(file, mode="r", *args, **kwargs):
        f = real(file, mode, *args, **kwargs)
        try:
            p = Path(os.readlink(f"/proc/self/fd/{file}")) if isinstance(file, int) else Path(file).resolve()
        except (OSError, TypeError):
            return f
        return _FullFile(f) if any(c in mode for c in "wax+") and p.is_relative_to(root) and when(p) else f

    saved = (io.open, builtins.open)
    io.open = builtins.open = fake_open
    try:
        yield
    finally:
        io.open, builtins.open = saved
