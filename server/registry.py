"""The checkpoint registry: which policy and reward model serve, pinned per request across reloads.

Each request pins the checkpoints it was admitted with; a reload swaps in new ones for later
requests, and the engine releases the old weights once the last request holding them is answered.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Generic, TypeVar

from server.engines.contract import RewardScorer, Sampler
from server.policy import PolicyInfo
from server.reward import RewardModelInfo

Info = TypeVar("Info", PolicyInfo, RewardModelInfo)


@dataclass(eq=False)
class Loaded(Generic[Info]):
    """A checkpoint loaded in an engine: what the service knows of it, and the engine's handle."""

    info: Info
    weights: object  # opaque: whatever the engine's `load` returned
    holders: int = 0  # requests pinned to it right now
    retired: bool = False  # swapped out: released when the last holder lets go


@dataclass(frozen=True)
class Pinned:
    """The checkpoints one request runs on, whatever reloads happen meanwhile."""

    policy: Loaded[PolicyInfo]
    reward_model: Loaded[RewardModelInfo]

    @property
    def fingerprint(self) -> str:
        """OpenAI's system_fingerprint: changes whenever either checkpoint does."""
        return f"bon-{self.policy.info.version}-{self.reward_model.info.version}"


class Checkpoints:
    """The serving checkpoints, and the engines that release them."""

    def __init__(
        self,
        policy: Loaded[PolicyInfo],
        reward_model: Loaded[RewardModelInfo],
        sampler: Sampler,
        scorer: RewardScorer,
    ):
        self.policy = policy
        self.reward_model = reward_model
        self._sampler = sampler
        self._scorer = scorer

    def current(self) -> Pinned:
        """What serves now, unpinned: for reading names and versions, not for running a request."""
        return Pinned(self.policy, self.reward_model)

    @asynccontextmanager
    async def pinned(self) -> AsyncIterator[Pinned]:
        """The current checkpoints, held until the block ends."""
        view = self.current()
        held = (view.policy, view.reward_model)
        for loaded in held:
            loaded.holders += 1
        try:
            yield view
        finally:
            for loaded in held:
                loaded.holders -= 1
            await self._release_if_done(*held)

    async def swap(
        self, policy: Loaded[PolicyInfo] | None = None, reward_model: Loaded[RewardModelInfo] | None = None
    ) -> None:
        """Serve new requests with new checkpoints; pinned requests keep the old ones until they finish."""
        old: list[Loaded] = []
        if policy is not None:
            old.append(self.policy)
            self.policy = policy
        if reward_model is not None:
            old.append(self.reward_model)
            self.reward_model = reward_model
        for loaded in old:
            loaded.retired = True
        await self._release_if_done(*old)

    async def _release_if_done(self, *loaded: Loaded) -> None:
        for item in loaded:
            if item.retired and item.holders == 0:
                item.retired = False  # released once, whoever gets here first
                engine = self._sampler if isinstance(item.info, PolicyInfo) else self._scorer
                await engine.release(item.weights)
