"""Reward scoring batched across requests by token budget, like sampling."""

from __future__ import annotations

from itertools import accumulate, pairwise

from server.batching import TokenBudgetBatcher
from server.reward import RewardModel


class BatchedScorer:
    def __init__(self, reward_model: RewardModel, max_batch_tokens: int, max_queued: int):
        self.reward_model = reward_model
        self._batcher: TokenBudgetBatcher[list[list[int]], list[float]] = TokenBudgetBatcher(
            self._run, max_batch_tokens, max_queued, stage="scoring"
        )

    def _run(self, jobs: list[list[list[int]]]) -> list[list[float]]:
        """Score every job's inputs in one forward and split the rewards back per job."""
        rewards = self.reward_model.score([ids for job in jobs for ids in job])
        bounds = [0, *accumulate(len(job) for job in jobs)]
        return [rewards[start:end] for start, end in pairwise(bounds)]

    async def score(self, inputs: list[list[int]]) -> list[float]:
        """Rewards of `inputs` (RM token ids), in order."""
        return await self._batcher.submit(inputs, sum(len(ids) for ids in inputs), sequences=len(inputs))

    async def close(self) -> None:
        await self._batcher.close()
