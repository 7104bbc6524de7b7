"""Precision per timestep: one model at several precisions, each image's ε taken from the runner of its timestep's band.

``BandedRunner({"bf16": r1, "int8": r2}, [(0, 99, "bf16"), (100, 599, "int8"), (600, 999, "bf16")])``: every
timestep belongs to exactly one band. A batch whose images sit in several bands (Triton mixes requests) is split by
band and each part goes to its runner, so an image's ε depends only on its own (x, t) and band, never on its
batch-mates. The bands come from a fidelity measurement (the precision's ε error per timestep bucket in its
precision.*.json, then FID/KID of the samples: ``scripts/cpu_precision_quality.sh``).
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from ..errors import ArtifactError, ConfigError, invalid
from .base import PRECISIONS, Runner, auto_precision, open_runner, resolve_model


def parse_bands(text: str, num_timesteps: int) -> list[tuple[int, int, str]]:
    """``"bf16:0-99,int8-bf16:100-599,bf16:600-999"`` → [(0, 99, "bf16"), …]; the bands must cover 0…T−1 once
    (bands past T−1 are cut at T−1 or dropped)."""
    bands = []
    for part in text.split(","):
        key, _, rng = part.strip().rpartition(":")
        lo, _, hi = rng.partition("-")
        if not key or not lo.isdigit() or not hi.isdigit() or int(lo) > int(hi):
            raise ConfigError(f"precision bands: expected PRECISION:FIRST-LAST[,…] (e.g. bf16:0-99,int8:100-999), "
                              f"found {part.strip()!r}")
        bands.append((int(lo), int(hi), key))
    bands.sort()
    # timesteps are the model's 0…T−1: a band past T−1 is cut there (a model of smaller T uses fewer bands)
    bands = [(lo, min(hi, num_timesteps - 1), key) for lo, hi, key in bands if lo <= num_timesteps - 1]
    covered = 0
    for lo, hi, _ in bands:
        if lo != covered:
            raise ConfigError(f"precision bands must cover every timestep 0…{num_timesteps - 1} once: "
                              f"{'a gap' if lo > covered else 'an overlap'} at t = {min(lo, covered)}")
        covered = hi + 1
    if covered != num_timesteps:
        raise ConfigError(f"precision bands must cover every timestep 0…{num_timesteps - 1}, they end at {covered - 1}")
    return bands


class BandedRunner(Runner):
    """ε from ``runners[key]`` for the images whose timestep lies in a band of ``key`` (see the module docstring)."""

    def __init__(self, runners: dict[str, Runner], bands: Sequence[tuple[int, int, str]]):
        first = next(iter(runners.values()))
        self.runners, self.bands = dict(runners), list(bands)
        missing = {k for _, _, k in self.bands} - set(self.runners)
        if missing:
            raise ConfigError(f"precision bands name {sorted(missing)}, which have no runner")
        self.device, self.path, self.card = first.device, first.path, first.card
        self.sample_shape, self.fixed_batch = first.sample_shape, first.fixed_batch
        top = max(hi for _, hi, _ in self.bands)
        self._which = np.empty(top + 1, np.int16)
        keys = list(self.runners)
        for lo, hi, k in self.bands:
            self._which[lo:hi + 1] = keys.index(k)
        self._keys = keys
        self.precision = ",".join(f"{self.runners[k].precision}:{lo}-{hi}" for lo, hi, k in self.bands)

    @property
    def name(self) -> str:
        return next(iter(self.runners.values())).name

    def eps(self, x: np.ndarray, t: np.ndarray) -> np.ndarray:
        which = self._which[np.asarray(t, np.int64)]
        first = int(which[0])
        if (which == first).all():
            return self.runners[self._keys[first]].eps(x, t)
        out = np.empty_like(x)
        for i in np.unique(which):
            sel = which == i
            out[sel] = self.runners[self._keys[int(i)]].eps(np.ascontiguousarray(x[sel]), t[sel])
        return out

    def describe(self):
        return {**super().describe(), "bands": [list(b) for b in self.bands],
                "runners": {k: r.describe() for k, r in self.runners.items()}}

    def close(self) -> None:
        for r in self.runners.values():
            r.close()


def open_banded(path: str | os.PathLike, bands: str, threads: int = 0) -> Runner:
    """The OpenVINO runners of ``path`` at every precision ``bands`` names (``"bf16:0-99,int8-bf16:100-999"``;
    precisions as ``--precision``), as one :class:`BandedRunner` choosing per image by its timestep."""
    keys = []
    for part in bands.split(","):
        key = part.strip().rpartition(":")[0]
        if key and key not in keys:
            keys.append(key)
    runners: dict[str, Runner] = {}
    try:
        for key in keys:
            if key not in PRECISIONS or key == "auto":
                raise ConfigError(f"precision bands: {key!r} is not a precision; one of "
                                  f"{[p for p in PRECISIONS if p != 'auto']}")
            p, backend, hint = resolve_model(path, "cpu", "openvino", key)
            runners[key] = open_runner(p, "cpu", backend=backend, threads=threads, precision=hint)
        first = next(iter(runners.values()))
        if first.card is None:
            raise ArtifactError(f"{path}: precision bands need the model's ddpm-deploy metadata (its T)")
        return BandedRunner(runners, parse_bands(bands, first.card.diffusion.num_timesteps))
    except BaseException:
        for r in runners.values():
            r.close()
        raise


def open_precision(path: str | os.PathLike, device: str = "cpu", backend: str | None = None, precision: str = "fp32",
                   threads: int = 0, device_id: int = 0) -> tuple[Runner, dict | None]:
    """The runner a precision asks for, as the Python API and the served model open it: "auto" resolved here
    (``auto_precision``: maybe bands), precision bands ("bf16:0-99,int8-bf16:100-999": :func:`open_banded`, OpenVINO
    on the CPU), else ``resolve_model`` + ``open_runner``. Returns (runner, auto's choice {"asked", "backend",
    "precision", "reason"} or None)."""
    choice = None
    if precision == "auto":
        backend, precision, why = auto_precision(path, device, backend)
        choice = {"asked": "auto", "backend": backend or "onnxruntime", "precision": precision, "reason": why}
    if isinstance(precision, str) and ":" in precision:
        if device != "cpu" or backend not in (None, "openvino"):
            raise ConfigError(invalid("precision", precision, "precision bands run OpenVINO on the CPU "
                                      f"(device 'cpu', backend None or 'openvino'; found {device!r}, {backend!r})"))
        return open_banded(path, precision, threads), choice
    path, backend, hint = resolve_model(path, device, backend, precision)
    return open_runner(path, device, backend=backend, threads=threads, device_id=device_id, precision=hint), choice
