"""Fetch images from a served ``ddpm`` model with NVIDIA's ``tritonclient`` (HTTP or gRPC): one request per
image, ``concurrency`` requests in flight, each thread with its own client."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ..errors import ConfigError, DDPMError, lazy_import
from .repository import MODEL_NAME

PROTOCOLS = ("http", "grpc")


class RequestFailed(DDPMError):
    """The server answered a request with an error (or could not be reached)."""


def split_url(url: str, protocol: str | None = None) -> tuple[str, str]:
    """('host:port', protocol) from 'http://host:port', 'grpc://host:port' or 'host:port' (+ protocol)."""
    for p in PROTOCOLS:
        if url.startswith(f"{p}://"):
            if protocol not in (None, p):
                raise ConfigError(f"--url {url} says {p}, --protocol says {protocol}")
            return url[len(p) + 3:].rstrip("/"), p
    return url.rstrip("/"), protocol or "http"


def _module(protocol: str):
    if protocol not in PROTOCOLS:
        raise ConfigError(f"protocol must be one of {PROTOCOLS}, found {protocol!r}")
    return lazy_import(f"tritonclient.{protocol}", f"ddpm-run request over {protocol}",
                       "pip install 'tritonclient[http,grpc]'")


def encode_scheduler(text: str) -> np.ndarray:
    """A scheduler (name or JSON) as the model's input: UTF-8, zero-padded to SCHEDULER_BYTES."""
    from .repository import SCHEDULER_BYTES

    raw = str(text).encode("utf-8")
    if len(raw) > SCHEDULER_BYTES or b"\0" in raw:
        raise ConfigError(f"the scheduler text must be at most {SCHEDULER_BYTES} bytes of UTF-8 without NUL, found "
                          f"{len(raw)} bytes; give a name and options instead of a whole config file")
    out = np.zeros(SCHEDULER_BYTES, np.uint8)
    out[:len(raw)] = np.frombuffer(raw, np.uint8)
    return out


def make_inputs(mod, seeds: Sequence[int], indices: Sequence[int], steps: int | None, scheduler: str | None = None):
    """Inputs of one request of k images: seed UINT64 [k, 1], index INT64 [k, 1], optional steps INT32 [k, 1] and
    scheduler UINT8 [k, 1024] (a name such as "ddim", or JSON, as zero-padded UTF-8)."""
    k = len(indices)
    arrays = [("seed", np.asarray(seeds, dtype=np.uint64).reshape(k, 1), "UINT64"),
              ("index", np.asarray(indices, dtype=np.int64).reshape(k, 1), "INT64")]
    if steps is not None:
        arrays.append(("steps", np.full((k, 1), steps, dtype=np.int32), "INT32"))
    if scheduler is not None:
        arrays.append(("scheduler", np.repeat(encode_scheduler(scheduler)[None], k, axis=0), "UINT8"))
    out = []
    for name, arr, dtype in arrays:
        inp = mod.InferInput(name, list(arr.shape), dtype)
        inp.set_data_from_numpy(arr)
        out.append(inp)
    return out


@dataclass
class Fetched:
    images: np.ndarray                     # uint8 [N, H, W, C] in the order of the indices asked for
    latencies: list[float] = field(default_factory=list)   # seconds per request
    seconds: float = 0.0                   # wall clock of the whole fetch


class TritonImages:
    """Images of (seed, index) from a served model; ``fetch`` runs ``concurrency`` requests at a time."""

    def __init__(self, url: str, protocol: str | None = None, model: str = MODEL_NAME, timeout: float = 600.0):
        self.url, self.protocol = split_url(url, protocol)
        self.mod = _module(self.protocol)
        self.model, self.timeout = model, timeout
        self._local = threading.local()
        self._clients: list[Any] = []
        self._lock = threading.Lock()

    def client(self):
        c = getattr(self._local, "client", None)
        if c is None:
            kw = {"network_timeout": self.timeout, "connection_timeout": self.timeout} if self.protocol == "http" else {}
            c = self.mod.InferenceServerClient(self.url, **kw)
            self._local.client = c
            with self._lock:
                self._clients.append(c)
        return c

    def parameters(self) -> dict[str, str]:
        """The served model's config parameters (artifact, precision, model_sha256, diffusion, …)."""
        try:
            cfg = self.client().get_model_config(self.model, **({"as_json": True} if self.protocol == "grpc" else {}))
        except Exception as e:  # noqa: BLE001 - tritonclient raises its own exception types per protocol
            raise RequestFailed(f"cannot read the config of model {self.model!r} at {self.url} ({self.protocol}): "
                                f"{e}; is `ddpm-run serve` running there?") from None
        cfg = cfg.get("config", cfg)
        return {k: v.get("string_value", v.get("stringValue", "")) for k, v in cfg.get("parameters", {}).items()}

    def request(self, seed: int, indices: Sequence[int], steps: int | None = None, scheduler: str | None = None
                ) -> np.ndarray:
        """One request for ``len(indices)`` images; uint8 [k, H, W, C]."""
        mod = self.mod
        try:
            res = self.client().infer(self.model, make_inputs(mod, [seed] * len(indices), indices, steps, scheduler),
                                      outputs=[mod.InferRequestedOutput("image", **({"binary_data": True}
                                                                                    if self.protocol == "http" else {}))],
                                      **({"client_timeout": self.timeout} if self.protocol == "grpc" else {}))
        except Exception as e:  # noqa: BLE001
            raise RequestFailed(f"request seed {seed} index {list(indices)[:4]} to {self.url} failed: {e}") from None
        return res.as_numpy("image")

    def fetch(self, seed: int, indices: Sequence[int], steps: int | None = None, concurrency: int = 4,
              scheduler: str | None = None) -> Fetched:
        """One request per index, ``concurrency`` in flight; images in the order of ``indices``."""
        if concurrency < 1:
            raise ConfigError(f"concurrency must be >= 1, found {concurrency}")
        indices = [int(i) for i in indices]

        def one(i):
            t0 = time.perf_counter()
            img = self.request(seed, [i], steps, scheduler)
            return img[0], time.perf_counter() - t0

        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            results = list(pool.map(one, indices))
        wall = time.perf_counter() - t0
        images = np.stack([r[0] for r in results]) if results else np.zeros((0, 0, 0, 0), np.uint8)
        return Fetched(images, [r[1] for r in results], wall)

    def close(self) -> None:
        with self._lock:
            for c in self._clients:
                try:
                    c.close()
                except Exception:  # noqa: BLE001
                    pass
            self._clients.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def diffusion_of(params: dict[str, str]) -> dict[str, Any]:
    try:
        return json.loads(params.get("diffusion", "{}"))
    except json.JSONDecodeError:
        return {}
