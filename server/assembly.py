"""Engines, checkpoints and the candidate log put together: `bon serve` and `bon generate` start
the same service this one way."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from server.admission import Admission, Limits
from server.engines.contract import RewardScorer, Sampler
from server.log.sample_log import SampleLog
from server.policy import PolicyInfo
from server.registry import Checkpoints, Loaded
from server.reward import RewardModelInfo
from server.rules import Rule, RuleRunner
from server.selection import Combination
from server.service import BestOfN
from server.settings import Settings

log = logging.getLogger(__name__)


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
    reward_models: dict[str, RewardModelInfo],
    sampler: Sampler,
    scorer: RewardScorer,
    rules: list[Rule] | None = None,
) -> Service:
    """Load every checkpoint into its engine and open the candidate log; on a failed load the
    engines are closed and the error raised.

    Args:
        reward_models: by member name, in the order given.
        rules: rule reward members (`--reward-function`), loaded by the caller.
    """
    # All at once: an engine start is mostly waiting (processes, imports, warm-up).
    loads = await asyncio.gather(
        sampler.load(policy), *(scorer.load(rm) for rm in reward_models.values()), return_exceptions=True
    )
    failed = [error for error in loads if isinstance(error, BaseException)]
    if failed:
        await sampler.close()
        await scorer.close()
        raise failed[0]
    for name, rm in reward_models.items():
        if rm.stats is None and len(reward_models) + len(rules or []) > 1:
            log.warning(
                "reward model %s (%s) ships no reward_stats.json: it enters the combination raw",
                name,
                rm.path,
            )
    sample_log = (
        None
        if settings.no_sample_log
        else SampleLog(settings.sample_log, settings.sample_log_flush_seconds, replica=settings.replica_id)
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
    loaded = {
        name: Loaded(rm, weights)
        for (name, rm), weights in zip(reward_models.items(), loads[1:], strict=True)
    }
    combination = Combination(
        settings.reward_combine, settings.weights(), settings.reward_uncertainty_penalty
    )
    runner = RuleRunner(rules or [], settings.reward_function_timeout_seconds)
    return Service(
        checkpoints=Checkpoints(Loaded(policy, loads[0]), loaded, sampler, scorer),
        admission=admission,
        best_of_n=BestOfN(
            sampler,
            scorer,
            sample_log,
            admission,
            combination,
            runner,
            settings.step_aggregate,
            settings.step_delimiter,
        ),
    )
