"""``open_loop``: the loop for a runner (the device loop for device runners, the host loop otherwise)."""

from __future__ import annotations

from typing import Sequence

from ..backends.base import DeviceRunner, Runner
from .base import Loop


def open_loop(runner: Runner, shape: Sequence[int], max_batch: int, cuda_graph: bool = True) -> Loop:
    """A loop of capacity ``max_batch`` for ``runner`` and samples of ``shape`` (C, H, W)."""
    runner.check_shape(shape)
    if isinstance(runner, DeviceRunner):
        from ..device.loop import DeviceLoop

        return DeviceLoop.for_runner(runner, shape, max_batch=max_batch, cuda_graph=cuda_graph)
    from .host import HostLoop

    runner.check_batch(max_batch)
    return HostLoop(runner, shape, max_batch)
