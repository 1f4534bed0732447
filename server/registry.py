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
    reward_models: dict[str, Loaded[RewardModelInfo]]  # by member name, in the order given

    @property
    def fingerprint(self) -> str:
        """OpenAI's system_fingerprint: changes whenever any checkpoint does."""
        versions = [self.policy.info.version, *(rm.info.version for rm in self.reward_models.values())]
        return "bon-" + "-".join(versions)

    def reward_model_label(self) -> tuple[str, str]:
        """(paths, versions) as the candidate log and model card name the reward side: one model's
        own, or "name=..." per member, comma-separated."""
        if len(self.reward_models) == 1:
            [only] = self.reward_models.values()
            return str(only.info.path), only.info.version
        paths = ",".join(f"{name}={rm.info.path}" for name, rm in self.reward_models.items())
        versions = ",".join(f"{name}={rm.info.version}" for name, rm in self.reward_models.items())
        return paths, versions


class Checkpoints:
    """The serving checkpoints, and the engines that release them."""

    def __init__(
        self,
        policy: Loaded[PolicyInfo],
        reward_models: dict[str, Loaded[RewardModelInfo]],
        sampler: Sampler,
        scorer: RewardScorer,
    ):
        self.policy = policy
        self.reward_models = dict(reward_models)
        self._sampler = sampler
        self._scorer = scorer

    def current(self) -> Pinned:
        """What serves now, unpinned: for reading names and versions, not for running a request."""
        return Pinned(self.policy, dict(self.reward_models))

    @asynccontextmanager
    async def pinned(self) -> AsyncIterator[Pinned]:
        """The current checkpoints, held until the block ends."""
        view = self.current()
        held: list[Loaded] = [view.policy, *view.reward_models.values()]
        for loaded in held:
            loaded.holders += 1
        try:
            yield view
        finally:
            for loaded in held:
                loaded.holders -= 1
            await self._release_if_done(*held)

    async def swap(
        self,
        policy: Loaded[PolicyInfo] | None = None,
        reward_models: dict[str, Loaded[RewardModelInfo]] | None = None,
    ) -> None:
        """Serve new requests with new checkpoints (reward models by member name, each replacing
        its namesake); pinned requests keep the old ones until they finish."""
        old: list[Loaded] = []
        if policy is not None:
            old.append(self.policy)
            self.policy = policy
        for name, loaded in (reward_models or {}).items():
            old.append(self.reward_models[name])
            self.reward_models[name] = loaded
        for loaded in old:
            loaded.retired = True
        await self._release_if_done(*old)

    async def _release_if_done(self, *loaded: Loaded) -> None:
        for item in loaded:
            if item.retired and item.holders == 0:
                item.retired = False  # released once, whoever gets here first
                engine = self._sampler if isinstance(item.info, PolicyInfo) else self._scorer
                await engine.release(item.weights)
