"""ddpm-deploy: DDPM from training to production inference.

The Python API (no torch): ``from ddpm_deploy import Sampler``. The layers are subpackages:
``ddpm_deploy.runtime`` (NumPy + ONNX Runtime), ``ddpm_deploy.trainer``, ``ddpm_deploy.export``,
``ddpm_deploy.verify``. Names are imported on first use, so ``import ddpm_deploy.trainer`` costs nothing more.
"""

from __future__ import annotations

__all__ = ["Sampler", "DDPMError"]

_LAZY = {"Sampler": ("ddpm_deploy.runtime.api", "Sampler"), "DDPMError": ("ddpm_deploy.runtime.errors", "DDPMError")}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ddpm_deploy' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *__all__])
