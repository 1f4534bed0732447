"""The best-of-N pipeline: sample best_of candidates, score each, rank, return the top n, log them all.

It runs on the checkpoints a request pinned (server/registry.py), after admission checked and
tokenized it (server/admission.py); choosing among candidates is server/selection.py's.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

from server import metrics
from server.admission import Admission, draws
from server.engines.contract import Candidate, RewardScorer, Sampler, SampleRequest, SamplingParams
from server.log.records import CompletionRecord, RequestRecord
from server.log.sample_log import SampleLog
from server.process_reward import DEFAULT_AGGREGATE, DEFAULT_DELIMITER
from server.prompts import Prompt, render_messages, reward_input
from server.registry import Loaded, Pinned
from server.rejection import EarlyRejection, continuation, joined
from server.reward import Messages, Reward, RewardModelInfo, check_finite, read_steps
from server.rules import RuleRunner
from server.search import Beam, BeamSearch, Expansion, expand, round_params
from server.seeds import expansion_seed, prompt_seed
from server.selection import MAX, Choice, Combination, Selection, choose, combine, keep_best

# How long a request waits for room in the candidate log's queue before it fails (503).
LOG_ROOM_SECONDS = 5.0


@dataclass
class ScoredCandidate:
    candidate: Candidate
    score: Reward  # of the candidate as it stands: a pruned one's is its partial reward
    rank: int  # 0 = best
    reward_truncated: bool
    pruned: bool = False  # partial (early rejection, beam search): never returned, ranked after the rest
    generated: int | None = None  # a beam expansion's own decoded tokens; None: all of token_ids

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
        """Tokens decoded for this prompt: a beam search's expansions share their lineage's."""
        return sum(
            len(c.candidate.token_ids) if c.generated is None else c.generated for c in self.candidates
        )


@dataclass(frozen=True)
class Options:
    """A request's choices beyond sampling: how candidates are drawn, read and chosen."""

    rejection: EarlyRejection | None = None
    selection: Selection = MAX
    step_aggregate: str | None = None  # None: the server's --step-aggregate
    search: BeamSearch | None = None


@dataclass
class _Drawn:
    """One prompt's candidates in sampling order, their rewards, which are partial, and (beam search)
    the tokens decoded for each."""

    candidates: list[Candidate]
    scores: _Scores
    pruned: list[bool]
    generated: list[int] | None = None


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
        step_aggregate: str = DEFAULT_AGGREGATE,
        step_delimiter: str = DEFAULT_DELIMITER,
    ):
        self.step_aggregate = step_aggregate  # a process reward model's rule, unless a request names one
        self.step_delimiter = step_delimiter  # where beam search ends a step
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
        step_aggregate: str | None = None,
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
        return await self.combined(pinned, inputs, texts, step_aggregate)

    async def _read(
        self, loaded: Loaded[RewardModelInfo], inputs: list[list[int]], step_aggregate: str
    ) -> list[Reward]:
        """One reward model's raw rewards of its inputs (a PRM's: its step scores aggregated by
        `step_aggregate`); NonFiniteReward for NaN or inf."""
        rewards = check_finite(await self.scorer.score(inputs, loaded.weights), loaded.info.path)
        return rewards if loaded.info.steps is None else read_steps(rewards, step_aggregate)

    async def combined(
        self,
        pinned: Pinned,
        inputs: dict[str, list[list[int]]],
        texts: list[tuple[str, str, str | None]] | None,
        step_aggregate: str | None = None,
    ) -> list[Reward]:
        """Every member's reward of each input, and their combination; a PRM member's step scores
        (the first, when there are several) ride along as the result's `steps`.

        Args:
            inputs: reward model name -> its token ids of each input.
            texts: (prompt text, completion, reference) of each input, for the rules; None leaves
                the rules out (a body that does not separate prompt and completion).
            step_aggregate: how PRM members turn step scores into one reward (None: the server's).
        """
        rule = step_aggregate or self.step_aggregate
        rules = list(self.rules.rules) if texts is not None else []
        texts = texts or []
        names = [*inputs, *rules]
        reads = [self._read(pinned.reward_models[name], ids, rule) for name, ids in inputs.items()]
        by_prompt: dict[tuple[str, str | None], list[int]] = {}  # a rule call per prompt, not per input
        for index, (prompt, _, reference) in enumerate(texts):
            by_prompt.setdefault((prompt, reference), []).append(index)
        calls = [
            self.rules.rewards(name, prompt, [texts[i][1] for i in indices], reference)
            for name in rules
            for (prompt, reference), indices in by_prompt.items()
        ]
        values = await gather_or_cancel(*reads, *calls)
        read: dict[str, list[Reward]] = dict(zip(inputs, values[: len(reads)], strict=True))
        raw = {name: [r.value for r in rewards] for name, rewards in read.items()}
        chunks = iter(values[len(reads) :])
        for name in rules:
            raw[name] = [0.0] * len(texts)
            for indices in by_prompt.values():
                for i, value in zip(indices, next(chunks), strict=True):
                    raw[name][i] = value
        stats = {name: loaded.info.stats for name, loaded in pinned.reward_models.items()}
        combined = combine({name: raw[name] for name in names}, stats, self.combination)
        process = [rewards for name, rewards in read.items() if pinned.reward_models[name].info.steps]
        for i, reward in enumerate(combined):
            reward.steps = process[0][i].steps if process else None
        return combined

    async def run(
        self,
        pinned: Pinned,
        request_id: str,
        prompts: list[Prompt],
        params: SamplingParams,
        n: int,
        best_of: int,
        log: bool,
        options: Options = Options(),
    ) -> list[BestOfNResult]:
        # One prompt refused (a full queue) or failed: the request fails, so its other prompts
        # must not go on sampling and scoring for nobody.
        results = await gather_or_cancel(
            *(
                self._one(pinned, p, params, n, best_of, options, prompt_seed(params.seed, i))
                for i, p in enumerate(prompts)
            )
        )
        if log and self.sample_log is not None:
            # Before the response: what is acknowledged is queued, and the queue is bounded.
            record = request_record(
                pinned, request_id, results, params, best_of, options, self.step_aggregate
            )
            await self.sample_log.append_when_room(record, LOG_ROOM_SECONDS)
        return list(results)

    async def _sample(
        self, pinned: Pinned, prompt_ids: list[int], params: SamplingParams, best_of: int
    ) -> list[Candidate]:
        rows = draws(params, best_of)
        request = SampleRequest(prompt_ids, rows, params, weights=pinned.policy.weights)
        candidates = await self.sampler.sample(request)
        # Greedy: the one decoded completion stands for every candidate (copies, not shared objects).
        return [*candidates, *(replace(candidates[0]) for _ in range(best_of - rows))]

    async def _rewards(
        self, pinned: Pinned, prompt: Prompt, candidates: list[Candidate], step_aggregate: str
    ) -> _Scores:
        models = pinned.reward_models
        fitted = await self.admission.tokenize(
            lambda: {
                name: [reward_input(rm.info, prompt, c.text) for c in candidates]
                for name, rm in models.items()
            }
        )
        inputs = {name: [i.token_ids for i in rows] for name, rows in fitted.items()}
        texts = [(prompt.text, c.text, prompt.reference) for c in candidates]
        rewards = await self.combined(pinned, inputs, texts, step_aggregate)
        # Truncated for any reward model: the reward was read on part of the text.
        truncated = [any(rows[i].truncated for rows in fitted.values()) for i in range(len(candidates))]
        return _Scores(rewards, truncated)

    async def _sample_and_prune(
        self,
        pinned: Pinned,
        prompt: Prompt,
        params: SamplingParams,
        best_of: int,
        rejection: EarlyRejection,
        step_aggregate: str,
    ) -> _Drawn:
        """Early rejection (server/rejection.py): candidates, their rewards, and which were pruned."""
        partial = replace(params, max_tokens=rejection.after_tokens)
        candidates = await self._sample(pinned, prompt.token_ids, partial, best_of)
        scores = await self._rewards(pinned, prompt, candidates, step_aggregate)
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
            finals = await self._rewards(pinned, prompt, [candidates[i] for i in going], step_aggregate)
            for j, i in enumerate(going):
                scores.rewards[i], scores.truncated[i] = finals.rewards[j], finals.truncated[j]
        pruned = [i in unfinished and i not in going for i in range(best_of)]
        metrics.PRUNED.inc(sum(pruned))
        return _Drawn(candidates, scores, pruned)

    async def _expand(
        self,
        pinned: Pinned,
        prompt: Prompt,
        params: SamplingParams,
        beams: list[Beam],
        children: int,
        delimiter: str | None,
        round_index: int,
    ) -> list[Expansion]:
        """One round of beam search: `children` expansions of each beam, by one step (to the end
        when `delimiter` is None)."""
        policy = pinned.policy.info
        texts = [beam.text for beam in beams]
        # The answer so far re-tokenized: the prompt the policy goes on from.
        prompts = await self.admission.tokenize(
            partial(reprompted, policy.tokenizer, prompt.token_ids, texts)
        )
        rounds = [
            round_params(params, beam, delimiter, expansion_seed(params.seed, round_index, i), room)
            for i, (beam, room) in enumerate(
                zip(beams, [policy.context_length - len(ids) for ids in prompts], strict=True)
            )
        ]
        drawn = await gather_or_cancel(
            *(self._sample(pinned, ids, p, children) for ids, p in zip(prompts, rounds, strict=True))
        )
        return [
            expand(beam, child, params, delimiter, policy.tokenizer, policy.eos_ids)
            for beam, kids in zip(beams, drawn, strict=True)
            for child in kids
        ]

    async def _beam_search(
        self,
        pinned: Pinned,
        prompt: Prompt,
        params: SamplingParams,
        best_of: int,
        search: BeamSearch,
        step_aggregate: str,
    ) -> _Drawn:
        """Step-level beam search (server/search.py): every expansion of every round, in order."""
        beams, children = [Beam("", [])], best_of
        made: list[Expansion] = []
        scores = _Scores([], [])
        for round_index in range(search.max_steps):
            delimiter = None if round_index == search.max_steps - 1 else self.step_delimiter
            expansions = await self._expand(pinned, prompt, params, beams, children, delimiter, round_index)
            read = await self._rewards(pinned, prompt, [e.candidate for e in expansions], step_aggregate)
            made += expansions
            scores.rewards += read.rewards
            scores.truncated += read.truncated
            unfinished = [i for i, e in enumerate(expansions) if not e.finished]
            going = keep_best(read.values(), unfinished, search.survivors(best_of))
            beams = [Beam(expansions[i].candidate.text, expansions[i].candidate.token_ids) for i in going]
            children = search.beam_width
            if not beams:
                break
        pruned = [not e.finished for e in made]
        metrics.PRUNED.inc(sum(pruned))
        return _Drawn([e.candidate for e in made], scores, pruned, [e.generated for e in made])

    async def _draw(
        self, pinned: Pinned, prompt: Prompt, params: SamplingParams, best_of: int, options: Options
    ) -> _Drawn:
        aggregate_rule = options.step_aggregate or self.step_aggregate
        if options.search is not None:
            return await self._beam_search(pinned, prompt, params, best_of, options.search, aggregate_rule)
        rejection = options.rejection
        if rejection is not None and rejection.prunes(params, best_of):
            return await self._sample_and_prune(pinned, prompt, params, best_of, rejection, aggregate_rule)
        candidates = await self._sample(pinned, prompt.token_ids, params, best_of)
        scores = await self._rewards(pinned, prompt, candidates, aggregate_rule)
        return _Drawn(candidates, scores, [False] * best_of)

    async def _one(
        self,
        pinned: Pinned,
        prompt: Prompt,
        params: SamplingParams,
        n: int,
        best_of: int,
        options: Options,
        seed: int | None,
    ) -> BestOfNResult:
        drawn = await self._draw(pinned, prompt, params, best_of, options)
        candidates, scores, pruned = drawn.candidates, drawn.scores, drawn.pruned
        generated: list[int | None] = (
            [None] * len(candidates) if drawn.generated is None else [*drawn.generated]
        )
        rewards = scores.values()
        tokens = [len(c.token_ids) for c in candidates]
        choice = choose(rewards, tokens, [c.text for c in candidates], pruned, n, options.selection, seed)
        scored = [
            ScoredCandidate(c, reward, rank, truncated, p, g)
            for c, reward, truncated, rank, p, g in zip(
                candidates,
                scores.rewards,
                scores.truncated,
                choice.ranking.ranks,
                pruned,
                generated,
                strict=True,
            )
        ]
        chosen = choice.chosen

        metrics.PROMPT_TOKENS.inc(len(prompt.token_ids))
        metrics.CANDIDATES.observe(len(candidates))
        policy_version = pinned.policy.info.version
        versions = {name: rm.info.version for name, rm in pinned.reward_models.items()}
        for s in scored:
            metrics.CANDIDATE_REWARD.labels(policy_version=policy_version).observe(s.reward)
            for name, value in s.score.members.items():
                metrics.MEMBER_REWARD.labels(member=name, version=versions.get(name, "rule")).observe(value)
            metrics.RM_TRUNCATED.inc(int(s.reward_truncated))
        for index in chosen:
            metrics.RETURNED_REWARD.labels(policy_version=policy_version).observe(rewards[index])
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
    best_of: int,
    options: Options,
    step_aggregate: str = DEFAULT_AGGREGATE,
) -> RequestRecord:
    """The candidate log's record of one request: every candidate of every prompt."""
    rejection, selection = options.rejection, options.selection
    params_logged: dict[str, Any] = {
        "max_tokens": params.max_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k,
        "stop": list(params.stop),
        "seed": params.seed,
        "best_of": best_of,
        "n": len(results[0].chosen),
        "early_rejection": rejection.logged() if rejection is not None else None,
        "selection": {**selection.logged(), "chosen": [result.chosen for result in results]},
    }
    if selection.rule == "vote":
        params_logged["selection"] |= {"groups": [groups_out(result.choice) for result in results]}
    if options.search is not None:
        params_logged["search"] = options.search.logged()
    if any(rm.info.steps is not None for rm in pinned.reward_models.values()):
        params_logged["step_aggregate"] = options.step_aggregate or step_aggregate
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
                step_rewards=s.score.steps,
                generated_tokens=s.generated,
            )
            for prompt_index, result in enumerate(results)
            for index, s in enumerate(result.candidates)
        ],
    )


def reprompted(tokenizer, prompt_ids: list[int], texts: list[str]) -> list[list[int]]:
    """The prompt followed by each partial answer, tokenized as the policy would read it."""
    return [prompt_ids + tokenizer(text, add_special_tokens=False).input_ids for text in texts]


def groups_out(choice: Choice) -> list[dict]:
    """vote's groups as the response and the log show them, heaviest first."""
    return [{"answer": g.answer, "size": len(g.members), "weight": g.weight} for g in choice.groups or []]
