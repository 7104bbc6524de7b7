"""One exception family for user mistakes. The CLIs print these without a traceback and exit non-zero."""

from __future__ import annotations

import contextvars


class DDPMError(Exception):
    """A user-facing error: the message says what was expected, what was found and what to do."""

    exit_code = 2


class ArtifactError(DDPMError):
    """A missing, corrupt or mismatched file (checkpoint, ONNX, plan, dataset)."""


class ConfigError(DDPMError):
    """An invalid option or configuration value."""


class DataError(DDPMError):
    """A dataset that cannot be read or does not match the model."""


class SamplingError(DDPMError):
    """NaN/Inf or another failure during sampling."""


class OutOfMemoryError(SamplingError):
    """The backend could not allocate memory for a batch (ONNX Runtime's "Failed to allocate memory", a
    ``bad_alloc``, NumPy's MemoryError). ``batch``: the batch that failed (None if unknown); ``suggested_batch``:
    the batch the message tells the user to try (half of it)."""

    def __init__(self, message: str, batch: int | None = None):
        super().__init__(message)
        self.batch = batch
        self.suggested_batch = max(1, int(batch) // 2) if batch else None


def out_of_memory(what: str, batch: int, detail: str) -> OutOfMemoryError:
    """The one message for a batch that did not fit: what ran out, the batch, the backend's words and the batch to
    try (``--batch N`` in a CLI, ``batch=N`` in the API)."""
    if batch > 1:
        todo = f"try a smaller batch: {option('batch', max(1, batch // 2))}"
    else:
        todo = "the model does not fit in memory even at batch 1: free memory or use a machine with more"
    return OutOfMemoryError(f"{what} ran out of memory on a batch of {batch} images ({detail}); {todo}", batch=batch)


class SamplerClosedError(DDPMError):
    """A ``Sampler`` used after ``close()`` (or after its ``with`` block)."""


class MissingDependencyError(DDPMError):
    """An optional package that the requested feature needs is not installed."""

    def __init__(self, package: str, feature: str, install: str | None = None, broken: str | None = None):
        self.package = package
        hint = install or f"pip install {package}"
        if broken:  # there, but its import fails: another Python's build, a half-installed or mixed package
            super().__init__(f"{feature} needs the Python package '{package}', which is installed but cannot be "
                             f"imported ({broken}); reinstall it for this Python: {hint}")
        else:
            super().__init__(f"{feature} needs the Python package '{package}', which is not installed. Install it "
                             f"with: {hint}")


def lazy_import(module: str, feature: str, install: str | None = None):
    """Import an optional module, or raise MissingDependencyError naming what to install."""
    import importlib.util

    try:
        return importlib.import_module(module)
    except ImportError as e:  # pragma: no cover - exercised by tests that hide modules
        top = module.split(".")[0]
        try:  # a regular package that is there, failing inside (not a namespace such as cuda or nvidia)
            spec = importlib.util.find_spec(top)
            absent = isinstance(e, ModuleNotFoundError) and e.name in (top, module)
            present = spec is not None and spec.origin not in (None, "namespace") and not absent
        except (ImportError, ValueError):
            present = False
        raise MissingDependencyError(top, feature, install, broken=f"{type(e).__name__}: {e}" if present else None) from e


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM during a job that keeps its finished work. Exit status 128 + the signal's number (130 for
    SIGINT, 143 for SIGTERM), as a shell reports a process killed by it; the message says what was kept."""

    def __init__(self, signum: int, message: str = ""):
        import signal

        self.signum = int(signum)
        self.exit_code = 128 + self.signum
        self.signame = signal.Signals(self.signum).name
        super().__init__(message or f"interrupted by {self.signame}")


# --- how a message names an option: the CLI's flags or the Python API's keyword arguments ------------------------

_CLI_STYLE = contextvars.ContextVar("ddpm_deploy_cli_style", default=False)


class cli_style:
    """While active (every ``ddpm-*`` command runs in it: ``clitools.clean_errors``), ``option``/``invalid`` name
    options as flags (``--batch 8``); outside it, as the Python API's keyword arguments (``batch=8``)."""

    def __enter__(self):
        self._token = _CLI_STYLE.set(True)
        return self

    def __exit__(self, *exc):
        _CLI_STYLE.reset(self._token)


def is_cli_style() -> bool:
    return _CLI_STYLE.get()


_NO_VALUE = object()


def option(name: str, value=_NO_VALUE) -> str:
    """An option as the user wrote it: ``--steps`` / ``--steps 0`` in a CLI, ``steps`` / ``steps=0`` in the API
    (``name`` is the API's keyword; the flag is the same name with dashes)."""
    if is_cli_style():
        flag = "--" + name.replace("_", "-")
        return flag if value is _NO_VALUE else f"{flag} {value}"
    return name if value is _NO_VALUE else f"{name}={value!r}"


def invalid(name: str, value, requirement: str) -> str:
    """'--steps must be …, found 0' (CLI) / 'steps must be …, found 0' (API): one message for both surfaces."""
    shown = value if is_cli_style() or not isinstance(value, str) else repr(value)
    return f"{option(name)} {requirement}, found {shown}"
