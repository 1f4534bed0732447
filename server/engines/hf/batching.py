"""A token-budget batcher: concurrent requests share one model call, bounded by tokens not count.

Jobs wait in a bounded queue (full -> `Overloaded`, which the API turns into 429 with Retry-After).
One worker takes queued jobs in arrival order until the next would overflow the token budget,
skips jobs whose caller went away, and runs the batch on its own thread so the event loop keeps
serving HTTP meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

from server import metrics
from server.failures import EngineStopped, Overloaded

log = logging.getLogger(__name__)

Job = TypeVar("Job")
Result = TypeVar("Result")


def group_by_identity(items: list, key) -> dict[int, list[int]]:
    """Indices of `items` grouped by id(key(item)), in order: one model call per loaded checkpoint,
    since requests admitted across a reload may share a batch window."""
    groups: dict[int, list[int]] = {}
    for index, item in enumerate(items):
        groups.setdefault(id(key(item)), []).append(index)
    return groups


@dataclass
class _Pending(Generic[Job, Result]):
    job: Job
    cost: int  # tokens
    sequences: int
    future: asyncio.Future[Result]
    enqueued: float


class TokenBudgetBatcher(Generic[Job, Result]):
    """Runs `run_batch(jobs) -> results` (same order) on batches whose summed cost fits the budget.

    Args:
        run_batch: blocking function, called on the batcher's own thread.
        max_batch_tokens: budget per batch; one job larger than it still runs, alone.
        max_queued: queued jobs beyond which `submit` raises `Overloaded`.
        stage: name in metrics ("sampling" or "scoring").
        gather_seconds: how long an idle batcher waits after the first job for others to join.
    """

    def __init__(
        self,
        run_batch: Callable[[list[Job]], list[Result]],
        max_batch_tokens: int,
        max_queued: int,
        stage: str,
        gather_seconds: float = 0.0,
    ):
        self._run_batch = run_batch
        self._max_batch_tokens = max_batch_tokens
        self._max_queued = max_queued
        self._stage = stage
        self._gather_seconds = gather_seconds
        self._queue: deque[_Pending[Job, Result]] = deque()
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"bon-{stage}")
        self._worker: asyncio.Task | None = None

    async def submit(self, job: Job, cost: int, sequences: int) -> Result:
        """Queue `job` (`cost` tokens, `sequences` rows) and wait for its result.

        Cancelling the caller drops the job if it has not run yet.
        """
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._work())
        if len(self._queue) >= self._max_queued:
            raise Overloaded(
                f"server overloaded: the {self._stage} queue is full ({self._max_queued} waiting)"
            )
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        if hasattr(job, "cancelled"):
            # Jobs that can stop midway (sampling) poll this from the engine thread between steps.
            job.cancelled = future.cancelled
        self._queue.append(_Pending(job, cost, sequences, future, time.monotonic()))
        self._wakeup.set()
        return await future

    def _next_batch(self) -> list[_Pending[Job, Result]]:
        batch: list[_Pending[Job, Result]] = []
        tokens = 0
        while self._queue:
            head = self._queue[0]
            if head.future.cancelled():  # the client went away while queued
                self._queue.popleft()
                metrics.DROPPED.labels(stage=self._stage).inc()
                continue
            if batch and tokens + head.cost > self._max_batch_tokens:
                break
            batch.append(self._queue.popleft())
            tokens += head.cost
        return batch

    async def _work(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            if self._gather_seconds:
                # The engine was idle: give a burst of requests a moment to arrive together rather
                # than running the first alone and making the rest wait a whole batch for it.
                await asyncio.sleep(self._gather_seconds)
            while batch := self._next_batch():
                now = time.monotonic()
                for pending in batch:
                    metrics.QUEUE_WAIT.labels(stage=self._stage).observe(now - pending.enqueued)
                metrics.BATCH_SEQUENCES.labels(stage=self._stage).observe(sum(p.sequences for p in batch))
                metrics.BATCH_TOKENS.labels(stage=self._stage).observe(sum(p.cost for p in batch))
                await self._run(batch)

    async def _run(self, batch: list[_Pending[Job, Result]]) -> None:
        """Run a batch and answer its callers. A batch that fails runs again one job at a time, so
        a request that breaks the engine fails alone, not every request that shared its batch."""
        try:
            with metrics.STAGE_SECONDS.labels(stage=self._stage).time():
                results = await asyncio.get_running_loop().run_in_executor(
                    self._executor, self._run_batch, [p.job for p in batch]
                )
        except Exception as error:
            if len(batch) == 1:
                if not batch[0].future.done():
                    batch[0].future.set_exception(error)
                return
            log.warning(
                "a %s batch of %d jobs failed (%r); running them one by one", self._stage, len(batch), error
            )
            for pending in batch:
                if pending.future.cancelled():
                    metrics.DROPPED.labels(stage=self._stage).inc()
                else:
                    await self._run([pending])
            return
        for pending, result in zip(batch, results, strict=True):
            if pending.future.cancelled():  # its client went away while it ran
                metrics.DROPPED.labels(stage=self._stage).inc()
            elif not pending.future.done():
                pending.future.set_result(result)

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
        while self._queue:
            pending = self._queue.popleft()
            if not pending.future.done():
                pending.future.set_exception(EngineStopped(f"{self._stage} engine stopped"))
        self._executor.shutdown(wait=True)
