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
from server.engines.contract import RewardScorer, Sampler
from server.failures import ReloadRefused
from server.policy import PolicyInfo, read_policy
from server.registry import Checkpoints, Loaded
from server.reward import RewardModelInfo, read_reward_model

log = logging.getLogger(__name__)


class Reloader:
    def __init__(self, checkpoints: Checkpoints, sampler: Sampler, scorer: RewardScorer):
        self.checkpoints = checkpoints
        self.sampler, self.scorer = sampler, scorer
        self._lock = asyncio.Lock()  # one reload at a time
        self._refused: set[Path] = set()  # watched directories that failed, not retried

    async def _load(
        self, policy_dir: str | None, rm_dir: str | None
    ) -> tuple[Loaded[PolicyInfo] | None, Loaded[RewardModelInfo] | None]:
        """Both new checkpoints loaded in their engines, or neither (what loaded is released)."""
        policy: Loaded[PolicyInfo] | None = None
        reward_model: Loaded[RewardModelInfo] | None = None
        try:
            if policy_dir:
                policy_info = await asyncio.to_thread(read_policy, policy_dir)
                policy = Loaded(policy_info, await self.sampler.load(policy_info))
            if rm_dir:
                rm_info = await asyncio.to_thread(read_reward_model, rm_dir)
                reward_model = Loaded(rm_info, await self.scorer.load(rm_info))
        except Exception:
            if policy is not None:
                await self.sampler.release(policy.weights)
            raise
        return policy, reward_model

    async def reload(self, policy_dir: str | None = None, rm_dir: str | None = None) -> dict:
        async with self._lock:
            try:
                policy, reward_model = await self._load(policy_dir, rm_dir)
            except Exception as error:  # whatever the checkpoint did wrong, the old models keep serving
                for role, given in (("policy", policy_dir), ("reward_model", rm_dir)):
                    if given:
                        metrics.RELOADS.labels(role=role, outcome="refused").inc()
                still = self.loaded()
                raise ReloadRefused(
                    f"checkpoint refused, still serving policy {still['policy']['path']} and reward model "
                    f"{still['reward_model']['path']}: {error}"
                ) from error
            old = self.checkpoints.current()
            await self.checkpoints.swap(policy, reward_model)
            for role, new, previous in (
                ("policy", policy, old.policy.info),
                ("reward_model", reward_model, old.reward_model.info),
            ):
                if new is not None:
                    metrics.MODEL_INFO.remove(role, str(previous.path), previous.version)
                    metrics.MODEL_INFO.labels(
                        role=role, path=str(new.info.path), version=new.info.version
                    ).set(1)
                    metrics.RELOADS.labels(role=role, outcome="loaded").inc()
                    log.info("reloaded %s: %s (version %s)", role, new.info.path, new.info.version)
            return self.loaded()

    def loaded(self) -> dict:
        now = self.checkpoints.current()
        return {
            role: {"path": str(loaded.info.path), "version": loaded.info.version}
            for role, loaded in (("policy", now.policy), ("reward_model", now.reward_model))
        }

    async def watch(self, directory: Path, interval: float) -> None:
        """Serve the newest complete checkpoint published under `directory` as the policy.

        Publishers (the RAFT trainer) write a temporary directory and rename it into place, so any
        visible subdirectory with a config.json is complete. Dot-directories are in-progress.
        """
        while True:
            newest = _newest_checkpoint(directory)
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


def _newest_checkpoint(directory: Path) -> Path | None:
    if not directory.is_dir():
        return None
    candidates = [
        p.resolve()
        for p in directory.iterdir()
        if p.is_dir() and not p.name.startswith(".") and (p / "config.json").is_file()
    ]
    return max(candidates, key=lambda p: p.stat().st_mtime_ns, default=None)
