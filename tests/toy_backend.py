"""A backend written the way docs/architecture.md says a new one is: one module, one line in RUNNERS.

ε = a·x + b·t/T from an ``.npz`` holding ``a`` and ``b`` (float32 scalars): a model anyone can compute by hand,
so the test can check ``ddpm-run sample`` against the host loop on the same ε."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ddpm_deploy.runtime.backends.base import Runner
from ddpm_deploy.runtime.errors import ArtifactError


class LinearNpzRunner(Runner):
    device = "cpu"

    def __init__(self, path: str | os.PathLike, threads: int = 0):
        self.path = Path(path)
        try:
            with np.load(self.path) as z:
                self.a, self.b = np.float32(z["a"]), np.float32(z["b"])
                self.sample_shape = tuple(int(v) for v in z["shape"])
        except (OSError, KeyError, ValueError) as e:
            raise ArtifactError(f"{self.path}: expected an .npz with a, b and shape ({e})") from None
        self.precision, self.card = "fp32", None

    @property
    def name(self) -> str:
        return "toy-linear-npz"

    def eps(self, x: np.ndarray, t: np.ndarray) -> np.ndarray:
        return (self.a * x + self.b * (t.astype(np.float32) / 1000.0)[:, None, None, None]).astype(np.float32)
