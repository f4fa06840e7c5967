"""One background thread owns the generation `Engine`; HTTP handlers talk to it through jobs.

A job is one HTTP request: one engine `Request` per prompt. The thread admits waiting requests
into free slots as soon as there are any (so a new request joins the batch that is already
decoding: continuous batching), advances every active sequence with one `engine.step()`, and
hands each job its token events on the job's event loop. Jobs that cannot start yet wait in a
bounded queue; a full queue refuses new jobs (the server answers 429). Cancelling a job (its
client went away, or it timed out) frees its slots before the next step.

The engine is only ever touched by this thread, so it needs no locks; the queue and the cancel
list are shared and guarded by one condition variable. Other work on the model (scoring a
prompt's tokens) is handed to the thread with `call` and runs between two steps.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..errors import KimbhoError
from ..inference.engine import Engine, Request, TokenEvent

log = logging.getLogger("kimbho")

T = TypeVar("T")


class QueueFull(Exception):
    """No room for another job: the server is at capacity."""


@dataclass
class Stats:
    """What the worker has done, for tests and monitoring."""

    steps: int = 0
    tokens: int = 0
    jobs: int = 0
    cancelled: int = 0
    max_batch: int = 0  # most sequences advanced by one step
    waiting: int = 0  # jobs in the queue now


@dataclass(eq=False)
class Job:
    """One HTTP request's generation. Its events arrive on `events` as lists of (prompt index,
    `TokenEvent`) pairs, one list per engine step, or as an exception if the job failed."""

    requests: Sequence[Request]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    engine_ids: dict[int, int] = field(default_factory=dict)  # engine request id -> prompt index
    admitted: int = 0  # requests of this job already in slots
    cancelled: bool = False

    def _deliver(self, item: list[tuple[int, TokenEvent]] | BaseException) -> None:
        """Called from the worker thread."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            pass


class Worker:
    """The engine's thread; see the module docstring."""

    def __init__(self, engine: Engine, max_queue: int = 64) -> None:
        self.engine = engine
        self.max_queue = max_queue
        self.stats = Stats()
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._to_cancel: list[Job] = []
        self._calls: deque[tuple[Callable[[], Any], asyncio.Future, asyncio.AbstractEventLoop]] = deque()
        self._jobs: dict[int, Job] = {}  # engine request id -> its job (worker thread only)
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="kimbho-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def submit(self, requests: Sequence[Request]) -> Job:
        """Queue a job for `requests` on the calling event loop; raises `QueueFull` at capacity."""
        for request in requests:
            self.engine.check(request)
        job = Job(requests, asyncio.get_running_loop())
        with self._cond:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"the server is busy: {len(self._waiting)} requests are waiting")
            self._waiting.append(job)
            self.stats.waiting = len(self._waiting)
            self.stats.jobs += 1
            self._cond.notify()
        return job

    def call(self, work: Callable[[], T]) -> asyncio.Future[T]:
        """Run `work()` on the engine's thread between two steps (the model is used by one thread
        at a time); the future, on the calling event loop, gets its result or exception. Raises
        `QueueFull` when as many jobs and calls wait as the queue holds."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        with self._cond:
            if len(self._waiting) + len(self._calls) >= self.max_queue:
                raise QueueFull(
                    f"the server is busy: {len(self._waiting) + len(self._calls)} requests are waiting"
                )
            self._calls.append((work, future, loop))
            self._cond.notify()
        return future

    def cancel(self, job: Job) -> None:
        """Stop `job`'s generation and free its slots (safe to call more than once). A job still
        waiting leaves the queue at once, even while the engine is busy with a step."""
        with self._cond:
            if not job.cancelled:
                job.cancelled = True
                if job in self._waiting:
                    self._waiting.remove(job)
                    self.stats.waiting = len(self._waiting)
                if job.admitted:  # some of its requests hold slots: the worker frees them
                    self._to_cancel.append(job)
                else:
                    self.stats.cancelled += 1
                self._cond.notify()

    # The worker thread.

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._stop or self._waiting or self._to_cancel or self._calls or self.engine.busy):
                    self._cond.wait()
                if self._stop:
                    return
                cancels, self._to_cancel = self._to_cancel, []
                calls, self._calls = self._calls, deque()
            for work, future, loop in calls:
                _settle(future, loop, work)
            try:
                for job in cancels:
                    self._drop(job)
                self._admit()
                self._step()
            except Exception as e:  # a bug: fail the jobs in flight rather than hang them
                log.exception("the generation worker failed")
                for job in {*self._jobs.values()}:
                    job._deliver(e)
                    self._drop(job)

    def _admit(self) -> None:
        """Move waiting requests into free slots, oldest first, all in one `add_batch` (so
        requests that arrive together are prefilled together)."""
        # Most steps have nothing to take. Read without the lock: a job appended meanwhile is taken
        # at the next step (the loop checks for waiting jobs under the lock before it sleeps).
        if not self._waiting or not self.engine.free_slots:
            return
        with self._cond:
            # The waiting requests in order (each needs a slot at least, so no more than are free).
            pending = (
                (job, index, job.requests[index])
                for job in self._waiting
                for index in range(job.admitted, len(job.requests))
            )
            waiting = list(itertools.islice(pending, self.engine.free_slots))
            taken = waiting[: self.engine.admissible(r for _, _, r in waiting)]
            for job, _, _ in taken:
                job.admitted += 1
            while self._waiting and self._waiting[0].admitted == len(self._waiting[0].requests):
                self._waiting.popleft()
            self.stats.waiting = len(self._waiting)
        if not taken:
            return
        try:
            engine_ids: list[int | None] = list(self.engine.add_batch([r for _, _, r in taken]))
        except KimbhoError:  # checked at submit, so not expected: one by one, so only its job fails
            engine_ids = [self._add_alone(job, request) for job, _, request in taken]
        for (job, index, _), engine_id in zip(taken, engine_ids, strict=True):
            if engine_id is not None:
                job.engine_ids[engine_id] = index
                self._jobs[engine_id] = job

    def _add_alone(self, job: Job, request: Request) -> int | None:
        try:
            return self.engine.add_batch([request])[0]
        except KimbhoError as e:
            job._deliver(e)
            self.cancel(job)
            return None

    def _step(self) -> None:
        events = self.engine.step()
        if not events:
            return
        self.stats.steps += 1
        self.stats.tokens += len(events)
        self.stats.max_batch = max(self.stats.max_batch, len(events))
        by_job: dict[Job, list[tuple[int, TokenEvent]]] = {}
        for event in events:
            job = self._jobs[event.request_id]
            by_job.setdefault(job, []).append((job.engine_ids[event.request_id], event))
        running = {s.request_id for s in self.engine.seqs if s is not None}
        for engine_id in [i for i in self._jobs if i not in running]:
            del self._jobs[engine_id]  # every sample of this prompt has finished
        for job, job_events in by_job.items():
            job._deliver(job_events)

    def _drop(self, job: Job) -> None:
        for engine_id in job.engine_ids:
            if self._jobs.pop(engine_id, None) is not None:
                self.engine.cancel(engine_id)
        self.stats.cancelled += 1


def _settle(future: asyncio.Future, loop: asyncio.AbstractEventLoop, work: Callable[[], Any]) -> None:
    """Run `work` and hand its outcome to `future` on its loop (unless its caller gave up)."""

    def deliver(method: str, value: Any) -> None:
        if not future.done():  # cancelled: the request timed out or its client went away
            getattr(future, method)(value)

    try:
        outcome: tuple[str, Any] = ("set_result", work())
    except Exception as e:
        outcome = ("set_exception", e)
    try:
        loop.call_soon_threadsafe(deliver, *outcome)
    except RuntimeError:  # the event loop is closed: the server is shutting down
        pass
