"""The transformers engine behind the `Sampler` contract: one running decode batch, continuously
joined.

The queue, admission by token budget and answering are the engine-independent `Scheduler`'s
(server/engines/scheduler.py): between two decode steps it admits queued requests, which are
prefilled and whose rows join the batch (`DecodeBatch`). A request whose client leaves mid-decode
has its rows retired at the next step.

On a CPU a decode step costs about as much per row as the rows it holds, so a short request that
joins a batch of 16 long rows would pay for all of them at every one of its steps. A request of at
most `EXPRESS_TOKENS` that arrives while a batch decodes goes to a second batch, the express lane,
which takes up to `EXPRESS_STEPS` steps for each step of the main batch: short requests finish in
about their idle time, and the main batch never stops.

Requests admitted across a reload hold different policies: the batches decode one policy, and
requests for the next wait until they drain.
"""

from __future__ import annotations

import asyncio
from typing import cast

import torch

from server.engines.contract import Candidate, SampleRequest, SamplingParams, sampling_cost
from server.engines.hf.decoding import DecodeBatch, generate
from server.engines.hf.models import HFPolicy, load_policy_weights
from server.engines.scheduler import Scheduler
from server.failures import CheckpointError
from server.policy import PolicyInfo, probe_ids

EXPRESS_TOKENS = 16  # max_tokens up to which a request joining a running batch takes the express lane
EXPRESS_STEPS = 4  # express steps per main step, at most


def policy_of(request: SampleRequest) -> HFPolicy:
    """The handle this engine's `load` gave the request (the contract keeps handles opaque)."""
    return cast(HFPolicy, request.weights)


class Decoder:
    """The scheduler's backend: the main batch and the express lane, stepped on the engine thread."""

    def __init__(self) -> None:
        self.main: DecodeBatch | None = None
        self.express: DecodeBatch | None = None  # short requests that arrived while main decoded
        self.express_streak = 0  # express steps since the last main step

    def joins(self, request: SampleRequest, holding: SampleRequest | None) -> bool:
        return holding is None or request.weights is holding.weights

    def step(self, joining: list[SampleRequest]) -> list[tuple[SampleRequest, list[Candidate]]]:
        """Admit the newcomers, then one step of the express lane or of the main batch."""
        decoding = self.main is not None
        main = [r for r in joining if not (decoding and r.params.max_tokens <= EXPRESS_TOKENS)]
        express = [r for r in joining if decoding and r.params.max_tokens <= EXPRESS_TOKENS]
        if main:
            self.main = self.main or DecodeBatch(policy_of(main[0]))
            self.main.admit(main)
        if express:
            self.express = self.express or DecodeBatch(policy_of(express[0]))
            self.express.admit(express)
        finished: list[tuple[SampleRequest, list[Candidate]]] = []
        main_rows = self.main is not None and len(self.main) > 0
        if (
            self.express is not None
            and len(self.express)
            and (self.express_streak < EXPRESS_STEPS or not main_rows)
        ):
            self.express_streak += 1
            finished = self.express.step()
        elif self.main is not None and main_rows:
            self.express_streak = 0
            finished = self.main.step()
        # An emptied batch is dropped: the next request to arrive starts the main batch anew.
        if self.main is not None and not len(self.main):
            self.main = None
        if self.express is not None and not len(self.express):
            self.express = None
        return finished

    def alone(self, request: SampleRequest) -> list[Candidate]:
        [candidates] = generate(policy_of(request), [request])
        return candidates

    def reset(self) -> None:
        self.main = self.express = None
        self.express_streak = 0


class TransformersSampler:
    """Handles are `HFPolicy` objects. Released weights are simply dropped: the last request
    holding them lets them go."""

    def __init__(
        self, device: str, dtype: str, max_batch_tokens: int, max_queued: int, gather_seconds: float = 0.0
    ):
        self.device, self.dtype = device, dtype
        self._scheduler: Scheduler[SampleRequest, list[Candidate]] = Scheduler(
            Decoder(), max_batch_tokens, max_queued, stage="sampling", gather_seconds=gather_seconds
        )

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
        cost = sampling_cost(len(request.prompt_ids), request.n, request.params.max_tokens)
        return await self._scheduler.submit(request, cost, sequences=request.n)

    async def release(self, weights: object) -> None:
        """Nothing to do: the engine holds no reference once the last request is answered."""

    async def check(self) -> None:
        """The decode loop runs in this process; a failing step fails its requests, not the engine."""

    async def close(self) -> None:
        await self._scheduler.close()
