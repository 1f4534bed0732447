"""The transformers engine behind the `Sampler` contract: batched, prefix-shared, on CPU or GPU."""

from __future__ import annotations

import asyncio

from server.engines.contract import Candidate, SampleRequest, SamplingParams, sampling_cost
from server.engines.hf.batching import TokenBudgetBatcher, group_by_identity
from server.engines.hf.decoding import generate
from server.engines.hf.models import HFPolicy, load_policy_weights
from server.policy import PolicyInfo


class TransformersSampler:
    """Handles are `HFPolicy` objects; requests for different ones (across a reload) may share a
    batch window and are then decoded in one call per policy. Released weights are simply dropped:
    the last request holding them lets them go."""

    def __init__(
        self, device: str, dtype: str, max_batch_tokens: int, max_queued: int, gather_seconds: float = 0.0
    ):
        self.device, self.dtype = device, dtype
        self._batcher: TokenBudgetBatcher[SampleRequest, list[Candidate]] = TokenBudgetBatcher(
            self._run, max_batch_tokens, max_queued, stage="sampling", gather_seconds=gather_seconds
        )

    def _load(self, info: PolicyInfo) -> HFPolicy:
        policy = load_policy_weights(info, self.device, self.dtype)
        ids = info.tokenizer("Hello").input_ids or [info.tokenizer.bos_token_id or 0]
        generate(policy, [SampleRequest(ids, 1, SamplingParams(max_tokens=1), policy)])
        return policy

    async def load(self, policy: PolicyInfo) -> HFPolicy:
        return await asyncio.to_thread(self._load, policy)

    def _run(self, requests: list[SampleRequest]) -> list[list[Candidate]]:
        results: list[list[Candidate]] = [[] for _ in requests]
        for indices in group_by_identity(requests, lambda r: r.weights).values():
            policy: HFPolicy = requests[indices[0]].weights
            batch = generate(policy, [requests[i] for i in indices])
            for i, candidates in zip(indices, batch, strict=True):
                results[i] = candidates
        return results

    async def sample(self, request: SampleRequest) -> list[Candidate]:
        cost = sampling_cost(len(request.prompt_ids), request.n, request.params.max_tokens)
        return await self._batcher.submit(request, cost, sequences=request.n)

    async def release(self, weights: object) -> None:
        """Nothing to do: the batcher holds no reference once the last request is answered."""

    async def check(self) -> None:
        """The decode loop runs in this process; a failing batch fails its requests, not the engine."""

    async def close(self) -> None:
        await self._batcher.close()
