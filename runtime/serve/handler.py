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
MAX_PLANS = 64  # plans a served model keeps (its cache and its loop's table); beyond, they are made again


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
    """A request the model refuses: the client's mistake (Triton answers it with INVALID_ARG: HTTP 400, gRPC
    INVALID_ARGUMENT, and counts it in nv_inference_request_failure); the server keeps serving."""


class SamplingFailed(DDPMError):
    """Sampling failed on the server for a valid request (a non-finite ε, a backend error): a server error (Triton's
    INTERNAL: HTTP 500), the images in flight fail and the server keeps serving."""


class ServedModel:
    """The ε runner, its card and its one host/device loop, behind ``infer(requests)``."""

    def __init__(self, artifact: str | os.PathLike, device: str = "cpu", device_id: int = 0, threads: int = 0,
                 max_batch: int = 16, default_steps: int | None = None, default_scheduler: str | None = None,
                 precision: str = "fp32"):
        self.path = Path(artifact)
        if not self.path.is_file():
            raise ArtifactError(f"{self.path}: the model artifact is not in the repository")
        self.runner = self._open(device, device_id, threads, precision)
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
        except DDPMError as e:
            self.runner.close()
            raise ConfigError(f"the repository's default scheduler/steps: {e}") from None

    def _open(self, device: str, device_id: int, threads: int, precision: str):
        """The runner for ``precision``: "fp32" (the file on its own backend: ONNX Runtime, or a plan on the GPU),
        an OpenVINO precision ("bf16", "int8", "int8-bf16": model.int8.xml beside the ONNX), precision bands
        ("bf16:0-99,int8-bf16:100-999") or "auto" — as the Python API opens them (``backends.banded.open_precision``)."""
        from ..backends.banded import open_precision

        backend = "openvino" if precision not in (None, "", "fp32", "auto") and ":" not in precision else None
        return open_precision(self.path, device, backend, precision or "fp32", threads=threads,
                              device_id=device_id)[0]

    def check_steps(self, steps: int) -> int:
        """A request's step count as an int (its range is the scheduler's: DDPM 2 … T, the others 1 … T)."""
        return int(steps)

    def plan(self, scheduler: str | None, steps: int | None):
        """The StepPlan of a request's scheduler (None: the repository's default) and steps (cached)."""
        key = (scheduler, steps)
        if key not in self._plans:
            from ..sampling.config import plan_for

            default_name = self.default_scheduler if self.default_scheduler and \
                not self.default_scheduler.lstrip().startswith("{") else None
            source, options = parse_scheduler(scheduler if scheduler is not None else self.default_scheduler,
                                              default_name)
            if len(self._plans) >= MAX_PLANS:
                self._plans.pop(next(iter(self._plans)))  # the oldest: the cache stays bounded under any load
            try:
                self._plans[key] = plan_for(self.card.diffusion, source, steps, allow_files=False, **options)
            except (DDPMError, TypeError, ValueError) as e:
                raise RequestError(str(e)) from None
        return self._plans[key]

    def loop(self):
        if self._loop is None:
            from ..sampling.open import open_loop

            self._loop = open_loop(self.runner, self.shape, max_batch=self.max_batch)
            self._loop.timings = None  # a server steps forever: no per-step record
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
            texts = []
            for row in raw:
                try:
                    texts.append(bytes(row).rstrip(b"\0").decode("utf-8"))
                except UnicodeDecodeError as e:
                    raise RequestError(f"scheduler is not UTF-8 text ({e.reason} at byte {e.start})") from None
            scheds = self._per_index(np.array(texts, dtype=object), len(index), "scheduler")
        plans = []
        for k in range(len(index)):
            st = self.default_steps if steps is None else self.check_steps(int(steps[k]))
            sc = None if scheds is None else scheds[k]
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

    def infer(self, requests: Sequence[Request]) -> list[np.ndarray | RequestError | SamplingFailed]:
        """One result per request: uint8 [k, H, W, C] (C-contiguous), the RequestError that refused it (the
        client's mistake) or SamplingFailed (the server's).
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
        failed: dict[int, SamplingFailed] = {}
        loop = self.loop()
        loop.clear()  # a batch owns every slot while it runs: nothing survives from an earlier call
        where: dict[int, tuple[int, int]] = {}  # slot -> (request, position)
        pending.reverse()
        while pending or where:
            try:
                free = [s for s in range(loop.capacity) if s not in where]
                while pending and free:
                    r, k, seed, idx, plan = pending.pop()
                    if r in failed:
                        continue
                    slot = free.pop(0)
                    where[slot] = (r, k)
                    loop.admit([slot], plan, seed, [idx])
                for slot in loop.step():
                    r, k = where.pop(slot)
                    images[r][k] = to_uint8(loop.take([slot]), self.card.data.value_range)[0]
            except Exception as e:  # noqa: BLE001 - a non-finite step, a backend error: the images in flight fail
                why = str(e) if isinstance(e, DDPMError) else f"{type(e).__name__}: {e}"
                log.warning("sampling failed for %d image(s) in flight: %s", len(where), why)
                for r, _ in where.values():
                    failed[r] = SamplingFailed(why)
                loop.clear()
                where.clear()
        if loop.plans_held() > MAX_PLANS:
            loop.forget_plans()  # every slot is free here: the loop's plan table starts anew
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


def parse_scheduler(text: str | None, default: str | None = None) -> tuple[object, dict]:
    """(scheduler source for ``plan_for``, options) of a request's scheduler text: a name, a diffusers scheduler
    config as JSON, or {"scheduler": NAME, "options": {...}} (no NAME: ``default``, the repository's scheduler name);
    RequestError if malformed."""
    import json

    if not isinstance(text, str) or not text.lstrip().startswith("{"):
        return text, {}
    try:
        source = json.loads(text)
    except json.JSONDecodeError as e:
        raise RequestError(f"scheduler is not valid JSON ({e})") from None
    if isinstance(source, dict) and "_class_name" in source:
        if not isinstance(source["_class_name"], str):
            raise RequestError(f"scheduler JSON: _class_name must be a string, found {source['_class_name']!r}")
        return source, {}
    if not isinstance(source, dict) or set(source) - {"scheduler", "options"} or \
            not isinstance(source.get("options", {}), dict) or not isinstance(source.get("scheduler", ""), str):
        raise RequestError('scheduler JSON must be a diffusers scheduler config (with _class_name) or '
                           '{"scheduler": NAME, "options": {...}}')
    return source.get("scheduler", default), dict(source.get("options", {}))
