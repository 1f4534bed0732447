"""Swapping in new checkpoints without a restart: `POST /admin/reload` and `--watch DIR`.

A new checkpoint is loaded and test-run beside the serving one; only if both succeed does the
service switch. Requests admitted before the switch finish on the models they started with
(they hold pinned views); a checkpoint that fails to load is refused and the old one keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from server import metrics
from server.engines.contract import SampleRequest, SamplingParams
from server.engines.hf.decoding import generate
from server.policy import Policy, load_policy
from server.reward import RewardModel, load_reward_model
from server.service import BestOfN

log = logging.getLogger(__name__)


class ReloadRefused(Exception):
    """The checkpoint could not be loaded or run; the message says why. Nothing was swapped."""


def _smoke_test(policy: Policy | None, reward_model: RewardModel | None) -> None:
    """One tiny forward through each new model, off the serving path."""
    if policy is not None:
        ids = policy.tokenizer("Hello").input_ids or [policy.tokenizer.bos_token_id or 0]
        generate(
            policy.model,
            policy.tokenizer,
            [SampleRequest(ids, 1, SamplingParams(max_tokens=1))],
            policy.eos_ids,
        )
    if reward_model is not None:
        reward_model.score([reward_model.encode("Hello", None, " world")])


class Reloader:
    def __init__(self, service: BestOfN, device: str, dtype: str):
        self.service = service
        self.device, self.dtype = device, dtype
        self._lock = asyncio.Lock()  # one reload at a time
        self._refused: set[Path] = set()  # watched directories that failed, not retried

    def _load(self, policy_dir: str | None, rm_dir: str | None) -> tuple[Policy | None, RewardModel | None]:
        policy = load_policy(policy_dir, self.device, self.dtype) if policy_dir else None
        reward_model = load_reward_model(rm_dir, self.device, self.dtype) if rm_dir else None
        _smoke_test(policy, reward_model)
        return policy, reward_model

    async def reload(self, policy_dir: str | None = None, rm_dir: str | None = None) -> dict:
        async with self._lock:
            try:
                policy, reward_model = await asyncio.to_thread(self._load, policy_dir, rm_dir)
            except Exception as error:  # whatever the checkpoint did wrong, the old models keep serving
                for role, given in (("policy", policy_dir), ("reward_model", rm_dir)):
                    if given:
                        metrics.RELOADS.labels(role=role, outcome="refused").inc()
                raise ReloadRefused(str(error)) from error
            old = self.service.policy, self.service.reward_model
            self.service.swap(policy, reward_model)
            for role, new, previous in (("policy", policy, old[0]), ("reward_model", reward_model, old[1])):
                if new is not None:
                    metrics.MODEL_INFO.remove(role, str(previous.path), previous.version)
                    metrics.MODEL_INFO.labels(role=role, path=str(new.path), version=new.version).set(1)
                    metrics.RELOADS.labels(role=role, outcome="loaded").inc()
                    log.info("reloaded %s: %s (version %s)", role, new.path, new.version)
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
                    log.error(
                        "watched checkpoint %s refused, still serving %s: %s",
                        newest,
                        self.service.policy.path,
                        error,
                    )
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
