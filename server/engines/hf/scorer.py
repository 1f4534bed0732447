"""The transformers engine behind the `RewardScorer` contract: batched across requests by padded
tokens, on the engine-independent scheduler."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from itertools import accumulate, pairwise
from typing import cast

from server.engines.hf.models import HFRewardModel
from server.engines.hf.process import HFProcessRewardModel, load_any_reward_weights
from server.engines.scheduler import Scheduler
from server.failures import CheckpointError, NonFiniteReward
from server.reward import Reward, RewardModelInfo, check_finite, probe_input


@dataclass
class ScoreJob:
    inputs: list[list[int]]  # RM token ids
    # Pinned at request start, so a reload never mixes models in a request.
    reward_model: HFRewardModel | HFProcessRewardModel


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


def group_by_identity(items: list, key) -> dict[int, list[int]]:
    """Indices of `items` grouped by id(key(item)), in order: one model call per loaded checkpoint,
    since requests admitted across a reload may share a step."""
    groups: dict[int, list[int]] = {}
    for index, item in enumerate(items):
        groups.setdefault(id(key(item)), []).append(index)
    return groups


def padded_tokens(chunk: list[list[int]]) -> int:
    """What a forward over `chunk` computes: every row padded to the longest."""
    return len(chunk) * max(map(len, chunk))


class Forward:
    """The scheduler's backend: one forward per reward model over every job admitted."""

    def joins(self, job: ScoreJob, holding: ScoreJob | None) -> bool:
        return True  # jobs on different reward models share a step, one forward each

    def step(self, joining: list[ScoreJob]) -> list[tuple[ScoreJob, list[Reward]]]:
        """Score every job's inputs in one forward per reward model and split the rewards per job."""
        results: list[list[Reward]] = [[] for _ in joining]
        for indices in group_by_identity(joining, lambda j: j.reward_model).values():
            group = [joining[i] for i in indices]
            rewards = group[0].reward_model.rewards([ids for job in group for ids in job.inputs])
            bounds = [0, *accumulate(len(job.inputs) for job in group)]
            for i, (start, end) in zip(indices, pairwise(bounds), strict=True):
                results[i] = rewards[start:end]
        return list(zip(joining, results, strict=True))

    def alone(self, job: ScoreJob) -> list[Reward]:
        [(_, rewards)] = self.step([job])
        return rewards

    def reset(self) -> None:
        """Nothing is held between steps."""


class TransformersScorer:
    def __init__(self, device: str, dtype: str, max_batch_tokens: int, max_queued: int):
        self.device, self.dtype = device, dtype
        self._max_batch_tokens = max_batch_tokens
        self._scheduler: Scheduler[ScoreJob, list[Reward]] = Scheduler(
            Forward(), max_batch_tokens, max_queued, stage="scoring"
        )

    def _load(self, info: RewardModelInfo) -> HFRewardModel | HFProcessRewardModel:
        reward_model = load_any_reward_weights(info, self.device, self.dtype)
        try:
            check_finite(reward_model.rewards([probe_input(info)]), info.path)
        except NonFiniteReward as error:
            raise CheckpointError(error.message) from None
        return reward_model

    async def load(self, reward_model: RewardModelInfo) -> HFRewardModel | HFProcessRewardModel:
        return await asyncio.to_thread(self._load, reward_model)

    async def score(self, inputs: list[list[int]], weights: object) -> list[Reward]:
        """Inputs go to the batcher in chunks of at most one batch budget, one after another: a
        large request takes turns with the others, and if its client leaves, the chunks not yet
        submitted are never run."""
        rewards: list[Reward] = []
        for chunk in token_budget_chunks(inputs, self._max_batch_tokens):
            job = ScoreJob(chunk, cast(HFRewardModel | HFProcessRewardModel, weights))
            rewards += await self._scheduler.submit(job, padded_tokens(chunk), sequences=len(chunk))
        return rewards

    async def release(self, weights: object) -> None:
        """Nothing to do: the batcher holds no reference once the last request is answered."""

    async def check(self) -> None:
        """Scoring runs in this process; a failing batch fails its requests, not the engine."""

    async def close(self) -> None:
        await self._scheduler.close()
