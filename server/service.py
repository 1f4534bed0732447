"""The best-of-N pipeline: sample best_of candidates, score each, rank, return the top n, log them all.

It runs on the checkpoints a request pinned (server/registry.py), after admission checked and
tokenized it (server/admission.py); choosing among candidates is server/selection.py's.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, replace

from server import metrics
from server.admission import Admission, draws
from server.engines.contract import Candidate, RewardScorer, Sampler, SampleRequest, SamplingParams
from server.log.sample_log import CompletionRecord, RequestRecord, SampleLog
from server.prompts import Prompt, reward_input
from server.registry import Pinned
from server.rejection import EarlyRejection, continuation, joined
from server.reward import Reward, check_finite
from server.selection import keep_best, rank_candidates

# How long a request waits for room in the candidate log's queue before it fails (503).
LOG_ROOM_SECONDS = 5.0


@dataclass
class ScoredCandidate:
    candidate: Candidate
    score: Reward  # of the candidate as it stands: a pruned one's is its partial reward
    rank: int  # 0 = best
    reward_truncated: bool
    pruned: bool = False  # stopped by early rejection: never returned, ranked after the rest

    @property
    def reward(self) -> float:
        return self.score.value


@dataclass
class BestOfNResult:
    """One prompt's outcome: all candidates in sampling order and the indices chosen, best first."""

    prompt: Prompt
    candidates: list[ScoredCandidate]
    chosen: list[int]

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.candidate.token_ids) for c in self.candidates)


@dataclass
class _Scores:
    """Rewards of one prompt's candidates as they stand, and whether each RM input was truncated."""

    rewards: list[Reward]
    truncated: list[bool]

    def values(self) -> list[float]:
        return [r.value for r in self.rewards]


async def gather_or_cancel(*awaitables):
    """asyncio.gather that cancels the rest when one fails: work nobody will use stops."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        raise


class BestOfN:
    """The pipeline over the engines; every request passes the checkpoints it pinned."""

    def __init__(
        self, sampler: Sampler, scorer: RewardScorer, sample_log: SampleLog | None, admission: Admission
    ):
        self.sampler = sampler
        self.scorer = scorer
        self.sample_log = sample_log
        self.admission = admission  # its tokenizing thread: RM inputs are tokenized there too

    async def check(self) -> None:
        """Raise EngineDead when either engine can no longer serve."""
        await self.sampler.check()
        await self.scorer.check()

    async def score(self, pinned: Pinned, inputs: list[list[int]]) -> list[Reward]:
        """Rewards of RM inputs with the pinned reward model; NonFiniteReward for NaN or inf."""
        rewards = await self.scorer.score(inputs, pinned.reward_model.weights)
        return check_finite(rewards, pinned.reward_model.info.path)

    async def run(
        self,
        pinned: Pinned,
        request_id: str,
        prompts: list[Prompt],
        params: SamplingParams,
        n: int,
        best_of: int,
        log: bool,
        rejection: EarlyRejection | None = None,
    ) -> list[BestOfNResult]:
        # One prompt refused (a full queue) or failed: the request fails, so its other prompts
        # must not go on sampling and scoring for nobody.
        results = await gather_or_cancel(
            *(self._one(pinned, p, params, n, best_of, rejection) for p in prompts)
        )
        if log and self.sample_log is not None:
            # Before the response: what is acknowledged is queued, and the queue is bounded.
            await self.sample_log.append_when_room(
                request_record(pinned, request_id, results, params, rejection), LOG_ROOM_SECONDS
            )
        return list(results)

    async def _sample(
        self, pinned: Pinned, prompt: Prompt, params: SamplingParams, best_of: int
    ) -> list[Candidate]:
        rows = draws(params, best_of)
        request = SampleRequest(prompt.token_ids, rows, params, weights=pinned.policy.weights)
        candidates = await self.sampler.sample(request)
        # Greedy: the one decoded completion stands for every candidate (copies, not shared objects).
        return [*candidates, *(replace(candidates[0]) for _ in range(best_of - rows))]

    async def _rewards(self, pinned: Pinned, prompt: Prompt, candidates: list[Candidate]) -> _Scores:
        rm = pinned.reward_model.info
        inputs = await self.admission.tokenize(lambda: [reward_input(rm, prompt, c.text) for c in candidates])
        rewards = await self.score(pinned, [i.token_ids for i in inputs])
        return _Scores(rewards, [i.truncated for i in inputs])

    async def _sample_and_prune(
        self, pinned: Pinned, prompt: Prompt, params: SamplingParams, best_of: int, rejection: EarlyRejection
    ) -> tuple[list[Candidate], _Scores, list[bool]]:
        """Early rejection (server/rejection.py): candidates, their rewards, and which were pruned."""
        partial = replace(params, max_tokens=rejection.after_tokens)
        candidates = await self._sample(pinned, prompt, partial, best_of)
        scores = await self._rewards(pinned, prompt, candidates)
        # Cut at the decision point ("length"), not ended by eos or a stop string: unfinished. The
        # finished ones are complete and cost nothing more, so only the unfinished compete to go on.
        unfinished = [i for i, c in enumerate(candidates) if c.finish_reason == "length"]
        going = keep_best(scores.values(), unfinished, rejection.survivors(best_of))
        weights = pinned.policy.weights
        rests = await gather_or_cancel(
            *(
                self.sampler.sample(continuation(prompt.token_ids, candidates[i], params, i, weights))
                for i in going
            )
        )
        tokenizer, eos_ids = pinned.policy.info.tokenizer, pinned.policy.info.eos_ids
        survivors = await self.admission.tokenize(
            lambda: [
                joined(candidates[i], rest, params.stop, tokenizer, eos_ids)
                for i, [rest] in zip(going, rests, strict=True)
            ]
        )
        for i, survivor in zip(going, survivors, strict=True):
            candidates[i] = survivor
        if going:
            finals = await self._rewards(pinned, prompt, [candidates[i] for i in going])
            for j, i in enumerate(going):
                scores.rewards[i], scores.truncated[i] = finals.rewards[j], finals.truncated[j]
        pruned = [i in unfinished and i not in going for i in range(best_of)]
        metrics.PRUNED.inc(sum(pruned))
        return candidates, scores, pruned

    async def _one(
        self,
        pinned: Pinned,
        prompt: Prompt,
        params: SamplingParams,
        n: int,
        best_of: int,
        rejection: EarlyRejection | None,
    ) -> BestOfNResult:
        if rejection is not None and rejection.prunes(params, best_of):
            candidates, scores, pruned = await self._sample_and_prune(
                pinned, prompt, params, best_of, rejection
            )
        else:
            candidates = await self._sample(pinned, prompt, params, best_of)
            scores, pruned = await self._rewards(pinned, prompt, candidates), [False] * best_of
        rewards = scores.values()
        ranking = rank_candidates(rewards, pruned)
        scored = [
            ScoredCandidate(c, reward, rank, truncated, p)
            for c, reward, truncated, rank, p in zip(
                candidates, scores.rewards, scores.truncated, ranking.ranks, pruned, strict=True
            )
        ]
        chosen = ranking.top(n)

        metrics.PROMPT_TOKENS.inc(len(prompt.token_ids))
        metrics.CANDIDATES.observe(best_of)
        for s in scored:
            metrics.CANDIDATE_REWARD.observe(s.reward)
            metrics.RM_TRUNCATED.inc(int(s.reward_truncated))
        for index in chosen:
            metrics.RETURNED_REWARD.observe(rewards[index])
        result = BestOfNResult(prompt, scored, chosen)
        metrics.GENERATED_TOKENS.inc(result.completion_tokens)
        return result

    async def close(self) -> None:
        await self.sampler.close()
        await self.scorer.close()


def request_record(
    pinned: Pinned,
    request_id: str,
    results: list[BestOfNResult],
    params: SamplingParams,
    rejection: EarlyRejection | None,
) -> RequestRecord:
    """The candidate log's record of one request: every candidate of every prompt."""
    params_logged = {
        "max_tokens": params.max_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k,
        "stop": list(params.stop),
        "seed": params.seed,
        "best_of": len(results[0].candidates),
        "n": len(results[0].chosen),
        "early_rejection": rejection.logged() if rejection is not None else None,
    }
    return RequestRecord(
        request_id=request_id,
        params=params_logged,
        policy=str(pinned.policy.info.path),
        policy_version=pinned.policy.info.version,
        reward_model=str(pinned.reward_model.info.path),
        reward_model_version=pinned.reward_model.info.version,
        created=time.time(),
        prompts=[(result.prompt.logged(), len(result.prompt.token_ids)) for result in results],
        completions=[
            CompletionRecord(
                prompt_index=prompt_index,
                candidate_index=index,
                completion=s.candidate.text,
                reward=s.reward,
                rank=s.rank,
                finish_reason=s.candidate.finish_reason,
                completion_tokens=len(s.candidate.token_ids),
                reward_truncated=s.reward_truncated,
                pruned=s.pruned,
            )
            for prompt_index, result in enumerate(results)
            for index, s in enumerate(result.candidates)
        ],
    )
