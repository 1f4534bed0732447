"""One scheduler for every in-process engine: the queue, admission by token budget, and answers.

As in TEI, the scheduler owns the queue and a `Backend` only runs steps. Jobs wait in a bounded
queue (full -> `Overloaded`, which the API turns into a 429 with Retry-After). Before each step the
scheduler admits queued jobs in arrival order while the tokens held stay within the budget (a job
larger than the whole budget still runs, alone) and the job can share the backend's work; a job
whose caller went away while queued is skipped and counted. The step runs on the engine's own
thread, so the event loop keeps serving HTTP meanwhile, and returns the jobs it finished.

A scorer's step finishes every job it was given (one batch, one forward); the transformers
sampler's step is one decode step of a batch that jobs join and leave between steps. A step that
fails runs every job it held again, alone, so a job that breaks the engine fails by itself.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from server import metrics
from server.failures import EngineStopped, Overloaded

log = logging.getLogger(__name__)

Job = TypeVar("Job")
Result = TypeVar("Result")


class Backend(Protocol[Job, Result]):
    """What runs the admitted jobs. `step` and `alone` run on the engine's thread, one at a time."""

    def joins(self, job: Job, holding: Job | None) -> bool:
        """Whether `job` can share a step with `holding`, a job already admitted (None: none is)."""
        ...

    def step(self, joining: list[Job]) -> list[tuple[Job, Result]]:
        """Take `joining` in, run one step, return the jobs it finished with their results."""
        ...

    def alone(self, job: Job) -> Result:
        """Run `job` from the start by itself (after a step that failed)."""
        ...

    def reset(self) -> None:
        """A step failed: drop every job held; they run again alone."""
        ...


@dataclass
class _Pending(Generic[Job, Result]):
    job: Job
    cost: int  # tokens of budget it holds while admitted
    sequences: int  # rows it adds to a batch
    future: asyncio.Future[Result]
    enqueued: float


class Scheduler(Generic[Job, Result]):
    """Args:
    backend: runs the steps.
    max_batch_tokens: budget of the jobs admitted at once; one job larger than it still runs, alone.
    max_queued: queued jobs beyond which `submit` raises `Overloaded`.
    stage: name in metrics ("sampling" or "scoring").
    gather_seconds: how long an idle engine waits after the first job for others to join it.
    """

    def __init__(
        self,
        backend: Backend[Job, Result],
        max_batch_tokens: int,
        max_queued: int,
        stage: str,
        gather_seconds: float = 0.0,
    ):
        self._backend = backend
        self._max_batch_tokens = max_batch_tokens
        self._max_queued = max_queued
        self._stage = stage
        self._gather_seconds = gather_seconds
        self._queue: deque[_Pending[Job, Result]] = deque()
        self._running: dict[int, _Pending[Job, Result]] = {}  # by id(job): admitted, not answered
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"bon-{stage}")
        self._worker: asyncio.Task | None = None

    async def submit(self, job: Job, cost: int, sequences: int) -> Result:
        """Queue `job` (`cost` tokens, `sequences` rows) and wait for its result. Cancelling the
        caller drops the job if it has not run yet (and, for jobs that poll, mid-run)."""
        loop = asyncio.get_running_loop()
        if self._worker is None:
            self._worker = loop.create_task(self._work())
        if len(self._queue) >= self._max_queued:
            raise Overloaded(
                f"server overloaded: the {self._stage} queue is full ({self._max_queued} waiting)"
            )
        future: asyncio.Future[Result] = loop.create_future()
        if hasattr(job, "cancelled"):
            # Jobs that can stop midway (sampling) poll this from the engine thread between steps.
            job.cancelled = future.cancelled
        self._queue.append(_Pending(job, cost, sequences, future, time.monotonic()))
        self._wakeup.set()
        return await future

    def _admit(self) -> list[_Pending[Job, Result]]:
        """Queued jobs that join now: in order, while the budget has room and they can share."""
        joining: list[_Pending[Job, Result]] = []
        used = sum(p.cost for p in self._running.values())
        holding = next(iter(self._running.values()), None)
        while self._queue:
            head = self._queue[0]
            if head.future.cancelled():  # the client went away while queued
                self._queue.popleft()
                metrics.DROPPED.labels(stage=self._stage).inc()
                continue
            anchor = holding or (joining[0] if joining else None)
            if not self._backend.joins(head.job, anchor.job if anchor else None):
                break
            if used and used + head.cost > self._max_batch_tokens:
                break
            joining.append(self._queue.popleft())
            used += head.cost
        if joining:
            now = time.monotonic()
            for pending in joining:
                metrics.QUEUE_WAIT.labels(stage=self._stage).observe(now - pending.enqueued)
                self._running[id(pending.job)] = pending
            rows = sum(p.sequences for p in self._running.values())
            metrics.BATCH_SEQUENCES.labels(stage=self._stage).observe(rows)
            metrics.BATCH_TOKENS.labels(stage=self._stage).observe(used)
        return joining

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._running and not self._queue:
                await self._wakeup.wait()
                self._wakeup.clear()
                if self._gather_seconds:
                    # The engine was idle: give a burst of requests a moment to arrive together
                    # rather than running the first alone and making the rest wait a step for it.
                    await asyncio.sleep(self._gather_seconds)
            joining = self._admit()
            if not self._running:
                continue
            try:
                with metrics.STAGE_SECONDS.labels(stage=self._stage).time():
                    finished = await loop.run_in_executor(
                        self._executor, self._backend.step, [p.job for p in joining]
                    )
            except Exception as error:
                await self._run_alone(error)
                continue
            for job, result in finished:
                self._answer(self._running.pop(id(job)), result)

    def _answer(self, pending: _Pending[Job, Result], result: Result | BaseException) -> None:
        if pending.future.cancelled():  # its client went away while it ran
            metrics.DROPPED.labels(stage=self._stage).inc()
        elif isinstance(result, BaseException):
            pending.future.set_exception(result)
        else:
            pending.future.set_result(result)

    async def _run_alone(self, error: Exception) -> None:
        """A step failed: its state is lost, so every job it held starts again alone."""
        held = list(self._running.values())
        self._running = {}
        self._backend.reset()
        if len(held) == 1:
            self._answer(held[0], error)
            return
        log.warning(
            "a %s step of %d jobs failed (%r); running them one by one", self._stage, len(held), error
        )
        loop = asyncio.get_running_loop()
        for pending in held:
            if pending.future.cancelled():
                metrics.DROPPED.labels(stage=self._stage).inc()
                continue
            try:
                result = await loop.run_in_executor(self._executor, self._backend.alone, pending.job)
            except Exception as alone:
                self._answer(pending, alone)
            else:
                self._answer(pending, result)

    async def close(self) -> None:
        """Stop: queued and running jobs fail with EngineStopped, not silently."""
        if self._worker is not None:
            self._worker.cancel()
        waiting = [*self._queue, *self._running.values()]
        self._queue.clear()
        self._running = {}
        for pending in waiting:
            if not pending.future.done():
                pending.future.set_exception(EngineStopped(f"{self._stage} engine stopped"))
        self._executor.shutdown(wait=True)
