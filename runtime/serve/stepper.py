"""Step-level batching without Triton: a background loop over the slots of one runner's loop that admits waiting
requests into free slots at every step, makes one ε call over the occupied slots (each image at its own timestep,
with its own scheduler and step count), and hands each image out the moment it is done.

This is what the decoupled Triton model ``ddpm_stream`` runs (``triton_model.py`` wires its response senders to
``Job``'s callbacks). Images are bit for bit those of ``ddpm-run sample``: the noise is keyed by (seed, index,
step) and every slot carries its own plan row, so an image does not depend on which other images share its ε calls
(provided the runner's ε of a row does not depend on the other rows of the batch: tests/runtime/test_stepper.py
checks it for ONNX Runtime on the CPU).

Overload and faults:
- the wait queue is bounded (``queue_size`` requests): past it ``submit`` raises ``Busy`` at once, so memory stays
  flat under any load (a request's images are at most the loop's capacity);
- a job whose ``cancelled()`` turns true (Triton's ``is_cancelled``: the client went away) leaves its slots at the
  next step, unanswered beyond a final "cancelled" error;
- a request the model refuses fails alone (``ServedModel.parse`` raises before it is queued); a sampling failure
  (a non-finite ε, a backend error) fails the requests in flight and the loop goes on with the others;
- ``close(reason)`` fails every queued and in-flight request with ``reason`` (SIGTERM: Triton unloads the model).

``record`` (a path, optional): one JSON line per ε call, ``{"t": [timestep per image], "job": [request id per
image], "queued": n}``, and one per cancelled request, ``{"cancelled": id, "admitted": images given a slot}``: the
server's own record of which images shared each ε call (tests and benchmarks read it).
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..errors import DDPMError
from ..imageio import to_uint8
from .handler import MAX_PLANS, RequestError, SamplingFailed, ServedModel

log = logging.getLogger(__name__)

DEFAULT_QUEUE = 64          # requests waiting for a slot before the server answers "busy"
CANCEL_CHECK_S = 0.1        # how often the loop asks whether a job was cancelled (each ask crosses to the server)


class Busy(DDPMError):
    """The wait queue is full: the server answers at once (Triton's UNAVAILABLE) instead of holding the request."""


class Cancelled(DDPMError):
    """The client cancelled the request (or went away); its slots were freed."""


@dataclass
class Job:
    """One request: k images (seeds, indices, plans from ``ServedModel.parse``) and what to do with them.

    ``emit(position, image, last)`` gets each image (uint8 [H, W, C]) as soon as it is done (``last``: no other image
    of the job is left, so a server may flag that answer final); ``finish(error)`` is called once, after the last
    image (error None) or on failure (error a DDPMError; images already emitted stay sent);
    ``cancelled()`` says whether the client gave up."""

    seeds: np.ndarray
    indices: np.ndarray
    plans: list
    emit: Callable[[int, np.ndarray, bool], None]
    finish: Callable[[Exception | None], None]
    cancelled: Callable[[], bool] = lambda: False
    id: int = 0
    admitted: int = 0                       # images given a slot so far
    left: int = 0                           # images not yet emitted
    slots: set = field(default_factory=set)
    done: bool = False

    def __post_init__(self):
        self.left = len(self.indices)


class StepLoop:
    """The background loop of a step-level server over ``model`` (a ``ServedModel``: runner, plans, loop)."""

    def __init__(self, model: ServedModel, queue_size: int = DEFAULT_QUEUE, record: str | None = None):
        if queue_size < 1:
            raise DDPMError(f"the queue size must be >= 1 (a request waits there until the loop admits it), found "
                            f"{queue_size}")
        self.model, self.queue_size = model, int(queue_size)
        self.loop = model.loop()
        self.capacity = self.loop.capacity
        self.queue: collections.deque[Job] = collections.deque()
        self.where: dict[int, tuple[Job, int, object, int]] = {}  # slot -> (job, position, plan, step done)
        self.cond = threading.Condition()
        self.stopping: str | None = None
        self._ids = 0
        self._record = open(record, "a", encoding="utf-8") if record else None
        self._last_cancel_check = 0.0
        self.eps_calls = 0
        self.mixed_calls = 0  # ε calls whose batch held images at different timesteps
        self.thread = threading.Thread(target=self._run, name="ddpm-step-loop", daemon=True)
        self.thread.start()

    def parse_and_submit(self, request, emit, finish, cancelled=lambda: False) -> Job:
        """Check ``request`` (RequestError if bad, Busy if the queue is full) and queue it; returns its job."""
        seeds, indices, plans = self.model.parse(request)
        if len(indices) > self.capacity:
            raise RequestError(f"a request holds at most {self.capacity} indices (the max batch), found {len(indices)}")
        job = Job(seeds, indices, plans, emit, finish, cancelled)
        self.submit(job)
        return job

    def submit(self, job: Job) -> None:
        with self.cond:
            if self.stopping:
                raise SamplingFailed(self.stopping)
            if len(self.queue) >= self.queue_size:
                raise Busy(f"the server is busy: {len(self.queue)} requests wait for a slot (queue bound "
                           f"{self.queue_size}, {self.capacity} slots sampling); retry later")
            self._ids += 1
            job.id = self._ids
            self.queue.append(job)
            self.cond.notify()

    # ------------------------------------------------------------------------------------------------ the loop

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.stopping and not self.queue and not self.where:
                    self.cond.wait()
                if self.stopping:
                    return
            try:
                self._drop_cancelled()
                self._admit()
                self._step()
            except Exception as e:  # noqa: BLE001 - a non-finite step, a backend error: the images in flight fail
                why = str(e) if isinstance(e, DDPMError) else f"{type(e).__name__}: {e}"
                log.warning("sampling failed for %d image(s) in flight: %s", len(self.where), why)
                for job in {j.id: j for j, *_ in self.where.values()}.values():
                    self._end(job, SamplingFailed(why))
                self.loop.clear()
                self.where.clear()

    def _free_slots(self) -> list[int]:
        return [s for s in range(self.capacity) if s not in self.where]

    def _admit(self) -> None:
        free = self._free_slots()
        if not free:
            return
        if self.loop.plans_held() > MAX_PLANS:  # bounded plan table: admit nothing new until the loop drains
            if self.where:
                return
            self.loop.forget_plans()
        with self.cond:
            while free and self.queue:
                job = self.queue[0]
                while free and job.admitted < len(job.indices):
                    k, slot = job.admitted, free.pop(0)
                    self.loop.admit([slot], job.plans[k], int(job.seeds[k]), [int(job.indices[k])])
                    self.where[slot] = (job, k, job.plans[k], 0)
                    job.slots.add(slot)
                    job.admitted += 1
                if job.admitted == len(job.indices):
                    self.queue.popleft()

    def _drop_cancelled(self) -> None:
        now = time.monotonic()
        if now - self._last_cancel_check < CANCEL_CHECK_S:
            return
        self._last_cancel_check = now
        jobs = {j.id: j for j, *_ in self.where.values()}
        with self.cond:
            jobs.update({j.id: j for j in self.queue})
        for job in jobs.values():
            try:
                gone = job.cancelled()
            except Exception:  # noqa: BLE001 - the request's state cannot be read: treat it as gone
                gone = True
            if gone:
                log.info("request %d cancelled: its %d slot(s) are freed", job.id, len(job.slots))
                self._end(job, Cancelled("the request was cancelled"))

    def _end(self, job: Job, error: Exception | None) -> None:
        """Finish ``job`` (with ``error``): free its slots, take it off the queue, tell the client once."""
        if job.slots:
            self.loop.drop(sorted(job.slots))
            for s in job.slots:
                self.where.pop(s, None)
            job.slots.clear()
        with self.cond:
            try:
                self.queue.remove(job)
            except ValueError:
                pass
        if isinstance(error, Cancelled) and self._record is not None:
            self._record.write(json.dumps({"cancelled": job.id, "admitted": job.admitted}) + "\n")
            self._record.flush()
        if not job.done:
            job.done = True
            try:
                job.finish(error)
            except Exception as e:  # noqa: BLE001 - a client gone while we answer: nothing more to do
                log.info("request %d: the final response could not be sent: %s", job.id, e)

    def _step(self) -> None:
        if not self.where:
            return
        running = {s: v for s, v in self.where.items() if v[3] < len(v[2])}
        if self._record is not None and running:
            with self.cond:
                queued = len(self.queue)
            slots = sorted(running)
            self._record.write(json.dumps({"t": [int(running[s][2].timesteps[running[s][3]]) for s in slots],
                                           "job": [running[s][0].id for s in slots], "queued": queued}) + "\n")
            self._record.flush()
        ts = {int(v[2].timesteps[v[3]]) for v in running.values()}
        finished = self.loop.step()
        self.eps_calls += 1
        self.mixed_calls += len(ts) > 1
        for s, (job, k, plan, n) in running.items():
            self.where[s] = (job, k, plan, n + 1)
        for slot in finished:
            job, k, _, _ = self.where.pop(slot)
            job.slots.discard(slot)
            image = to_uint8(self.loop.take([slot]), self.model.card.data.value_range)[0]
            try:
                job.emit(k, np.ascontiguousarray(image), job.left == 1)
            except Exception as e:  # noqa: BLE001 - the client is gone: its other images are dropped
                self._end(job, Cancelled(f"the response could not be sent ({e})"))
                continue
            job.left -= 1
            if job.left == 0:
                self._end(job, None)

    # ---------------------------------------------------------------------------------------------- shutdown

    def close(self, reason: str = "the server is stopping") -> None:
        """Stop the loop; every queued and in-flight request fails with ``reason`` (idempotent)."""
        with self.cond:
            if self.stopping:
                return
            self.stopping = reason
            self.cond.notify_all()
        self.thread.join()
        jobs = {j.id: j for j, *_ in self.where.values()}
        jobs.update({j.id: j for j in self.queue})
        for job in jobs.values():
            self._end(job, SamplingFailed(reason))
        if self._record is not None:
            self._record.close()
