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
from server.failures import ReloadRefused
from server.policy import read_policy
from server.reward import read_reward_model
from server.service import BestOfN, Loaded

log = logging.getLogger(__name__)


class Reloader:
    def __init__(self, service: BestOfN):
        self.service = service
        self._lock = asyncio.Lock()  # one reload at a time
        self._refused: set[Path] = set()  # watched directories that failed, not retried

    async def _load(self, policy_dir: str | None, rm_dir: str | None) -> tuple[Loaded | None, Loaded | None]:
        """Both new checkpoints loaded in their engines, or neither (what loaded is released)."""
        policy = reward_model = None
        try:
            if policy_dir:
                info = await asyncio.to_thread(read_policy, policy_dir)
                policy = Loaded(info, await self.service.sampler.load(info))
            if rm_dir:
                info = await asyncio.to_thread(read_reward_model, rm_dir)
                reward_model = Loaded(info, await self.service.scorer.load(info))
        except Exception:
            if policy is not None:
                await self.service.sampler.release(policy.weights)
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
            old = self.service.policy, self.service.reward_model
            await self.service.swap(policy, reward_model)
            for role, new, previous in (("policy", policy, old[0]), ("reward_model", reward_model, old[1])):
                if new is not None:
                    metrics.MODEL_INFO.remove(role, str(previous.path), previous.version)
                    metrics.MODEL_INFO.labels(
                        role=role, path=str(new.info.path), version=new.info.version
                    ).set(1)
                    metrics.RELOADS.labels(role=role, outcome="loaded").inc()
                    log.info("reloaded %s: %s (version %s)", role, new.info.path, new.info.version)
            return self.loaded()

    def loaded(self) -> dict:
        return {
            "policy": {"path": str(self.service.policy.path), "version": self.service.policy.version},
            "reward_model": {
                "path": str(self.service.reward_model.path),
                "version": self.service.reward_model.version,
            },
        }

    async def watch(self, directory: Path, interval: float) -> None:
        """Serve the newest complete checkpoint published under `directory` as the policy.

        Publishers (the RAFT trainer) write a temporary directory and rename it into place, so any
        visible subdirectory with a config.json is complete. Dot-directories are in-progress.
        """
        while True:
            newest = _newest_checkpoint(directory)
            if newest is not None and newest != self.service.policy.path and newest not in self._refused:
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
