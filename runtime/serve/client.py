"""Fetch images from a served model with NVIDIA's ``tritonclient`` (HTTP or gRPC): one request per image,
``concurrency`` requests in flight, each thread with its own client.

Two models, two paths (``batching``):
- "request": ``ddpm`` (Triton's dynamic batcher) through the plain infer endpoint, HTTP or gRPC;
- "step": ``ddpm_stream`` (the step-level model, decoupled), which Triton's plain infer endpoint refuses: over gRPC a
  bidirectional stream per thread (``start_stream`` / ``async_stream_infer``), over HTTP the generate endpoint
  (``POST /v2/models/ddpm_stream/generate`` with JSON ``{"seed": S, "index": I, "steps": N}``; ``generate_stream``,
  server-sent events, for a request of several indices).
The default is the server's: "step" when its repository was written with step-level batching."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ..errors import ConfigError, DDPMError, lazy_import
from .repository import MODEL_NAME, STREAM_NAME

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
    return _tensors(mod, arrays)


def _tensors(mod, arrays) -> list:
    """tritonclient InferInputs of (name, array, Triton dtype)."""
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


def stream_inputs(mod, seeds: Sequence[int], indices: Sequence[int], steps: int | None, scheduler: str | None = None):
    """Inputs of one request of the step-level model: seed UINT64 [k], index INT64 [k], optional steps INT32 [1]
    and scheduler UINT8 [n] (its UTF-8 bytes)."""
    arrays = [("seed", np.asarray(seeds, dtype=np.uint64).reshape(-1), "UINT64"),
              ("index", np.asarray(indices, dtype=np.int64).reshape(-1), "INT64")]
    if steps is not None:
        arrays.append(("steps", np.array([steps], dtype=np.int32), "INT32"))
    if scheduler is not None:
        raw = encode_scheduler(scheduler)
        arrays.append(("scheduler", raw[:max(1, int(np.flatnonzero(raw).max(initial=-1)) + 1)], "UINT8"))
    return _tensors(mod, arrays)


class _Stream:
    """One gRPC stream to the step-level model (one per thread): requests go out on it, responses come back on
    tritonclient's reader thread and are handed to the waiting request by id."""

    def __init__(self, client):
        import queue

        self.client, self.queue, self.ids = client, queue.Queue(), 0
        client.start_stream(callback=lambda result, error: self.queue.put((result, error)))

    def request(self, mod, seed: int, indices: Sequence[int], steps, scheduler, timeout: float) -> np.ndarray:
        import queue

        self.ids += 1
        rid = str(self.ids)
        self.client.async_stream_infer(STREAM_NAME, stream_inputs(mod, [seed] * len(indices), indices, steps, scheduler),
                                       request_id=rid, enable_empty_final_response=True)
        got: dict[int, np.ndarray] = {}
        deadline = time.monotonic() + timeout
        while True:
            try:
                result, error = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"no answer within {timeout:.0f}s") from None
            if error is not None:
                raise error
            resp = result.get_response()
            if resp.id != rid:
                continue  # an answer to an earlier request of this stream that timed out
            image = result.as_numpy("image")
            if image is not None:
                for i, im in zip(result.as_numpy("index").reshape(-1), image):
                    got[int(i)] = im
            if resp.parameters["triton_final_response"].bool_param:
                break
        missing = [i for i in indices if int(i) not in got]
        if missing:
            raise RuntimeError(f"the stream ended without the images of indices {missing[:4]}")
        return np.stack([got[int(i)] for i in indices])

    def close(self) -> None:
        self.client.stop_stream(cancel_requests=True)


class TritonImages:
    """Images of (seed, index) from a served model; ``fetch`` runs ``concurrency`` requests at a time.
    ``batching``: "step" (the step-level model ``ddpm_stream``), "request" (``ddpm``), None: the server's."""

    def __init__(self, url: str, protocol: str | None = None, model: str = MODEL_NAME, timeout: float = 600.0,
                 batching: str | None = None):
        self.url, self.protocol = split_url(url, protocol)
        self.mod = _module(self.protocol)
        self.model, self.timeout = model, timeout
        if batching not in (None, "step", "request"):
            raise ConfigError(f"batching must be step or request, found {batching!r}")
        self._batching = batching
        self._local = threading.local()
        self._clients: list[Any] = []
        self._lock = threading.Lock()

    @property
    def batching(self) -> str:
        """The path requests take: "step" or "request" (asked from the server once, when not given)."""
        if self._batching is None:
            self._batching = "step" if self.parameters().get("batching") == "step" else "request"
        return self._batching

    def _stream(self) -> _Stream:
        st = getattr(self._local, "stream", None)
        if st is None:
            st = self._local.stream = _Stream(self.client())
            with self._lock:
                self._clients.append(st)
        return st

    def _generate(self, seed: int, indices: Sequence[int], steps: int | None, scheduler: str | None) -> np.ndarray:
        """HTTP: the generate endpoint (one image) or generate_stream (server-sent events, one per image)."""
        import urllib.error
        import urllib.request

        body: dict[str, Any] = {"seed": [int(seed)] * len(indices), "index": [int(i) for i in indices]}
        if steps is not None:
            body["steps"] = int(steps)
        if scheduler is not None:
            raw = str(scheduler).encode("utf-8")
            encode_scheduler(scheduler)  # the same checks
            body["scheduler"] = list(raw)
        ep = "generate" if len(indices) == 1 else "generate_stream"
        req = urllib.request.Request(f"http://{self.url}/v2/models/{STREAM_NAME}/{ep}", method="POST",
                                     data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        for attempt in range(3):
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as r:
                    text = r.read().decode("utf-8")
                break
            except urllib.error.HTTPError as e:
                raise RuntimeError(f"HTTP {e.code}: {_error_text(e.read())}") from None
            except urllib.error.URLError as e:
                # the connection broke before an answer (seen once in CI: Broken pipe while sending the body);
                # a request is (seed, index): sending it again gives the same image
                if attempt == 2 or not isinstance(e.reason, (BrokenPipeError, ConnectionResetError)):
                    raise
        events = [json.loads(ln[5:]) for ln in text.splitlines() if ln.startswith("data:")] if ep != "generate" \
            else [json.loads(text)]
        shape = tuple(int(v) for v in self.parameters()["image_shape"].split(","))
        got = {}
        for ev in events:
            if "error" in ev:
                raise RuntimeError(ev["error"])
            if "image" in ev:
                idx = np.asarray(ev["index"]).reshape(-1)
                ims = np.asarray(ev["image"], dtype=np.uint8).reshape(len(idx), *shape)
                got.update({int(i): im for i, im in zip(idx, ims)})
        missing = [i for i in indices if int(i) not in got]
        if missing:
            raise RuntimeError(f"the answer holds no image of indices {missing[:4]}")
        return np.stack([got[int(i)] for i in indices])

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
        """The served model's config parameters (artifact, precision, model_sha256, diffusion, …); read once."""
        if getattr(self, "_params", None) is not None:
            return dict(self._params)
        try:
            cfg = self.client().get_model_config(self.model, **({"as_json": True} if self.protocol == "grpc" else {}))
        except Exception as e:  # noqa: BLE001 - tritonclient raises its own exception types per protocol
            raise RequestFailed(f"cannot read the config of model {self.model!r} at {self.url} ({self.protocol}): "
                                f"{e}; is `ddpm-run serve` running there?") from None
        cfg = cfg.get("config", cfg)
        self._params = {k: v.get("string_value", v.get("stringValue", "")) for k, v in cfg.get("parameters", {}).items()}
        return dict(self._params)

    def request(self, seed: int, indices: Sequence[int], steps: int | None = None, scheduler: str | None = None
                ) -> np.ndarray:
        """One request for ``len(indices)`` images; uint8 [k, H, W, C]."""
        mod = self.mod
        try:
            if self.batching == "step":
                if self.protocol == "grpc":
                    return self._stream().request(mod, seed, indices, steps, scheduler, self.timeout)
                return self._generate(seed, indices, steps, scheduler)
            res = self.client().infer(self.model, make_inputs(mod, [seed] * len(indices), indices, steps, scheduler),
                                      outputs=[mod.InferRequestedOutput("image", **({"binary_data": True}
                                                                                    if self.protocol == "http" else {}))],
                                      **({"client_timeout": self.timeout} if self.protocol == "grpc" else {}))
        except RequestFailed:
            raise
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
            for c in reversed(self._clients):  # a thread's stream before its client
                try:
                    c.close()
                except Exception:  # noqa: BLE001
                    pass
            self._clients.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _error_text(body: bytes) -> str:
    try:
        return json.loads(body).get("error", body.decode("utf-8", "replace"))
    except (ValueError, AttributeError):
        return body.decode("utf-8", "replace")


def diffusion_of(params: dict[str, str]) -> dict[str, Any]:
    try:
        return json.loads(params.get("diffusion", "{}"))
    except json.JSONDecodeError:
        return {}
