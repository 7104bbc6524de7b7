"""ε backends: runners with one contract (``base.Runner``; device runners add ``base.DeviceRunner``), chosen by
``base.open_runner(path, device)`` and driven by ``base.open_sampler``."""

from .base import DeviceRunner, Runner, Sampler, open_runner, open_sampler

__all__ = ["DeviceRunner", "Runner", "Sampler", "open_runner", "open_sampler"]
