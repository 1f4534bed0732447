"""The best-of-N pipeline: sample best_of candidates, score each, rank, return the top n, log them all.

It runs on the checkpoints a request pinned (server/registry.py), after admission checked and
tokenized it (server/admission.py); choosing among candidates is server/selection.py's.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, replace
from typing import Any

from server import metrics
from server.admission import Admission, draws
from server.engines.contract import Candidate, RewardScorer, Sampler, SampleRequest, SamplingParams
from server.log.sample_log import CompletionRecord, RequestRecord, SampleLog
from server.prompts import Prompt, render_messages, reward_input
from server.registry import Loaded, Pinned
from server.rejection import EarlyRejection, continuation, joined
from server.reward import Messages, Reward, RewardModelInfo, check_finite
from server.rules import RuleRunner
from server.seeds import prompt_seed
from server.selection import MAX, Choice, Combination, Selection, choose, combine, keep_best

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
    choice: Choice  # how they were chosen: the rule, and vote's groups

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
        self,
        sampler: Sampler,
        scorer: RewardScorer,
        sample_log: SampleLog | None,
        admission: Admission,
        combination: Combination,
        rules: RuleRunner,
    ):
        self.sampler = sampler
        self.scorer = scorer
        self.sample_log = sample_log
        self.admission = admission  # its tokenizing thread: RM inputs are tokenized there too
        self.combination = combination
        self.rules = rules

    async def check(self) -> None:
        """Raise EngineDead when either engine can no longer serve."""
        await self.sampler.check()
        await self.scorer.check()

    def members(self, pinned: Pinned) -> list[str]:
        """Every reward member's name: the reward models, then the rules."""
        return [*pinned.reward_models, *self.rules.rules]

    async def score_pairs(
        self,
        pinned: Pinned,
        pairs: list[tuple[str | Messages, str]],
        references: list[str | None],
        field: str,
    ) -> list[Reward]:
        """`/v1/score`: each (prompt, response) pair's Reward, every member's input admitted whole."""
        policy_tokenizer = pinned.policy.info.tokenizer
        inputs = {
            name: await self.admission.score_inputs(rm.info, policy_tokenizer, pairs, field)
            for name, rm in pinned.reward_models.items()
        }
        texts = [
            (
                prompt if isinstance(prompt, str) else render_messages(policy_tokenizer, prompt),
                response,
                reference,
            )
            for (prompt, response), reference in zip(pairs, references, strict=True)
        ]
        return await self.combined(pinned, inputs, texts)

    async def _read(self, loaded: Loaded[RewardModelInfo], inputs: list[list[int]]) -> list[float]:
        """One reward model's raw rewards of its inputs; NonFiniteReward for NaN or inf."""
        rewards = await self.scorer.score(inputs, loaded.weights)
        return [r.value for r in check_finite(rewards, loaded.info.path)]

    async def combined(
        self,
        pinned: Pinned,
        inputs: dict[str, list[list[int]]],
        texts: list[tuple[str, str, str | None]] | None,
    ) -> list[Reward]:
        """Every member's reward of each input, and their combination.

        Args:
            inputs: reward model name -> its token ids of each input.
            texts: (prompt text, completion, reference) of each input, for the rules; None leaves
                the rules out (a body that does not separate prompt and completion).
        """
        rules = list(self.rules.rules) if texts is not None else []
        texts = texts or []
        names = [*inputs, *rules]
        reads = [self._read(pinned.reward_models[name], ids) for name, ids in inputs.items()]
        by_prompt: dict[tuple[str, str | None], list[int]] = {}  # a rule call per prompt, not per input
        for index, (prompt, _, reference) in enumerate(texts):
            by_prompt.setdefault((prompt, reference), []).append(index)
        calls = [
            self.rules.rewards(name, prompt, [texts[i][1] for i in indices], reference)
            for name in rules
            for (prompt, reference), indices in by_prompt.items()
        ]
        values = await gather_or_cancel(*reads, *calls)
        raw = dict(zip(inputs, values[: len(reads)], strict=True))
        chunks = iter(values[len(reads) :])
        for name in rules:
            raw[name] = [0.0] * len(texts)
            for indices in by_prompt.values():
                for i, value in zip(indices, next(chunks), strict=True):
                    raw[name][i] = value
        stats = {name: loaded.info.stats for name, loaded in pinned.reward_models.items()}
        return combine({name: raw[name] for name in names}, stats, self.combination)

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
        selection: Selection = MAX,
    ) -> list[BestOfNResult]:
        # One prompt refused (a full queue) or failed: the request fails, so its other prompts
        # must not go on sampling and scoring for nobody.
        results = await gather_or_cancel(
            *(
                self._one(pinned, p, params, n, best_of, rejection, selection, prompt_seed(params.seed, i))
                for i, p in enumerate(prompts)
            )
        )
        if log and self.sample_log is not None:
            # Before the response: what is acknowledged is queued, and the queue is bounded.
            record = request_record(pinned, request_id, results, params, rejection, selection)
            await self.sample_log.append_when_room(record, LOG_ROOM_SECONDS)
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
        models = pinned.reward_models
        fitted = await self.admission.tokenize(
            lambda: {
                name: [reward_input(rm.info, prompt, c.text) for c in candidates]
                for name, rm in models.items()
            }
        )
        inputs = {name: [i.token_ids for i in rows] for name, rows in fitted.items()}
        texts = [(prompt.text, c.text, prompt.reference) for c in candidates]
        rewards = await self.combined(pinned, inputs, texts)
        # Truncated for any reward model: the reward was read on part of the text.
        truncated = [any(rows[i].truncated for rows in fitted.values()) for i in range(len(candidates))]
        return _Scores(rewards, truncated)

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
        selection: Selection,
        seed: int | None,
    ) -> BestOfNResult:
        if rejection is not None and rejection.prunes(params, best_of):
            candidates, scores, pruned = await self._sample_and_prune(
                pinned, prompt, params, best_of, rejection
            )
        else:
            candidates = await self._sample(pinned, prompt, params, best_of)
            scores, pruned = await self._rewards(pinned, prompt, candidates), [False] * best_of
        rewards = scores.values()
        tokens = [len(c.token_ids) for c in candidates]
        choice = choose(rewards, tokens, [c.text for c in candidates], pruned, n, selection, seed)
        scored = [
            ScoredCandidate(c, reward, rank, truncated, p)
            for c, reward, truncated, rank, p in zip(
                candidates, scores.rewards, scores.truncated, choice.ranking.ranks, pruned, strict=True
            )
        ]
        chosen = choice.chosen

        metrics.PROMPT_TOKENS.inc(len(prompt.token_ids))
        metrics.CANDIDATES.observe(best_of)
        for s in scored:
            metrics.CANDIDATE_REWARD.observe(s.reward)
            for name, value in s.score.members.items():
                metrics.MEMBER_REWARD.labels(member=name).observe(value)
            metrics.RM_TRUNCATED.inc(int(s.reward_truncated))
        for index in chosen:
            metrics.RETURNED_REWARD.observe(rewards[index])
        result = BestOfNResult(prompt, scored, chosen, choice)
        metrics.GENERATED_TOKENS.inc(result.completion_tokens)
        return result

    async def close(self) -> None:
        await self.sampler.close()
        await self.scorer.close()
        self.rules.close()


def request_record(
    pinned: Pinned,
    request_id: str,
    results: list[BestOfNResult],
    params: SamplingParams,
    rejection: EarlyRejection | None,
    selection: Selection = MAX,
) -> RequestRecord:
    """The candidate log's record of one request: every candidate of every prompt."""
    params_logged: dict[str, Any] = {
        "max_tokens": params.max_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k,
        "stop": list(params.stop),
        "seed": params.seed,
        "best_of": len(results[0].candidates),
        "n": len(results[0].chosen),
        "early_rejection": rejection.logged() if rejection is not None else None,
        "selection": {**selection.logged(), "chosen": [result.chosen for result in results]},
    }
    if selection.rule == "vote":
        params_logged["selection"] |= {"groups": [groups_out(result.choice) for result in results]}
    if any(result.prompt.reference is not None for result in results):
        params_logged["references"] = [result.prompt.reference for result in results]
    reward_models, reward_model_versions = pinned.reward_model_label()
    return RequestRecord(
        request_id=request_id,
        params=params_logged,
        policy=str(pinned.policy.info.path),
        policy_version=pinned.policy.info.version,
        reward_model=reward_models,
        reward_model_version=reward_model_versions,
        created=time.time(),
        prompts=[(result.prompt.logged(), len(result.prompt.token_ids)) for result in results],
        completions=[
            CompletionRecord(
                prompt_index=prompt_index,
                candidate_index=index,
                completion=s.candidate.text,
                reward=s.reward,
                rewards=s.score.members,
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


def groups_out(choice: Choice) -> list[dict]:
    """vote's groups as the response and the log show them, heaviest first."""
    return [{"answer": g.answer, "size": len(g.members), "weight": g.weight} for g in choice.groups or []]
