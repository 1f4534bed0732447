"""The transformers engine behind the `Sampler` contract: one running decode batch, continuously
joined.

Requests wait in a bounded queue (full -> `Overloaded`, a 429). Between two decode steps the worker
admits queued requests, in arrival order, while the running batch's token budget has room (one
request larger than the whole budget still runs, alone); they are prefilled and their rows join
the batch (`DecodeBatch`). A request whose client left while queued is skipped; one that leaves
mid-decode has its rows retired at the next step. Each step runs on the engine's own thread, so
the event loop keeps serving HTTP meanwhile.

On a CPU a decode step costs about as much per row as the rows it holds, so a short request that
joins a batch of 16 long rows would pay for all of them at every one of its steps. A request of at
most `EXPRESS_TOKENS` that arrives while a batch decodes goes to a second batch, the express lane,
which takes up to `EXPRESS_STEPS` steps for each step of the main batch: short requests finish in
about their idle time, and the main batch never stops.

Requests admitted across a reload hold different policies: the batches decode one policy, and
requests for the next wait until they drain. A step that fails runs every request it held again,
alone, so a request that breaks the engine fails by itself.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from server import metrics
from server.engines.contract import Candidate, SampleRequest, SamplingParams, sampling_cost
from server.engines.hf.decoding import DecodeBatch, generate
from server.engines.hf.models import HFPolicy, load_policy_weights
from server.failures import CheckpointError, EngineStopped, Overloaded
from server.policy import PolicyInfo, probe_ids

log = logging.getLogger(__name__)
STAGE = "sampling"
EXPRESS_TOKENS = 16  # max_tokens up to which a request joining a running batch takes the express lane
EXPRESS_STEPS = 4  # express steps per main step, at most


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
        self._batch: DecodeBatch | None = None  # the main batch
        self._express: DecodeBatch | None = None  # short requests that arrived while it decoded
        self._express_streak = 0  # express steps since the last main step
        self._running: dict[int, _Pending] = {}  # by id(request), admitted and not yet answered

    def _load(self, info: PolicyInfo) -> HFPolicy:
        policy = load_policy_weights(info, self.device, self.dtype)
        ids = probe_ids(info.tokenizer)
        with torch.inference_mode():
            logits = policy.model(torch.tensor([ids], device=policy.model.device)).logits  # (1, T, V)
        if not torch.isfinite(logits).all():
            raise CheckpointError(f"{info.path}: the policy's logits are not finite (NaN or inf weights?)")
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

    def _admit(self) -> tuple[list[_Pending], list[_Pending]]:
        """Queued requests that join now, for the main batch and the express lane: in order, while
        the budget has room and they decode the running policy."""
        joining: tuple[list[_Pending], list[_Pending]] = ([], [])
        used = sum(p.cost for p in self._running.values())
        running = self._batch or self._express
        policy = running.policy if running is not None else None
        while self._queue:
            head = self._queue[0]
            if head.future.cancelled():  # the client went away while queued
                self._queue.popleft()
                metrics.DROPPED.labels(stage=STAGE).inc()
                continue
            policy = policy or head.request.weights
            if head.request.weights is not policy or (used and used + head.cost > self._max_batch_tokens):
                break
            express = self._batch is not None and head.request.params.max_tokens <= EXPRESS_TOKENS
            joining[express].append(self._queue.popleft())
            used += head.cost
        if joining[0] or joining[1]:
            now = time.monotonic()
            for pending in joining[0] + joining[1]:
                metrics.QUEUE_WAIT.labels(stage=STAGE).observe(now - pending.enqueued)
                self._running[id(pending.request)] = pending
            rows = sum(p.request.n for p in self._running.values())
            metrics.BATCH_SEQUENCES.labels(stage=STAGE).observe(rows)
            metrics.BATCH_TOKENS.labels(stage=STAGE).observe(used)
            if joining[0] and self._batch is None:
                self._batch = DecodeBatch(policy)
            if joining[1] and self._express is None:
                self._express = DecodeBatch(policy)
        return joining

    def _step(
        self, main: list[SampleRequest], express: list[SampleRequest]
    ) -> list[tuple[SampleRequest, list[Candidate]]]:
        """Admit the newcomers, then one step of the express lane or of the main batch."""
        for batch, joining in ((self._batch, main), (self._express, express)):
            if joining:
                batch.admit(joining)
        main_rows = self._batch is not None and len(self._batch) > 0
        express_rows = self._express is not None and len(self._express) > 0
        if express_rows and (self._express_streak < EXPRESS_STEPS or not main_rows):
            self._express_streak += 1
            return self._express.step()
        self._express_streak = 0
        return self._batch.step() if main_rows else []

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
            main, express = self._admit()
            if not self._running:
                continue
            try:
                with metrics.STAGE_SECONDS.labels(stage=STAGE).time():
                    finished = await loop.run_in_executor(
                        self._executor, self._step, [p.request for p in main], [p.request for p in express]
                    )
            except Exception as error:
                await self._run_alone(error)
                continue
            for request, candidates in finished:
                self._answer(self._running.pop(id(request)), candidates)
            # An emptied batch is dropped: the next request to arrive starts the main batch anew.
            if self._batch is not None and not len(self._batch):
                self._batch = None
            if self._express is not None and not len(self._express):
                self._express = None

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
        self._running, self._batch, self._express = {}, None, None
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
