"""Engines, checkpoints and the candidate log put together: `bon serve` and `bon generate` start
the same service this one way."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from server.admission import Admission, Limits
from server.engines.contract import RewardScorer, Sampler
from server.log.sample_log import SampleLog
from server.policy import PolicyInfo
from server.registry import Checkpoints, Loaded
from server.reward import RewardModelInfo
from server.service import BestOfN
from server.settings import Settings


@dataclass
class Service:
    """The three parts a request goes through: the checkpoints it pins, admission, the pipeline."""

    checkpoints: Checkpoints
    admission: Admission
    best_of_n: BestOfN

    @property
    def sample_log(self) -> SampleLog | None:
        return self.best_of_n.sample_log

    async def close(self) -> None:
        await self.best_of_n.close()
        self.admission.close()


async def start_service(
    settings: Settings,
    policy: PolicyInfo,
    reward_model: RewardModelInfo,
    sampler: Sampler,
    scorer: RewardScorer,
) -> Service:
    """Load both checkpoints into their engines and open the candidate log; on a failed load both
    engines are closed and the error raised."""
    # Both at once: an engine start is mostly waiting (processes, imports, warm-up).
    loads = await asyncio.gather(sampler.load(policy), scorer.load(reward_model), return_exceptions=True)
    failed = [error for error in loads if isinstance(error, BaseException)]
    if failed:
        await sampler.close()
        await scorer.close()
        raise failed[0]
    sample_log = (
        None if settings.no_sample_log else SampleLog(settings.sample_log, settings.sample_log_flush_seconds)
    )
    admission = Admission(
        Limits(
            max_best_of=settings.max_best_of,
            max_batch_tokens=settings.max_batch_tokens,
            max_prompts=settings.max_queued_prompts,
            max_score_inputs=settings.max_score_inputs,
            max_score_tokens=settings.max_score_tokens,
        )
    )
    return Service(
        checkpoints=Checkpoints(Loaded(policy, loads[0]), Loaded(reward_model, loads[1]), sampler, scorer),
        admission=admission,
        best_of_n=BestOfN(sampler, scorer, sample_log, admission),
    )
