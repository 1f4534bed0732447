"""The transformers engine behind the `Sampler` interface: batched, prefix-shared, on CPU or GPU."""

from __future__ import annotations

from server.engines.contract import Candidate, SampleRequest
from server.engines.hf.batching import TokenBudgetBatcher
from server.engines.hf.decoding import generate
from server.policy import Policy


def split_by(items: list, key) -> dict[int, list[int]]:
    """Indices of `items` grouped by id(key(item)), in order: one model call per loaded version."""
    groups: dict[int, list[int]] = {}
    for index, item in enumerate(items):
        groups.setdefault(id(key(item)), []).append(index)
    return groups


class TransformersSampler:
    """`SampleRequest.weights` is a `Policy`; requests for different policies (across a reload)
    may share a batch window and are then decoded in one call per policy."""

    def __init__(self, policy: Policy, max_batch_tokens: int, max_queued: int, gather_seconds: float = 0.0):
        self.policy = policy
        self._batcher: TokenBudgetBatcher[SampleRequest, list[Candidate]] = TokenBudgetBatcher(
            self._run, max_batch_tokens, max_queued, stage="sampling", gather_seconds=gather_seconds
        )

    def _run(self, requests: list[SampleRequest]) -> list[list[Candidate]]:
        results: list[list[Candidate]] = [[] for _ in requests]
        for indices in split_by(requests, lambda r: r.weights).values():
            policy: Policy = requests[indices[0]].weights
            batch = generate(policy.model, policy.tokenizer, [requests[i] for i in indices], policy.eos_ids)
            for i, candidates in zip(indices, batch, strict=True):
                results[i] = candidates
        return results

    async def sample(self, request: SampleRequest) -> list[Candidate]:
        if request.weights is None:
            request.weights = self.policy
        # Budget: the prompt is prefilled once; each of the n rows may grow by max_tokens.
        cost = len(request.prompt_ids) + request.n * request.params.max_tokens
        return await self._batcher.submit(request, cost, sequences=request.n)

    async def close(self) -> None:
        await self._batcher.close()
