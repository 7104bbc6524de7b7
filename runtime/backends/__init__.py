"""ε backends: runners with one contract (``base.Runner``; device runners add ``base.DeviceRunner``), chosen by
``base.open_runner(path, device)`` and driven by the loops of ``runtime.sampling`` (``sampling.open.open_loop``)."""

from .base import DeviceRunner, Runner, open_runner

__all__ = ["DeviceRunner", "Runner", "open_runner"]
