"""ddpm-deploy: DDPM from training to production inference.

The Python API (no torch): ``from ddpm_deploy import Sampler``; ``ddpm_deploy.__version__`` is the installed
version (package metadata; in a source tree that is not installed, pyproject.toml's version + "+source"). The layers are subpackages:
``ddpm_deploy.runtime`` (NumPy + ONNX Runtime), ``ddpm_deploy.trainer``, ``ddpm_deploy.export``,
``ddpm_deploy.verify``. Names are imported on first use, so ``import ddpm_deploy.trainer`` costs nothing more.
"""

from __future__ import annotations

__all__ = ["Sampler", "DDPMError"]

_LAZY = {"Sampler": ("ddpm_deploy.runtime.api", "Sampler"), "DDPMError": ("ddpm_deploy.runtime.errors", "DDPMError")}


def _version() -> str:
    """The installed distribution's version; else (a source checkout on sys.path, not installed) pyproject.toml's
    with a "+source" local label; else "0+unknown"."""
    from importlib import metadata

    try:
        return metadata.version("ddpm-deploy")
    except metadata.PackageNotFoundError:
        pass
    import re
    from pathlib import Path

    try:
        text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text(encoding="utf-8")
        found = re.search(r'^name\s*=\s*"ddpm-deploy"\s*\nversion\s*=\s*"([^"]+)"', text, re.M)
        if found:
            return f"{found.group(1)}+source"
    except OSError:
        pass
    return "0+unknown"


def __getattr__(name: str):
    if name == "__version__":
        value = globals()["__version__"] = _version()
        return value
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ddpm_deploy' has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), *__all__, "__version__"})
