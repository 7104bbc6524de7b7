"""The Python API: ``from ddpm_deploy import Sampler`` — images from a model in three lines, no torch.

    with Sampler.from_onnx("model.onnx", threads=2, scheduler="dpmsolver++") as sampler:
        images = sampler(16, seed=0, steps=20)        # uint8 [16, H, W, C]

A ``Sampler`` owns one runner (ONNX Runtime CPU/CUDA, TensorRT) and drives it with the same loop as
``ddpm-run sample`` (``sampling.open_loop``), so image i of seed s is the one the CLI, the Triton server and
every shard produce. (Its loop implements ``sampling.base.Loop``.)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np

from .backends.base import Runner, open_runner
from .errors import ArtifactError, ConfigError
from .imageio import to_uint8
from .sampling.config import plan_for, scheduler_config
from .sampling.open import open_loop

__all__ = ["Sampler"]


class Sampler:
    """Sample uint8 images from a DDPM ε model; a context manager. Build it with ``from_onnx``, ``from_engine`` or
    ``from_run``; call it: ``sampler(num, seed=0, start_index=0, steps=None, batch=None, pil=False)``.

    ``scheduler``: "ddpm" (default), "ddim", "dpmsolver++", "sde-dpmsolver++", "unipc", a diffusers class name, a
    ``scheduler_config.json`` path or dict, or a config object (``sampling.config.make_scheduler``); options as
    keywords of the call (``sampler(8, scheduler="ddim", eta=0.5)``) or in ``scheduler_options``."""

    def __init__(self, runner: Runner, batch: int = 16, steps: int | None = None, cuda_graph: bool = True,
                 scheduler=None, scheduler_options: dict | None = None):
        if runner.card is None:
            runner.close()
            raise ArtifactError(f"{runner.path}: has no ddpm-deploy metadata (ddpm_deploy.config); export it with "
                                f"ddpm-export")
        if batch < 1:
            runner.close()
            raise ConfigError(f"batch must be >= 1, found {batch}")
        self.runner, self.batch, self.steps, self.cuda_graph = runner, int(batch), steps, cuda_graph
        self.card = runner.card
        c, s = self.card.data.channels, self.card.data.image_size
        self.sample_shape = (c, s, s)
        try:
            self.scheduler = scheduler_config(scheduler, self.card.diffusion, **(scheduler_options or {}))
        except BaseException:
            runner.close()
            raise
        self._loop = None

    # --- constructors ---------------------------------------------------------------------------------------

    @classmethod
    def from_onnx(cls, path: str | os.PathLike, device: str = "cpu", threads: int = 0, batch: int = 16,
                  steps: int | None = None, device_id: int = 0, scheduler=None, **scheduler_options) -> "Sampler":
        """An ONNX file from ddpm-export; ``device`` 'cpu' (ONNX Runtime CPU, ``threads`` intra-op threads, 0: all
        cores) or 'cuda' (ONNX Runtime CUDA + the GPU device loop)."""
        return cls(open_runner(path, device, threads=threads, device_id=device_id), batch=batch, steps=steps,
                   scheduler=scheduler, scheduler_options=scheduler_options)

    @classmethod
    def from_engine(cls, plan: str | os.PathLike, batch: int = 16, steps: int | None = None,
                    device_id: int = 0, scheduler=None, **scheduler_options) -> "Sampler":
        """A TensorRT / TensorRT-RTX plan with its model.plan.json sidecar (the GPU device loop)."""
        return cls(open_runner(plan, "cuda", device_id=device_id), batch=batch, steps=steps, scheduler=scheduler,
                   scheduler_options=scheduler_options)

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike, device: str = "cpu", threads: int = 0, batch: int = 16,
                 steps: int | None = None, scheduler=None, **scheduler_options) -> "Sampler":
        """A ddpm-train run dir exported with ddpm-export (RUN_DIR/export/model.onnx)."""
        path = Path(run_dir) / "export" / "model.onnx"
        if not path.is_file():
            raise ArtifactError(f"{run_dir}: expected {path}, found none; export the run with ddpm-export {run_dir}")
        return cls.from_onnx(path, device=device, threads=threads, batch=batch, steps=steps, scheduler=scheduler,
                             **scheduler_options)

    # --- sampling -------------------------------------------------------------------------------------------

    def _loop_for(self, batch: int):
        """The one loop of this sampler's runner (re-opened only for a larger batch)."""
        if self._loop is None or self._loop.capacity < batch:
            if self._loop is not None:
                self._loop.close()
            self._loop = open_loop(self.runner, self.sample_shape, max_batch=batch, cuda_graph=self.cuda_graph)
        return self._loop

    def plan(self, steps: int | None = None, scheduler=None, **options):
        """The StepPlan a call with these arguments samples along (``plan.describe()`` says what it is)."""
        steps = self.steps if steps is None else steps
        base = self.scheduler if scheduler is None else scheduler
        return plan_for(self.card.diffusion, base, steps, **options)

    def __call__(self, num: int, seed: int = 0, start_index: int = 0, steps: int | None = None,
                 batch: int | None = None, pil: bool = False,
                 callback: Callable[[int, int], None] | None = None, scheduler=None, **options):
        """Images ``start_index … start_index + num − 1`` of ``seed``: uint8 [num, H, W, C] (``pil=True``: a list
        of PIL images). ``steps``: ε calls per image (default: the sampler's, else all T for DDPM and 20 for the
        fast schedulers); ``scheduler`` and ``options`` (e.g. ``eta=0.5``, ``solver_order=3``): this call's
        scheduler, else the sampler's; ``batch``: images per model call (default: the sampler's).
        ``callback(done, total)`` after each batch."""
        steps = self.steps if steps is None else steps
        batch = min(self.batch if batch is None else int(batch), max(1, int(num)))
        if num < 1 or batch < 1:
            raise ConfigError(f"num and batch must be >= 1, found {num}, {batch}")
        if seed < 0 or start_index < 0:
            raise ConfigError(f"seed and start_index must be >= 0, found {seed}, {start_index}")
        plan = self.plan(steps, scheduler, **options)
        loop = self._loop_for(batch)
        c, h, w = self.sample_shape
        out = np.empty((num, h, w, c), dtype=np.uint8)
        for lo in range(0, num, batch):
            idx = np.arange(start_index + lo, start_index + min(lo + batch, num), dtype=np.int64)
            x, _ = loop.sample(plan, seed, idx)
            out[lo:lo + len(idx)] = to_uint8(x, self.card.data.value_range)
            if callback is not None:
                callback(lo + len(idx), num)
        if pil:
            from PIL import Image

            return [Image.fromarray(im[..., 0] if c == 1 else im) for im in out]
        return out

    def close(self) -> None:
        if self._loop is not None:
            self._loop.close()
            self._loop = None
        self.runner.close()

    def __enter__(self) -> "Sampler":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Sampler({self.runner.name}, {self.runner.path}, shape={self.sample_shape}, batch={self.batch})"
