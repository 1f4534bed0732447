"""Reward scoring batched across requests by token budget, like sampling."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate, pairwise

from server.engines.hf.batching import TokenBudgetBatcher
from server.engines.hf.sampler import split_by
from server.reward import RewardModel


@dataclass
class ScoreJob:
    inputs: list[list[int]]  # RM token ids
    reward_model: RewardModel  # pinned at request start, so a reload never mixes models in a request


class BatchedScorer:
    def __init__(self, max_batch_tokens: int, max_queued: int):
        self._batcher: TokenBudgetBatcher[ScoreJob, list[float]] = TokenBudgetBatcher(
            self._run, max_batch_tokens, max_queued, stage="scoring"
        )

    def _run(self, jobs: list[ScoreJob]) -> list[list[float]]:
        """Score every job's inputs in one forward per reward model and split the rewards per job."""
        results: list[list[float]] = [[] for _ in jobs]
        for indices in split_by(jobs, lambda j: j.reward_model).values():
            group = [jobs[i] for i in indices]
            rewards = group[0].reward_model.score([ids for job in group for ids in job.inputs])
            bounds = [0, *accumulate(len(job.inputs) for job in group)]
            for i, (start, end) in zip(indices, pairwise(bounds), strict=True):
                results[i] = rewards[start:end]
        return results

    async def score(self, inputs: list[list[int]], reward_model: RewardModel) -> list[float]:
        """Rewards of `inputs` (RM token ids), in order."""
        job = ScoreJob(inputs, reward_model)
        return await self._batcher.submit(job, sum(len(ids) for ids in inputs), sequences=len(inputs))

    async def close(self) -> None:
        await self._batcher.close()
