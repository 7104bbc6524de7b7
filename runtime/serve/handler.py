"""What the Triton model does with a batch of requests, without Triton: check each request, admit every image of
the valid ones into the slots of the runner's one loop (each with its own seed, scheduler and step count), step
until each is done, and return one uint8 image per index.

Because the noise is keyed by (seed, sample index, step) (``runtime.rng``) and every image carries its own plan
row, an image does not depend on which other requests Triton batched it with: images of different seeds,
schedulers and step counts share ε calls and still come out bit for bit as if sampled alone.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import ArtifactError, ConfigError, DDPMError
from ..imageio import to_uint8

log = logging.getLogger(__name__)

MAX_INDEX = 2**32 - 1  # sample indices are one 32-bit word of the Philox counter


@dataclass
class Request:
    """One Triton request: k seeds, k indices (k = the request's batch, usually 1), an optional step count and an
    optional scheduler (a name such as "ddim", or a JSON object: a diffusers scheduler config, or {"scheduler":
    NAME, "options": {...}})."""

    seed: np.ndarray
    index: np.ndarray
    steps: np.ndarray | None = None
    scheduler: np.ndarray | None = None  # UINT8 [k, SCHEDULER_BYTES]: zero-padded UTF-8


class RequestError(DDPMError):
    """A request the model refuses (the server answers it with this message and keeps serving)."""


class ServedModel:
    """The ε runner, its card and its one host/device loop, behind ``infer(requests)``."""

    def __init__(self, artifact: str | os.PathLike, device: str = "cpu", device_id: int = 0, threads: int = 0,
                 max_batch: int = 16, default_steps: int | None = None, default_scheduler: str | None = None):
        from ..backends.base import open_runner

        self.path = Path(artifact)
        if not self.path.is_file():
            raise ArtifactError(f"{self.path}: the model artifact is not in the repository")
        self.runner = open_runner(self.path, device, threads=threads, device_id=device_id)
        if self.runner.card is None:
            self.runner.close()
            raise ArtifactError(f"{self.path}: has no ddpm-deploy metadata (ddpm_deploy.config); export it with "
                                f"ddpm-export so the server knows the diffusion schedule")
        self.card = self.runner.card
        self.shape = (self.card.data.channels, self.card.data.image_size, self.card.data.image_size)
        self.max_batch = int(max_batch)
        self.T = int(self.card.diffusion.num_timesteps)
        self.default_steps = int(default_steps) if default_steps else None
        self.default_scheduler = default_scheduler or None
        self._loop = None
        self._plans: dict[tuple[str | None, int | None], object] = {}
        try:
            self.plan(None, self.default_steps)
        except RequestError as e:
            self.runner.close()
            raise ConfigError(f"the repository's default scheduler/steps: {e}") from None

    def check_steps(self, steps: int) -> int:
        """A request's step count as an int (its range is the scheduler's: DDPM 2 … T, the others 1 … T)."""
        return int(steps)

    def plan(self, scheduler: str | None, steps: int | None):
        """The StepPlan of a request's scheduler (None: the repository's default) and steps (cached)."""
        key = (scheduler, steps)
        if key not in self._plans:
            from ..sampling.config import plan_for

            source, options = parse_scheduler(scheduler if scheduler is not None else self.default_scheduler)
            try:
                self._plans[key] = plan_for(self.card.diffusion, source, steps, **options)
            except ConfigError as e:
                raise RequestError(str(e)) from None
        return self._plans[key]

    def loop(self):
        if self._loop is None:
            from ..sampling.open import open_loop

            self._loop = open_loop(self.runner, self.shape, max_batch=self.max_batch)
        return self._loop

    def parse(self, req: Request) -> tuple[np.ndarray, np.ndarray, list]:
        """(seeds, indices, plans) of one request (flat arrays, a plan per index), or RequestError saying what is
        wrong."""
        seed = np.asarray(req.seed).reshape(-1)
        index = np.asarray(req.index).reshape(-1)
        if seed.dtype != np.uint64 or index.dtype != np.int64:
            raise RequestError(f"expected seed UINT64 and index INT64, found {seed.dtype} and {index.dtype}")
        if len(seed) != len(index) or len(index) == 0:
            raise RequestError(f"expected one seed per index, found {len(seed)} seeds and {len(index)} indices")
        if (index < 0).any() or (index > MAX_INDEX).any():
            bad = int(index[(index < 0) | (index > MAX_INDEX)][0])
            raise RequestError(f"index must be in [0, {MAX_INDEX}], found {bad}")
        steps = self._per_index(req.steps, len(index), "steps")
        scheds = None
        if req.scheduler is not None:
            raw = np.asarray(req.scheduler)
            if raw.dtype != np.uint8:
                raise RequestError(f"expected scheduler UINT8 (zero-padded UTF-8), found {raw.dtype}")
            raw = raw.reshape(-1, raw.shape[-1]) if raw.ndim > 1 else raw.reshape(1, -1)
            scheds = self._per_index(np.array([bytes(r).rstrip(b"\0") for r in raw], dtype=object), len(index),
                                     "scheduler")
        plans = []
        for k in range(len(index)):
            st = self.default_steps if steps is None else self.check_steps(int(steps[k]))
            sc = None if scheds is None else scheds[k].decode("utf-8", errors="replace")
            plans.append(self.plan(sc or None, st))
        return seed.astype(np.uint64), index.astype(np.int64), plans

    @staticmethod
    def _per_index(value, n: int, name: str):
        if value is None:
            return None
        v = np.asarray(value).reshape(-1)
        if len(v) == 1:
            v = np.repeat(v, n)
        if len(v) != n:
            raise RequestError(f"expected one {name} value (or one per index), found {len(v)}")
        return v

    def infer(self, requests: Sequence[Request]) -> list[np.ndarray | RequestError]:
        """One result per request: uint8 [k, H, W, C] (C-contiguous), or the RequestError that refused it.
        Every image of the valid requests goes through the runner's one loop: admitted into a free slot with its
        own seed and plan, stepped with the others, taken when its plan is done."""
        results: list[np.ndarray | RequestError | None] = [None] * len(requests)
        parsed: dict[int, tuple[np.ndarray, np.ndarray, list]] = {}
        for r, req in enumerate(requests):
            try:
                parsed[r] = self.parse(req)
            except (RequestError, ConfigError) as e:
                results[r] = e if isinstance(e, RequestError) else RequestError(str(e))
        pending = [(r, k, int(seed[k]), int(index[k]), plans[k]) for r, (seed, index, plans) in parsed.items()
                   for k in range(len(index))]
        images = {r: np.empty((len(p[1]), *self.out_shape), dtype=np.uint8) for r, p in parsed.items()}
        failed: dict[int, RequestError] = {}
        loop = self.loop()
        where: dict[int, tuple[int, int]] = {}  # slot -> (request, position)
        pending.reverse()
        while pending or where:
            free = [s for s in range(loop.capacity) if s not in where]
            while pending and free:
                r, k, seed, idx, plan = pending.pop()
                if r in failed:
                    continue
                slot = free.pop(0)
                loop.admit([slot], plan, seed, [idx])
                where[slot] = (r, k)
            try:
                done = loop.step()
                for slot in done:
                    r, k = where.pop(slot)
                    images[r][k] = to_uint8(loop.take([slot]), self.card.data.value_range)[0]
            except DDPMError as e:  # a non-finite step: every image in flight fails with it
                for r, _ in where.values():
                    failed[r] = RequestError(str(e))
                loop.clear()
                where.clear()
        for r in parsed:
            results[r] = failed.get(r, images[r])
        return results  # type: ignore[return-value]

    @property
    def out_shape(self) -> tuple[int, int, int]:
        c, h, w = self.shape
        return (h, w, c)

    def close(self) -> None:
        if self._loop is not None:
            self._loop.close()
            self._loop = None
        self.runner.close()


def parse_scheduler(text: str | None) -> tuple[object, dict]:
    """(scheduler source for ``plan_for``, options) of a request's scheduler text: a name, a diffusers scheduler
    config as JSON, or {"scheduler": NAME, "options": {...}}; RequestError if malformed."""
    import json

    if not isinstance(text, str) or not text.lstrip().startswith("{"):
        return text, {}
    try:
        source = json.loads(text)
    except json.JSONDecodeError as e:
        raise RequestError(f"scheduler is not valid JSON ({e})") from None
    if isinstance(source, dict) and "_class_name" in source:
        return source, {}
    if not isinstance(source, dict) or set(source) - {"scheduler", "options"} or \
            not isinstance(source.get("options", {}), dict):
        raise RequestError('scheduler JSON must be a diffusers scheduler config (with _class_name) or '
                           '{"scheduler": NAME, "options": {...}}')
    return source.get("scheduler"), dict(source.get("options", {}))
