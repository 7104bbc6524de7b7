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

A server never outlives the process that started it: ``tritonserver`` gets SIGTERM from the kernel when its parent
dies (``prctl(PR_SET_PDEATHSIG)``, set between fork and exec), runs in its own process group with its stubs, and a
watchdog (``_watchdog.py``, its own session, reading a pipe only the parent holds) kills that group if it has not
exited within the exit timeout and removes its temporary folders and shared-memory regions.
"""

from __future__ import annotations

import errno
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
from ._watchdog import end_group, group_processes  # noqa: F401 - group_processes: for callers and tests
from .repository import MODEL_NAME, STREAM_NAME, read_parameters

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


RECORD_ENV = "DDPM_SERVE_STEP_RECORD"  # read by triton_model.py (the step-level model's record of its ε calls)
STOP_ENV = "DDPM_SERVE_STOP_FILE"      # read by triton_model.py: when this file exists, the step-level model stops
STOP_FILE = "stop"


def server_env(install: TritonInstall, step_record: str | None = None, stop_file: str | None = None) -> dict[str, str]:
    env = dict(os.environ)  # a DDPM_SERVE_STEP_RECORD of the caller's environment reaches the model as well
    env.pop(STOP_ENV, None)
    if step_record:
        env[RECORD_ENV] = step_record
    if stop_file:
        env[STOP_ENV] = stop_file
    ld = [sysconfig.get_config_var("LIBDIR") or ""]
    if install.libs is not None:
        ld.append(str(install.libs))
    ld += [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in ld if p)
    env[SITE_ENV] = os.pathsep.join(site_packages())
    env.pop("PYTHONHOME", None)
    return env


PORT_FLAGS = ("--http-port", "--grpc-port", "--metrics-port")


def check_ports(host: str, ports: dict[str, int]) -> None:
    """Refuse (ConfigError, before anything starts) ports out of range, the same port twice, or a port that some
    process already listens on at ``host``. 0 means a free port, chosen later."""
    seen: dict[int, str] = {}
    for flag, port in ports.items():
        if not isinstance(port, int) or not 0 <= port <= 65535:
            raise ConfigError(f"{flag} must be in [0, 65535] (0: a free port), found {port}")
        if port and port in seen:
            raise ConfigError(f"{seen[port]} and {flag} are both {port}: HTTP, gRPC and metrics need three ports")
        if port:
            seen[port] = flag
    for port, flag in seen.items():
        why = port_busy(host, port)
        if why:
            raise ConfigError(f"{flag} {port}: {host}:{port} {why}; stop that server or choose another port "
                              f"(0: a free one)")


def port_busy(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on now (in use, address not available), or None."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ConfigError(f"--host {host}: not an address of this machine ({e.strerror})") from None
    fam, _, _, _, addr = infos[0]
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: a port in TIME_WAIT is free
        try:
            s.bind(addr)
            s.listen(1)
        except OSError as e:
            return "is already in use" if e.errno == errno.EADDRINUSE else f"cannot be listened on ({e.strerror})"
    return None


def listening_inodes(port: int) -> set[int] | None:
    """Socket inodes listening on TCP ``port`` (any address), from /proc/net/tcp{,6}; None where unreadable."""
    found: set[int] = set()
    read_any = False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        read_any = True
        for ln in lines:
            f = ln.split()
            if len(f) > 9 and f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:
                found.add(int(f[9]))
    return found if read_any else None


def socket_inodes(pids) -> set[int]:
    out: set[int] = set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                out.add(int(link[8:-1]))
    return out


def _all_pids() -> list[int]:
    try:
        return [int(d) for d in os.listdir("/proc") if d.isdigit()]
    except OSError:
        return []


def _set_parent_death_signal(parent: int):
    """For preexec_fn: the child gets SIGTERM when its parent dies (and exits at once if it already has)."""

    def preexec():
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died between fork and prctl
            os._exit(1)

    return preexec


class TritonServer:
    """``tritonserver`` on ``repo``, listening on 127.0.0.1 only; a context manager that always stops it.

    The server runs in its own process group (it and its Python-backend stubs), so ``stop`` ends every process
    it started: SIGTERM (Triton unloads the models and exits), then SIGKILL to the group after ``stop_timeout``.
    """

    def __init__(self, repo: str | os.PathLike, http_port: int | None = None, grpc_port: int | None = None,
                 metrics_port: int | None = None, log_file: str | os.PathLike | None = None,
                 exit_on_error: bool = True, extra_args: tuple[str, ...] = (), host: str = LOOPBACK,
                 exit_timeout: int = EXIT_TIMEOUT_S, remove_on_exit: tuple[str | os.PathLike, ...] = (),
                 step_record: str | os.PathLike | None = None):
        """``remove_on_exit``: temporary folders of the caller (a repository written for this server) removed with
        the server's own, by ``stop`` or, if the caller dies, by the watchdog. ``step_record``: a file where the
        step-level model writes one JSON line per ε call (the timestep and request of every image in it)."""
        self.step_record = str(Path(step_record).resolve()) if step_record else None
        self.repo = Path(repo)
        if not (self.repo / MODEL_NAME / "config.pbtxt").is_file():
            raise ArtifactError(f"{self.repo}: expected a Triton model repository with {MODEL_NAME}/config.pbtxt; "
                                f"write one with ddpm-export --triton-repo DIR")
        self.host = host
        step = read_parameters(self.repo).get("batching") == "step" and \
            (self.repo / STREAM_NAME / "config.pbtxt").is_file()
        self.models = [MODEL_NAME, STREAM_NAME] if step else [MODEL_NAME]  # what the server loads and serves
        check_ports(host, {f: p or 0 for f, p in zip(PORT_FLAGS, (http_port, grpc_port, metrics_port))})
        self.http_port = http_port or free_port()
        self.grpc_port = grpc_port or free_port()
        self.metrics_port = metrics_port or free_port()
        self.remove_on_exit = [str(p) for p in remove_on_exit]
        self._watchdog: subprocess.Popen | None = None
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
               "--model-control-mode=explicit", *[f"--load-model={m}" for m in self.models],
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
        wd = self._workdir()
        self._start_watchdog()
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=server_env(self.install, self.step_record, str(Path(self._tmp.name) / STOP_FILE)), start_new_session=True, cwd=wd,
                                     preexec_fn=_set_parent_death_signal(os.getpid()))
        self._tell_watchdog(f"pgid {self.proc.pid}")
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_watchdog(self) -> None:
        """The watchdog (``_watchdog.py``) that ends the server and removes its folders if this process dies."""
        script = Path(__file__).with_name("_watchdog.py")
        self._watchdog = subprocess.Popen([sys.executable, "-I", str(script)], stdin=subprocess.PIPE,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True,
                                          start_new_session=True)
        self._tell_watchdog(f"grace {self.exit_timeout + 5}")
        for p in [self._tmp.name, *self.remove_on_exit]:
            self._tell_watchdog(f"path {p}")

    def _tell_watchdog(self, line: str) -> None:
        if self._watchdog is not None and self._watchdog.stdin is not None:
            try:
                self._watchdog.stdin.write(line + "\n")
                self._watchdog.stdin.flush()
            except (BrokenPipeError, OSError):
                log.warning("the server's watchdog is gone")

    def _release_watchdog(self) -> None:
        if self._watchdog is not None:
            self._tell_watchdog("done")
            try:
                self._watchdog.stdin.close()
            except OSError:
                pass
            try:
                self._watchdog.wait(10)
            except subprocess.TimeoutExpired:
                self._watchdog.kill()
                self._watchdog.wait()
            self._watchdog = None

    def _check_owns_ports(self, tries: int = 4, pause: float = 0.5) -> None:
        """The ports answer for *this* server, not for another process listening there (then ServerError). A
        mismatch is read again ``tries`` times ``pause`` s apart before it counts (the /proc tables and the server's
        processes are read at different moments), and the error names the processes that hold the port."""
        for attempt in range(tries):
            mine = socket_inodes(group_processes(self.proc.pid))
            foreign = None
            for flag, port in zip(PORT_FLAGS, (self.http_port, self.grpc_port, self.metrics_port)):
                listening = listening_inodes(port)
                if listening is None:  # no /proc/net: cannot tell
                    return
                if listening and not listening & mine:
                    foreign = (flag, port, listening)
                    break
            if foreign is None:
                return
            if attempt < tries - 1:
                time.sleep(pause)
        flag, port, listening = foreign
        holders = sorted(pid for pid in _all_pids() if socket_inodes([pid]) & listening)
        raise ServerError(f"{flag} {port}: another process listens on port {port} (tritonserver could not take it; "
                          f"held by pid {', '.join(map(str, holders)) or 'unknown'}, not by the server's "
                          f"{sorted(group_processes(self.proc.pid))}); stop that server or choose another port (0: a "
                          f"free one)")

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
            if all(self._get(f"/v2/models/{m}/ready") == 200 for m in self.models):
                self._check_owns_ports()
                return
            time.sleep(0.2)
        raise ServerError(f"tritonserver did not make models {self.models} ready within {timeout:.0f}s:\n"
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
            self._release_watchdog()
            self._cleanup_dirs()
            return None
        timeout = self.exit_timeout + 20 if timeout is None else timeout
        rc = self.proc.poll()
        if rc is None and STREAM_NAME in self.models:
            self._stop_stream(timeout)
        if rc is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
                rc = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("tritonserver ignored SIGTERM for %.0fs; killing its process group", timeout)
        end_group(self.proc.pid, 10)  # stubs exit after the server; then force, and remove what they left in /dev/shm
        rc = self.proc.wait()
        self._log.close()
        self._cleanup_dirs()
        self._release_watchdog()
        return rc

    def _stop_stream(self, timeout: float) -> None:
        """Tell the step-level model to stop (it watches ``stop_file``): it fails every request still queued or
        sampling with "the server is shutting down" and answers by creating ``stop_file.done``; then the server gets
        SIGTERM. (SIGTERM alone would not do it: Triton counts no decoupled request as in flight once ``execute``
        has returned, and an unload waits for every request to finish.)"""
        stop = Path(self._tmp.name) / STOP_FILE
        stop.touch()
        deadline = time.monotonic() + min(timeout, 10.0)
        while time.monotonic() < deadline and not stop.with_suffix(".done").exists() and self.proc.poll() is None:
            time.sleep(0.02)

    def _cleanup_dirs(self) -> None:
        self._tmp.cleanup()
        for p in self.remove_on_exit:
            shutil.rmtree(p, ignore_errors=True)

    def __enter__(self):
        return self.start() if self.proc is None else self

    def __exit__(self, *exc):
        self.stop()
