"""The transformers engine behind the `Sampler` contract: one running decode batch, continuously
joined.

Requests wait in a bounded queue (full -> `Overloaded`, a 429). Between two decode steps the worker
admits queued requests, in arrival order, while the running batch's token budget has room (one
request larger than the whole budget still runs, alone); they are prefilled and their rows join
the batch (`DecodeBatch`). A request whose client left while queued is skipped; one that leaves
mid-decode has its rows retired at the next step. Each step runs on the engine's own thread, so
the event loop keeps serving HTTP meanwhile.

Requests admitted across a reload hold different policies: a batch decodes one policy, and
requests for the next wait until it drains. A step that fails runs every request it held again,
alone, so a request that breaks the engine fails by itself.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from server import metrics
from server.engines.contract import Candidate, SampleRequest, SamplingParams, sampling_cost
from server.engines.hf.decoding import DecodeBatch, generate
from server.engines.hf.models import HFPolicy, load_policy_weights
from server.failures import EngineStopped, Overloaded
from server.policy import PolicyInfo

log = logging.getLogger(__name__)
STAGE = "sampling"


@dataclass
class _Pending:
    request: SampleRequest
    cost: int  # tokens: the prompt once, room for n rows to grow
    future: asyncio.Future[list[Candidate]]
    enqueued: float


class TransformersSampler:
    """Handles are `HFPolicy` objects. Released weights are simply dropped: the last request
    holding them lets them go."""

    def __init__(
        self, device: str, dtype: str, max_batch_tokens: int, max_queued: int, gather_seconds: float = 0.0
    ):
        self.device, self.dtype = device, dtype
        self._max_batch_tokens = max_batch_tokens
        self._max_queued = max_queued
        self._gather_seconds = gather_seconds
        self._queue: deque[_Pending] = deque()
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bon-sampling")
        self._worker: asyncio.Task | None = None
        self._batch: DecodeBatch | None = None
        self._running: dict[int, _Pending] = {}  # by id(request), admitted and not yet answered

    def _load(self, info: PolicyInfo) -> HFPolicy:
        policy = load_policy_weights(info, self.device, self.dtype)
        ids = info.tokenizer("Hello").input_ids or [info.tokenizer.bos_token_id or 0]
        generate(policy, [SampleRequest(ids, 1, SamplingParams(max_tokens=1), policy)])
        return policy

    async def load(self, policy: PolicyInfo) -> HFPolicy:
        return await asyncio.to_thread(self._load, policy)

    async def sample(self, request: SampleRequest) -> list[Candidate]:
        """Queue `request` and wait for its candidates; cancelling the caller drops its rows."""
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._work())
        if len(self._queue) >= self._max_queued:
            raise Overloaded(f"server overloaded: the {STAGE} queue is full ({self._max_queued} waiting)")
        future: asyncio.Future[list[Candidate]] = asyncio.get_running_loop().create_future()
        request.cancelled = future.cancelled  # polled by the engine thread between steps
        cost = sampling_cost(len(request.prompt_ids), request.n, request.params.max_tokens)
        self._queue.append(_Pending(request, cost, future, time.monotonic()))
        self._wakeup.set()
        return await future

    def _admit(self) -> list[_Pending]:
        """Queued requests that join the batch now: in order, while the budget has room and they
        decode the batch's policy."""
        joining: list[_Pending] = []
        used = sum(p.cost for p in self._running.values())
        policy = self._batch.policy if self._batch is not None else None
        while self._queue:
            head = self._queue[0]
            if head.future.cancelled():  # the client went away while queued
                self._queue.popleft()
                metrics.DROPPED.labels(stage=STAGE).inc()
                continue
            policy = policy or head.request.weights
            if head.request.weights is not policy or (used and used + head.cost > self._max_batch_tokens):
                break
            joining.append(self._queue.popleft())
            used += head.cost
        if joining:
            now = time.monotonic()
            for pending in joining:
                metrics.QUEUE_WAIT.labels(stage=STAGE).observe(now - pending.enqueued)
                self._running[id(pending.request)] = pending
            rows = sum(p.request.n for p in self._running.values())
            metrics.BATCH_SEQUENCES.labels(stage=STAGE).observe(rows)
            metrics.BATCH_TOKENS.labels(stage=STAGE).observe(used)
            if self._batch is None:
                self._batch = DecodeBatch(policy)
        return joining

    def _step(self, joining: list[SampleRequest]) -> list[tuple[SampleRequest, list[Candidate]]]:
        self._batch.admit(joining)
        return self._batch.step()

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._running and not self._queue:
                await self._wakeup.wait()
                self._wakeup.clear()
                if self._gather_seconds:
                    # The engine was idle: give a burst of requests a moment to arrive together
                    # rather than prefilling the first alone and the rest one step later.
                    await asyncio.sleep(self._gather_seconds)
            joining = self._admit()
            if not self._running:
                continue
            try:
                with metrics.STAGE_SECONDS.labels(stage=STAGE).time():
                    finished = await loop.run_in_executor(
                        self._executor, self._step, [p.request for p in joining]
                    )
            except Exception as error:
                await self._run_alone(error)
                continue
            for request, candidates in finished:
                self._answer(self._running.pop(id(request)), candidates)
            if not self._running:
                self._batch = None

    def _answer(self, pending: _Pending, result: list[Candidate] | BaseException) -> None:
        if pending.future.cancelled():  # its client went away while it ran
            metrics.DROPPED.labels(stage=STAGE).inc()
        elif isinstance(result, BaseException):
            pending.future.set_exception(result)
        else:
            pending.future.set_result(result)

    async def _run_alone(self, error: Exception) -> None:
        """A step failed: the batch's state is lost, so every request it held starts again alone."""
        held = list(self._running.values())
        self._running, self._batch = {}, None
        if len(held) > 1:
            log.warning(
                "a %s step of %d requests failed (%r); running them one by one", STAGE, len(held), error
            )
        loop = asyncio.get_running_loop()
        for pending in held:
            if len(held) == 1:
                self._answer(pending, error)
                continue
            if pending.future.cancelled():
                metrics.DROPPED.labels(stage=STAGE).inc()
                continue
            try:
                [candidates] = await loop.run_in_executor(
                    self._executor, generate, pending.request.weights, [pending.request]
                )
            except Exception as alone:
                self._answer(pending, alone)
            else:
                self._answer(pending, candidates)

    async def release(self, weights: object) -> None:
        """Nothing to do: the engine holds no reference once the last request is answered."""

    async def check(self) -> None:
        """The decode loop runs in this process; a failing step fails its requests, not the engine."""

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
        waiting = [*self._queue, *self._running.values()]
        self._queue.clear()
        self._running = {}
        for pending in waiting:
            if not pending.future.done():
                pending.future.set_exception(EngineStopped(f"{STAGE} engine stopped"))
        self._executor.shutdown(wait=True)
