"""The transformers engine behind the `RewardScorer` contract: batched across requests by tokens."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from itertools import accumulate, pairwise

from server.engines.hf.batching import TokenBudgetBatcher, group_by_identity
from server.engines.hf.models import HFRewardModel, load_reward_weights
from server.failures import CheckpointError, NonFiniteReward
from server.reward import RewardModelInfo, check_finite, probe_input


@dataclass
class ScoreJob:
    inputs: list[list[int]]  # RM token ids
    reward_model: HFRewardModel  # pinned at request start, so a reload never mixes models in a request


def token_budget_chunks(inputs: list[list[int]], budget: int) -> list[list[list[int]]]:
    """Consecutive runs of inputs whose padded batch (rows x the longest) is at most `budget`
    tokens (an input over it runs alone). Padded, because that is what the forward computes: fed
    inputs sorted by length, the chunks stay near the budget with little padding in each."""
    chunks: list[list[list[int]]] = []
    longest = 0
    for ids in inputs:
        if not chunks or (len(chunks[-1]) + 1) * max(longest, len(ids)) > budget:
            chunks.append([])
            longest = 0
        chunks[-1].append(ids)
        longest = max(longest, len(ids))
    return chunks


class TransformersScorer:
    def __init__(self, device: str, dtype: str, max_batch_tokens: int, max_queued: int):
        self.device, self.dtype = device, dtype
        self._max_batch_tokens = max_batch_tokens
        self._batcher: TokenBudgetBatcher[ScoreJob, list[float]] = TokenBudgetBatcher(
            self._run, max_batch_tokens, max_queued, stage="scoring"
        )

    def _load(self, info: RewardModelInfo) -> HFRewardModel:
        reward_model = load_reward_weights(info, self.device, self.dtype)
        try:
            check_finite(reward_model.score([probe_input(info)]), info.path)
        except NonFiniteReward as error:
            raise CheckpointError(error.message) from None
        return reward_model

    async def load(self, reward_model: RewardModelInfo) -> HFRewardModel:
        return await asyncio.to_thread(self._load, reward_model)

    def _run(self, jobs: list[ScoreJob]) -> list[list[float]]:
        """Score every job's inputs in one forward per reward model and split the rewards per job."""
        results: list[list[float]] = [[] for _ in jobs]
        for indices in group_by_identity(jobs, lambda j: j.reward_model).values():
            group = [jobs[i] for i in indices]
            rewards = group[0].reward_model.score([ids for job in group for ids in job.inputs])
            bounds = [0, *accumulate(len(job.inputs) for job in group)]
            for i, (start, end) in zip(indices, pairwise(bounds), strict=True):
                results[i] = rewards[start:end]
        return results

    async def score(self, inputs: list[list[int]], weights: object) -> list[float]:
        """Inputs go to the batcher in chunks of at most one batch budget, one after another: a
        large request takes turns with the others, and if its client leaves, the chunks not yet
        submitted are never run."""
        rewards: list[float] = []
        for chunk in token_budget_chunks(inputs, self._max_batch_tokens):
            job = ScoreJob(chunk, weights)
            rewards += await self._batcher.submit(job, sum(len(ids) for ids in chunk), sequences=len(chunk))
        return rewards

    async def release(self, weights: object) -> None:
        """Nothing to do: the batcher holds no reference once the last request is answered."""

    async def check(self) -> None:
        """Scoring runs in this process; a failing batch fails its requests, not the engine."""

    async def close(self) -> None:
        await self._batcher.close()
