"""One exception family for user mistakes. The CLIs print these without a traceback and exit non-zero."""

from __future__ import annotations


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
