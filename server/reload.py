"""Swapping in new checkpoints without a restart: `POST /admin/reload` and `--watch DIR`.

A new checkpoint is read, then loaded and test-run by its engine beside the serving one; only if
that succeeds does the service switch. Requests admitted before the switch finish on the
checkpoints they started with (they pin them); the engine releases the old weights after the last
of them. A checkpoint that fails to load is refused and the old one keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from server import metrics
from server.checkpoints import newest_checkpoint, published_at
from server.engines.contract import RewardScorer, Sampler
from server.failures import InvalidInput, ReloadRefused
from server.policy import PolicyInfo, read_policy
from server.registry import Checkpoints, Loaded
from server.reward import RewardModelInfo, read_reward_model

log = logging.getLogger(__name__)


class Reloader:
    def __init__(self, checkpoints: Checkpoints, sampler: Sampler, scorer: RewardScorer, step_delimiter: str):
        self.checkpoints = checkpoints
        self.step_delimiter = step_delimiter  # what a process reward model loaded here splits steps at
        self.sampler, self.scorer = sampler, scorer
        self._lock = asyncio.Lock()  # one reload at a time
        self._refused: set[Path] = set()  # watched directories that failed, not retried

    async def _load(self, role: str, directory: str) -> Loaded:
        """A new checkpoint read, loaded in its engine and test-run there."""
        if role == "policy":
            policy = await asyncio.to_thread(read_policy, directory)
            return Loaded(policy, await self.sampler.load(policy))
        reward_model = await asyncio.to_thread(read_reward_model, directory, self.step_delimiter)
        return Loaded(reward_model, await self.scorer.load(reward_model))

    async def reload(
        self, policy_dir: str | None = None, reward_models: dict[str, str] | None = None
    ) -> dict:
        """Load and switch to the policy, then each reward member, one at a time (so at most one
        extra checkpoint is in memory). One that fails is refused and its predecessor keeps
        serving; those switched before it stay switched, and the error says what serves."""
        members = reward_models or {}
        if unknown := sorted(set(members) - set(self.checkpoints.reward_models)):
            raise InvalidInput(
                f"no reward member named {', '.join(unknown)}; this server has "
                f"{', '.join(self.checkpoints.reward_models)}",
                "reward_models",
            )
        steps = [("policy", "policy", policy_dir)] if policy_dir else []
        steps += [("reward_model", name, directory) for name, directory in members.items()]
        async with self._lock:
            for role, name, directory in steps:
                try:
                    new = await self._load(role, directory)
                except Exception as error:  # whatever the checkpoint did wrong, the old one keeps serving
                    metrics.RELOADS.labels(role=role, outcome="refused").inc()
                    raise ReloadRefused(
                        f"checkpoint {directory} refused for {name}, still serving {self.serving()}: {error}"
                    ) from error
                old = self.checkpoints.current()
                previous = old.policy if role == "policy" else old.reward_models[name]
                if role == "policy":
                    await self.checkpoints.swap(policy=new)
                else:
                    await self.checkpoints.swap(reward_models={name: new})
                metrics.MODEL_INFO.remove(role, str(previous.info.path), previous.info.version)
                metrics.MODEL_INFO.labels(role=role, path=str(new.info.path), version=new.info.version).set(1)
                if role == "policy":
                    metrics.POLICY_PUBLISHED.set(published_at(new.info.path))
                metrics.RELOADS.labels(role=role, outcome="loaded").inc()
                log.info("reloaded %s: %s (version %s)", name, new.info.path, new.info.version)
            return self.loaded()

    def serving(self) -> str:
        now = self.checkpoints.current()
        return f"policy {now.policy.info.path} and reward models {now.reward_model_label()[0]}"

    def loaded(self) -> dict:
        now = self.checkpoints.current()
        members = {name: _checkpoint(rm.info) for name, rm in now.reward_models.items()}
        return {
            "policy": _checkpoint(now.policy.info),
            "reward_model": next(iter(members.values())),
            "reward_models": members,
        }

    async def watch(self, directory: Path, interval: float) -> None:
        """Serve the newest complete checkpoint published under `directory` as the policy.

        Publishers (the RAFT trainer) write a temporary directory and rename it into place, so any
        visible subdirectory with a config.json is complete. Dot-directories are in-progress.
        """
        while True:
            newest = newest_checkpoint(directory)
            if (
                newest is not None
                and newest != self.checkpoints.policy.info.path
                and newest not in self._refused
            ):
                try:
                    await self.reload(policy_dir=str(newest))
                except ReloadRefused as error:
                    self._refused.add(newest)
                    log.error("watched checkpoint %s refused: %s", newest, error)
            await asyncio.sleep(interval)


def _checkpoint(info: PolicyInfo | RewardModelInfo) -> dict[str, str]:
    return {"path": str(info.path), "version": info.version}
