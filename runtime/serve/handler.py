"""What the Triton model does with a batch of requests, without Triton: check each request, group the valid
ones by (seed, steps), sample each group in one call of the shared loop, and return one uint8 image per index.

Because the noise is keyed by (seed, sample index) (``runtime.rng``), an image does not depend on which other
requests Triton batched it with: grouping only changes how many images one ε call computes.
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
    """One Triton request: k seeds, k indices (k = the request's batch, usually 1) and an optional step count."""

    seed: np.ndarray
    index: np.ndarray
    steps: np.ndarray | None = None


class RequestError(DDPMError):
    """A request the model refuses (the server answers it with this message and keeps serving)."""


class ServedModel:
    """The ε runner, its card and one host/device loop per step count, behind ``infer(requests)``."""

    def __init__(self, artifact: str | os.PathLike, device: str = "cpu", device_id: int = 0, threads: int = 0,
                 max_batch: int = 16, default_steps: int | None = None):
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
        self.default_steps = int(default_steps) if default_steps else self.T
        self._samplers: dict[int, object] = {}
        self.check_steps(self.default_steps)

    def check_steps(self, steps: int) -> int:
        if not 2 <= int(steps) <= self.T:
            raise RequestError(f"steps must be between 2 and {self.T} (the model's T), found {int(steps)}")
        return int(steps)

    def _sampler(self, steps: int):
        if steps not in self._samplers:
            from ..backends.base import open_sampler
            from ..schedule import Schedule

            sched = Schedule(self.card.diffusion, steps=None if steps == self.T else steps)
            self._samplers[steps] = open_sampler(self.runner, sched, self.shape, max_batch=self.max_batch)
        return self._samplers[steps]

    def parse(self, req: Request) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(seeds, indices, steps) of one request as flat int arrays, or RequestError saying what is wrong."""
        seed = np.asarray(req.seed).reshape(-1)
        index = np.asarray(req.index).reshape(-1)
        if seed.dtype != np.uint64 or index.dtype != np.int64:
            raise RequestError(f"expected seed UINT64 and index INT64, found {seed.dtype} and {index.dtype}")
        if len(seed) != len(index) or len(index) == 0:
            raise RequestError(f"expected one seed per index, found {len(seed)} seeds and {len(index)} indices")
        if (index < 0).any() or (index > MAX_INDEX).any():
            bad = int(index[(index < 0) | (index > MAX_INDEX)][0])
            raise RequestError(f"index must be in [0, {MAX_INDEX}], found {bad}")
        if req.steps is None:
            steps = np.full(len(index), self.default_steps, dtype=np.int64)
        else:
            steps = np.asarray(req.steps).reshape(-1).astype(np.int64)
            if len(steps) == 1:
                steps = np.repeat(steps, len(index))
            if len(steps) != len(index):
                raise RequestError(f"expected one steps value (or one per index), found {len(steps)}")
            for s in np.unique(steps):
                self.check_steps(int(s))
        return seed.astype(np.uint64), index.astype(np.int64), steps

    def infer(self, requests: Sequence[Request]) -> list[np.ndarray | RequestError]:
        """One result per request: uint8 [k, H, W, C] (C-contiguous), or the RequestError that refused it."""
        results: list[np.ndarray | RequestError | None] = [None] * len(requests)
        parsed: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        for r, req in enumerate(requests):
            try:
                parsed[r] = self.parse(req)
            except (RequestError, ConfigError) as e:
                results[r] = e if isinstance(e, RequestError) else RequestError(str(e))
        # every (request, position) that wants (seed, steps): one sampling call per group, in chunks of max_batch
        groups: dict[tuple[int, int], list[tuple[int, int, int]]] = {}
        for r, (seed, index, steps) in parsed.items():
            for k in range(len(index)):
                groups.setdefault((int(seed[k]), int(steps[k])), []).append((r, k, int(index[k])))
        images = {r: np.empty((len(p[1]), *self.out_shape), dtype=np.uint8) for r, p in parsed.items()}
        failed: dict[int, RequestError] = {}
        for (seed, steps), members in groups.items():
            for lo in range(0, len(members), self.max_batch):
                chunk = members[lo:lo + self.max_batch]
                idx = np.array([m[2] for m in chunk], dtype=np.int64)
                try:
                    x, _ = self._sampler(steps).sample(seed, idx)
                except DDPMError as e:
                    for r, _, _ in chunk:
                        failed[r] = RequestError(str(e))
                    continue
                imgs = to_uint8(x, self.card.data.value_range)
                for (r, k, _), img in zip(chunk, imgs):
                    images[r][k] = img
        for r in parsed:
            results[r] = failed.get(r, images[r])
        return results  # type: ignore[return-value]

    @property
    def out_shape(self) -> tuple[int, int, int]:
        c, h, w = self.shape
        return (h, w, c)

    def close(self) -> None:
        for s in self._samplers.values():
            s.close()
        self._samplers.clear()
        self.runner.close()
