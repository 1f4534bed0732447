"""The transformers engine behind the `Sampler` interface: batched, prefix-shared, on CPU or GPU."""

from __future__ import annotations

from server.batching import TokenBudgetBatcher
from server.decoding import generate
from server.policy import Policy
from server.sampling import Candidate, SampleRequest


class TransformersSampler:
    def __init__(self, policy: Policy, max_batch_tokens: int, max_queued: int, gather_seconds: float = 0.0):
        self.policy = policy
        self._batcher: TokenBudgetBatcher[SampleRequest, list[Candidate]] = TokenBudgetBatcher(
            self._run, max_batch_tokens, max_queued, stage="sampling", gather_seconds=gather_seconds
        )

    @property
    def context_length(self) -> int:
        return self.policy.context_length

    def _run(self, requests: list[SampleRequest]) -> list[list[Candidate]]:
        policy = self.policy  # one policy for the whole batch, even if another is swapped in meanwhile
        return generate(policy.model, policy.tokenizer, requests, policy.eos_ids)

    async def sample(self, request: SampleRequest) -> list[Candidate]:
        # Budget: the prompt is prefilled once; each of the n rows may grow by max_tokens.
        cost = len(request.prompt_ids) + request.n * request.params.max_tokens
        return await self._batcher.submit(request, cost, sequences=request.n)

    async def close(self) -> None:
        await self._batcher.close()
