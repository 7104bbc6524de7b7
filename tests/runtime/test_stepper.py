"""The step-level loop without Triton (runtime/serve/stepper.py): requests joining a running loop at different times,
with different step counts and schedulers, come out bit for bit as sampled alone; the premise of that (a row's ε does
not depend on the other rows of the batch) is checked for ONNX Runtime on the CPU; the wait queue is bounded;
cancellation frees a slot at the next step; closing fails what is in flight. The Triton side: test_serve_step.py."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest

from ddpm_deploy import Sampler
from ddpm_deploy.runtime.backends.ort import OrtRunner
from ddpm_deploy.runtime.serve.handler import Request, RequestError, SamplingFailed, ServedModel
from ddpm_deploy.runtime.serve.stepper import Busy, Cancelled, StepLoop

SEED = 7


@pytest.mark.parametrize("threads", [1, 2])
def test_a_rows_eps_does_not_depend_on_the_other_rows_of_the_batch(random_micro_onnx, threads):
    """What makes step-level batching bit-exact on this backend: ε of row i in any batch (any size, any companions
    at any timesteps, any position) equals ε of that row alone."""
    rng = np.random.default_rng(0)
    with OrtRunner(random_micro_onnx, threads=threads) as r:
        c = r.card.data
        x = rng.standard_normal((16, c.channels, c.image_size, c.image_size)).astype(np.float32)
        t = rng.integers(0, 1000, 16).astype(np.int32)
        alone = np.concatenate([r.eps(x[i:i + 1], t[i:i + 1]) for i in range(16)])
        for n in range(1, 17):
            rows = rng.permutation(16)[:n]
            np.testing.assert_array_equal(r.eps(x[rows], t[rows]), alone[rows], err_msg=f"batch of {n}")


class Client:
    """A job's callbacks: images by position, the final error, a cancel flag; ``done`` is set on finish."""

    def __init__(self):
        self.images, self.error, self.cancel, self.done = {}, None, False, threading.Event()
        self.lasts = []

    def emit(self, k, image, last):
        self.images[k] = image
        self.lasts.append(last)

    def finish(self, error):
        self.error = error
        self.done.set()


def req(indices, steps=None, scheduler=None):
    k = len(indices)
    sched = None
    if scheduler is not None:
        raw = scheduler.encode()
        sched = np.frombuffer(raw, np.uint8).reshape(1, -1).copy()
    return Request(seed=np.full(k, SEED, np.uint64), index=np.asarray(indices, np.int64),
                   steps=None if steps is None else np.array([steps], np.int32), scheduler=sched)


def submit(loop, request):
    c = Client()
    c.job = loop.parse_and_submit(request, c.emit, c.finish, lambda: c.cancel)
    return c


def wait_admitted(c, timeout=30):
    deadline = time.monotonic() + timeout
    while c.job.admitted < len(c.job.indices):
        assert time.monotonic() < deadline, "the loop did not admit the request"
        time.sleep(0.002)


@pytest.fixture()
def model(random_micro_onnx):
    m = ServedModel(random_micro_onnx, threads=1, max_batch=4)
    yield m
    m.close()


def test_staggered_requests_of_mixed_schedulers_equal_sampling_alone(model, random_micro_onnx, tmp_path):
    record = tmp_path / "record.jsonl"
    loop = StepLoop(model, queue_size=16, record=str(record))
    asks = [([0], 12, None), ([1, 2], 30, "ddim"), ([3], 9, "unipc"), ([4], 20, "dpmsolver++"),
            ([5, 6, 7], 14, "sde-dpmsolver++"), ([8], 40, None), ([9], 5, '{"scheduler": "ddim", "options": {"eta": 1.0}}')]
    clients = []
    try:
        for a in asks:
            clients.append(submit(loop, req(*a)))
            time.sleep(0.01)  # arrivals while the loop runs
        for c in clients:
            assert c.done.wait(60)
    finally:
        loop.close()

    with Sampler.from_onnx(random_micro_onnx, threads=1) as s:
        for (indices, steps, sched), c in zip(asks, clients):
            assert c.error is None, c.error
            assert c.lasts == [False] * (len(indices) - 1) + [True]  # the last image is flagged last
            opts = {}
            if sched and sched.startswith("{"):
                spec = json.loads(sched)
                sched, opts = spec["scheduler"], spec["options"]
            for k, i in enumerate(indices):
                want = s(1, seed=SEED, start_index=i, steps=steps, scheduler=sched, **opts)[0]
                np.testing.assert_array_equal(c.images[k], want, err_msg=f"{sched} {steps} index {i}")
    calls = [c for c in map(json.loads, record.read_text().splitlines()) if "t" in c]
    assert loop.eps_calls == len(calls) and len(calls) < sum(s * len(i) for i, s, _ in asks)
    assert any(len(set(c["t"])) > 1 and len(set(c["job"])) > 1 for c in calls), "no ε call mixed timesteps"
    assert max(len(c["t"]) for c in calls) <= 4


def test_past_the_queue_bound_a_request_is_refused_at_once(model):
    loop = StepLoop(model, queue_size=1)
    try:
        long = [submit(loop, req([0, 10, 20, 30], 1000))]  # the 4 slots
        wait_admitted(long[0])
        long.append(submit(loop, req([1], 1000)))  # waits
        t0 = time.perf_counter()
        with pytest.raises(Busy, match="the server is busy"):
            submit(loop, req([9], 10))
        assert time.perf_counter() - t0 < 0.5
        with pytest.raises(RequestError, match="at most 4 indices"):
            submit(loop, req(list(range(5)), 10))
        with pytest.raises(RequestError, match="steps must be between"):
            submit(loop, req([0], 5000))
    finally:
        loop.close("stopped by the test")
    for c in long:
        assert isinstance(c.error, SamplingFailed) and "stopped by the test" in str(c.error)


def test_a_cancelled_request_frees_its_slot_at_the_next_step(random_micro_onnx, tmp_path):
    record = tmp_path / "record.jsonl"
    one_slot = ServedModel(random_micro_onnx, threads=1, max_batch=1)
    loop = StepLoop(one_slot, queue_size=4, record=str(record))
    try:
        a = submit(loop, req([0], 1000))
        b = submit(loop, req([1], 10))
        while not record.exists() or len(record.read_text().splitlines()) < 5:
            time.sleep(0.005)
        a.cancel = True
        assert b.done.wait(60) and a.done.is_set()
    finally:
        loop.close()
        one_slot.close()
    calls = [c for c in map(json.loads, record.read_text().splitlines()) if "t" in c]
    a_steps = sum(1 for c in calls if c["job"] == [1])
    assert isinstance(a.error, Cancelled) and b.error is None and len(b.images) == 1
    assert a_steps < 1000, "the cancelled request ran to its end"
    assert [c["job"] for c in calls[a_steps:]] == [[2]] * 10  # b took the slot right after
