"""Start and stop the real ``tritonserver`` on a model repository.

Where the binary comes from, in order: ``$DDPM_TRITONSERVER``; the ``nvidia-pytriton`` wheel
(``pytriton/tritonserver/bin/tritonserver`` with its Python backend and per-Python-version stubs); a
``tritonserver`` on PATH (NVIDIA's container: backends in /opt/tritonserver/backends).

What running the wheel's server needs (found on our machines):

- the Python-backend stub for *this* interpreter's version inside the python backend folder named by
  ``--backend-directory`` (we build that folder in a temporary directory, as PyTriton does);
- the interpreter's ``LIBDIR`` first on ``LD_LIBRARY_PATH``: the stub links ``libpython3.X``, and with a pyenv or
  conda interpreter the system's copy would mix two Python builds (``'_thread.RLock' object has no attribute
  '_recursion_count'`` at load); the wheel's ``nvidia_pytriton.libs`` after it;
- this environment's NumPy for the stub: the stub runs its interpreter with the environment ignored (``-E``: no
  ``PYTHONPATH``) and imports NumPy before ``model.py`` runs, from the *base* interpreter's site-packages (a
  virtualenv's are not on its path; a base without NumPy would fail). Its ``sys.path`` starts with ``''``, the
  working directory, so the server runs in a folder holding links to this environment's ``numpy`` (and
  ``numpy.libs``): the stub, model.py and our runtime then share one NumPy, the one ddpm-deploy was installed with;
- this environment's site-packages for the model (``DDPM_SERVE_SITE_PACKAGES``, added by ``model.py`` with
  ``site.addsitedir``, which also runs the ``.pth`` files of editable installs).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import site
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ..errors import ArtifactError, ConfigError, DDPMError, MissingDependencyError
from .repository import MODEL_NAME

log = logging.getLogger(__name__)

BINARY_ENV = "DDPM_TRITONSERVER"
SITE_ENV = "DDPM_SERVE_SITE_PACKAGES"
LOOPBACK = "127.0.0.1"
EXIT_TIMEOUT_S = 10  # on SIGTERM Triton waits this long for open connections and in-flight requests


class ServerError(DDPMError):
    """The server did not start, did not load the model, or did not stop."""


@dataclass(frozen=True)
class TritonInstall:
    binary: Path
    backends: Path | None      # a --backend-directory holding python/ (None: the binary's default)
    libs: Path | None          # bundled shared libraries (the wheel's nvidia_pytriton.libs)
    stub: Path | None          # the Python-backend stub to place in backends/python (the wheel's, per Python)


def find_triton() -> TritonInstall:
    """The ``tritonserver`` to run (see the module docstring), or MissingDependencyError saying how to get one."""
    given = os.environ.get(BINARY_ENV)
    if given:
        b = Path(given)
        if not (b.is_file() and os.access(b, os.X_OK)):
            raise ConfigError(f"{BINARY_ENV}={given}: expected an executable tritonserver, found none")
        return TritonInstall(b, None, None, None)
    try:
        import importlib.util

        spec = importlib.util.find_spec("pytriton")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        root = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
        binary = root / "bin" / "tritonserver"
        ver = f"{sys.version_info.major}.{sys.version_info.minor}"
        stub = root / "python_backend_stubs" / ver / "triton_python_backend_stub"
        if binary.is_file():
            if not stub.is_file():
                raise ConfigError(f"the nvidia-pytriton wheel has no Python-backend stub for Python {ver} "
                                  f"(looked for {stub}); use Python 3.8-3.13 or a tritonserver container")
            libs = root.parent.parent / "nvidia_pytriton.libs"
            return TritonInstall(binary, root / "backends", libs if libs.is_dir() else None, stub)
    on_path = shutil.which("tritonserver")
    if on_path:
        return TritonInstall(Path(on_path), None, None, None)
    raise MissingDependencyError("nvidia-pytriton", "Serving with Triton (the tritonserver binary)",
                                 "pip install --no-deps nvidia-pytriton==0.7.0 (or use NVIDIA's tritonserver "
                                 f"container, or set {BINARY_ENV})")


def free_port() -> int:
    """A TCP port free on the loopback interface now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def site_packages() -> list[str]:
    """This environment's site-packages (a virtualenv's first), for the model's stub interpreter."""
    dirs = list(site.getsitepackages())
    user = site.getusersitepackages() if site.ENABLE_USER_SITE else None
    return [d for d in [*dirs, user] if d and Path(d).is_dir()]


def server_env(install: TritonInstall) -> dict[str, str]:
    env = dict(os.environ)
    ld = [sysconfig.get_config_var("LIBDIR") or ""]
    if install.libs is not None:
        ld.append(str(install.libs))
    ld += [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in ld if p)
    env[SITE_ENV] = os.pathsep.join(site_packages())
    env.pop("PYTHONHOME", None)
    return env


def group_processes(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid``, from /proc."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # state, ppid, pgrp, ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(d.name))
    return out


class TritonServer:
    """``tritonserver`` on ``repo``, listening on 127.0.0.1 only; a context manager that always stops it.

    The server runs in its own process group (it and its Python-backend stubs), so ``stop`` ends every process
    it started: SIGTERM (Triton unloads the models and exits), then SIGKILL to the group after ``stop_timeout``.
    """

    def __init__(self, repo: str | os.PathLike, http_port: int | None = None, grpc_port: int | None = None,
                 metrics_port: int | None = None, log_file: str | os.PathLike | None = None,
                 exit_on_error: bool = True, extra_args: tuple[str, ...] = (), host: str = LOOPBACK,
                 exit_timeout: int = EXIT_TIMEOUT_S):
        self.repo = Path(repo)
        if not (self.repo / MODEL_NAME / "config.pbtxt").is_file():
            raise ArtifactError(f"{self.repo}: expected a Triton model repository with {MODEL_NAME}/config.pbtxt; "
                                f"write one with ddpm-export --triton-repo DIR")
        self.http_port = http_port or free_port()
        self.grpc_port = grpc_port or free_port()
        self.metrics_port = metrics_port or free_port()
        self.host = host
        self.exit_on_error, self.extra_args, self.exit_timeout = exit_on_error, tuple(extra_args), int(exit_timeout)
        self.install = find_triton()
        self._tmp = tempfile.TemporaryDirectory(prefix="ddpm-triton-")
        self.log_path = Path(log_file) if log_file else Path(self._tmp.name) / "tritonserver.log"
        self.proc: subprocess.Popen | None = None

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    def _backend_dir(self) -> Path | None:
        inst = self.install
        if inst.backends is None:
            return None
        bk = Path(self._tmp.name) / "backends"
        py = bk / "python"
        py.mkdir(parents=True)
        for f in (inst.backends / "python").iterdir():
            os.symlink(f, py / f.name)
        shutil.copy2(inst.stub, py / inst.stub.name)
        return bk

    def _workdir(self) -> Path:
        """The server's working directory: links to this environment's NumPy (see the module docstring)."""
        import numpy

        wd = Path(self._tmp.name) / "cwd"
        wd.mkdir(exist_ok=True)
        pkg = Path(numpy.__file__).parent
        for src in (pkg, pkg.with_name("numpy.libs")):
            if src.exists() and not (wd / src.name).exists():
                os.symlink(src, wd / src.name)
        return wd

    def command(self) -> list[str]:
        cmd = [str(self.install.binary), f"--model-repository={self.repo.resolve()}",
               f"--http-address={self.host}", f"--http-port={self.http_port}",
               f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
               f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
               "--allow-gpu-metrics=false", "--allow-cpu-metrics=false",
               "--model-control-mode=explicit", f"--load-model={MODEL_NAME}",
               f"--exit-on-error={'true' if self.exit_on_error else 'false'}", "--strict-readiness=true",
               f"--exit-timeout-secs={self.exit_timeout}", "--log-verbose=0"]
        bk = self._backend_dir()
        if bk is not None:
            cmd.append(f"--backend-directory={bk}")
        return cmd + list(self.extra_args)

    def start(self, timeout: float = 120.0) -> "TritonServer":
        cmd = self.command()
        log.info("starting %s", " ".join(cmd))
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=server_env(self.install), start_new_session=True, cwd=self._workdir())
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _get(self, path: str) -> int:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}{path}", timeout=2) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
        except (urllib.error.URLError, OSError):
            return 0

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"tritonserver exited with status {self.proc.returncode} before the model was "
                                  f"ready:\n{self.log_tail()}")
            if self._get(f"/v2/models/{MODEL_NAME}/ready") == 200:
                return
            time.sleep(0.2)
        raise ServerError(f"tritonserver did not make model {MODEL_NAME!r} ready within {timeout:.0f}s:\n"
                          f"{self.log_tail()}")

    def log_tail(self, lines: int = 25) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        errs = [ln for ln in text if ln.startswith(("E", "error")) or "rror" in ln]
        return "\n".join((errs or text)[-lines:])

    @property
    def pgid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def running(self) -> bool:
        """Whether any process of the server's group (the server, its stubs) is still alive (zombies aside)."""
        return self.proc is not None and bool(group_processes(self.proc.pid))

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGTERM and wait (Triton unloads its models), then SIGKILL the whole group. Returns the exit status."""
        if self.proc is None:
            return None
        timeout = self.exit_timeout + 20 if timeout is None else timeout
        rc = self.proc.poll()
        if rc is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
                rc = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("tritonserver ignored SIGTERM for %.0fs; killing its process group", timeout)
        deadline = time.monotonic() + 10
        while self.running() and time.monotonic() < deadline:  # stubs exit after the server; then force
            time.sleep(0.1)
        if self.running():
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        rc = self.proc.wait()
        self._log.close()
        self._tmp.cleanup()
        return rc

    def __enter__(self):
        return self.start() if self.proc is None else self

    def __exit__(self, *exc):
        self.stop()
