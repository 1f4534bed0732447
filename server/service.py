"""Best-of-N for one request: sample best_of, score each, rank, return the top n, log them all.

The service holds the engines (a `Sampler` and a `RewardScorer`) and the loaded checkpoints. Each
request pins the checkpoints it was admitted with; a reload swaps in new ones for later requests,
and the old weights are released once the last request holding them is answered.
"""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Generic, TypeVar

from server import metrics
from server.engines.contract import (
    Candidate,
    RewardScorer,
    Sampler,
    SampleRequest,
    SamplingParams,
    sampling_cost,
)
from server.failures import ContextTooLong, InvalidInput
from server.log.sample_log import CompletionRecord, RequestRecord, SampleLog
from server.policy import PolicyInfo
from server.prompts import (
    Prompt,
    chat_prompt,
    render_messages,
    reward_input,
    scoring_chars,
    scoring_input,
    text_prompt,
)
from server.rejection import EarlyRejection, continuation, joined
from server.reward import Messages, RewardInput, RewardModelInfo, check_finite
from server.selection import rank_by_reward, rank_with_pruned_last, ranks_of

Info = TypeVar("Info", PolicyInfo, RewardModelInfo)

# How long a request waits for room in the candidate log's queue before it fails (503).
LOG_ROOM_SECONDS = 5.0


@dataclass(eq=False)
class Loaded(Generic[Info]):
    """A checkpoint loaded in an engine: what the service knows of it, and the engine's handle."""

    info: Info
    weights: object  # opaque: whatever the engine's `load` returned
    holders: int = 0  # requests pinned to it right now
    retired: bool = False  # swapped out: released when the last holder lets go


@dataclass
class ScoredCandidate:
    candidate: Candidate
    reward: float  # of the candidate as it stands: a pruned one's is its partial reward
    rank: int
    reward_truncated: bool
    pruned: bool = False  # stopped by early rejection: never returned, ranked after the rest


@dataclass
class BestOfNResult:
    """One prompt's outcome: all candidates in sampling order and the indices chosen, best first."""

    prompt: Prompt
    candidates: list[ScoredCandidate]
    chosen: list[int]

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.candidate.token_ids) for c in self.candidates)


def draws(params: SamplingParams, best_of: int) -> int:
    """Distinct candidates to decode. Temperature 0 is greedy and has exactly one completion, so with
    best_of > 1 it is decoded once and stands for every candidate (vLLM refuses greedy n > 1;
    decoding the same row best_of times would only cost more)."""
    return 1 if params.temperature == 0 else best_of


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
    """Holds the engines and the loaded checkpoints; every route goes through it."""

    def __init__(
        self,
        policy: Loaded[PolicyInfo],
        reward_model: Loaded[RewardModelInfo],
        sampler: Sampler,
        scorer: RewardScorer,
        sample_log: SampleLog | None,
        max_best_of: int,
        max_batch_tokens: int,
        max_prompts: int,
        max_score_inputs: int,
        max_score_tokens: int,
    ):
        self.loaded_policy = policy
        self.loaded_reward_model = reward_model
        self.sampler = sampler
        self.scorer = scorer
        self.sample_log = sample_log
        self.max_best_of = max_best_of
        self.max_batch_tokens = max_batch_tokens
        self.max_prompts = max_prompts
        self.max_score_inputs = max_score_inputs
        self.max_score_tokens = max_score_tokens
        # Tokenizing a long text takes long enough to stall every other request if it ran on the
        # event loop. One thread: a fast tokenizer must not be called from two threads at once
        # (its Rust side raises "Already borrowed").
        self._tokenizing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bon-tokenize")

    @property
    def policy(self) -> PolicyInfo:
        return self.loaded_policy.info

    @property
    def reward_model(self) -> RewardModelInfo:
        return self.loaded_reward_model.info

    # --- checkpoints: pinning, swapping, releasing ----------------------------------------------

    @asynccontextmanager
    async def pinned(self) -> AsyncIterator[BestOfN]:
        """A view whose checkpoints stay fixed for one request, whatever reloads happen meanwhile;
        it shares the engines and the log."""
        view = copy.copy(self)
        held = (view.loaded_policy, view.loaded_reward_model)
        for loaded in held:
            loaded.holders += 1
        try:
            yield view
        finally:
            for loaded in held:
                loaded.holders -= 1
            await self._release_if_done(*held)

    async def swap(
        self, policy: Loaded[PolicyInfo] | None = None, reward_model: Loaded[RewardModelInfo] | None = None
    ) -> None:
        """Serve new requests with new checkpoints; pinned views keep the old ones until they finish."""
        old = []
        if policy is not None:
            old.append(self.loaded_policy)
            self.loaded_policy = policy
        if reward_model is not None:
            old.append(self.loaded_reward_model)
            self.loaded_reward_model = reward_model
        for loaded in old:
            loaded.retired = True
        await self._release_if_done(*old)

    async def _release_if_done(self, *loaded: Loaded) -> None:
        for item in loaded:
            if item.retired and item.holders == 0:
                item.retired = False  # released once, whoever gets here first
                engine = self.sampler if isinstance(item.info, PolicyInfo) else self.scorer
                await engine.release(item.weights)

    async def check(self) -> None:
        """Raise EngineDead when either engine can no longer serve."""
        await self.sampler.check()
        await self.scorer.check()

    # --- prompt preparation (policy side) -------------------------------------------------------

    async def tokenize(self, work: Callable):
        """Run `work` (any tokenizer calls) on the tokenizing thread."""
        return await asyncio.get_running_loop().run_in_executor(self._tokenizing, work)

    def _check_chars(self, chars: int, limit: int, tokens: int, field: str, name: str | None = None) -> None:
        if chars > limit:
            raise ContextTooLong(
                f"{name or field} is {chars} characters: no text over {limit} characters fits the "
                f"{tokens}-token context, so it was not tokenized",
                field,
            )

    def text_prompt(self, text: str) -> Prompt:
        return text_prompt(self.policy.tokenizer, text)

    async def text_prompts(self, texts: list[str]) -> list[Prompt]:
        """A completions request's prompts: their count and size checked, then tokenized."""
        self.check_prompts(len(texts))
        for text in texts:
            self._check_chars(len(text), self.policy.max_prompt_chars, self.policy.context_length, "prompt")
        tokenizer = self.policy.tokenizer
        return await self.tokenize(lambda: [text_prompt(tokenizer, text) for text in texts])

    async def chat_prompt(self, messages: Messages) -> Prompt:
        chars = sum(len(m["content"]) for m in messages)
        self._check_chars(chars, self.policy.max_prompt_chars, self.policy.context_length, "messages")
        tokenizer = self.policy.tokenizer
        return await self.tokenize(lambda: chat_prompt(tokenizer, messages))

    def render_messages(self, messages: Messages) -> str:
        return render_messages(self.policy.tokenizer, messages)

    def resolve_max_tokens(self, prompts: list[Prompt], requested: int | None, default: int) -> int:
        """The request's max_tokens, or the server default clamped to what the context leaves."""
        longest = max(len(p.token_ids) for p in prompts)
        room = self.policy.context_length - longest
        # Blame the prompt when it leaves no room at all, else the max_tokens asked for.
        param = "max_tokens" if room >= 1 else "messages" if prompts[0].messages is not None else "prompt"
        if room < 1 or (requested is not None and requested > room):
            asked = requested if requested is not None else 1
            raise ContextTooLong(
                f"the policy's maximum context length is {self.policy.context_length} tokens, but "
                f"{longest + asked} were requested ({longest} in the prompt, {asked} to generate)",
                param,
            )
        return requested if requested is not None else min(default, room)

    def check_prompts(self, count: int) -> None:
        """A request with more prompts than the queue holds could never be admitted: 400, not 429."""
        if count > self.max_prompts:
            raise InvalidInput(
                f"the request has {count} prompts; this server takes at most {self.max_prompts} at once "
                "(--max-queued-prompts)",
                "prompt",
            )

    def check_best_of(self, best_of: int, params: SamplingParams, prompts: list[Prompt]) -> None:
        if best_of > self.max_best_of:
            raise InvalidInput(
                f"best_of is {best_of}; this server allows at most {self.max_best_of}", "best_of"
            )
        rows = draws(params, best_of)
        need = sampling_cost(max(len(p.token_ids) for p in prompts), rows, params.max_tokens)
        if need > self.max_batch_tokens:
            raise InvalidInput(
                f"one prompt needs {need} tokens of batch budget (prompt + {rows} candidates x "
                f"max_tokens {params.max_tokens}) but --max-batch-tokens is {self.max_batch_tokens}",
                "max_tokens",
            )

    # --- reward side ------------------------------------------------------------------------------

    def reward_input(self, prompt: Prompt, completion: str) -> RewardInput:
        return reward_input(self.reward_model, prompt, completion)

    async def score(self, inputs: list[list[int]]) -> list[float]:
        """Rewards of RM inputs with this view's reward model; NonFiniteReward for NaN or inf."""
        rewards = await self.scorer.score(inputs, self.loaded_reward_model.weights)
        return check_finite(rewards, self.reward_model.path)

    async def score_inputs(self, pairs: list[tuple[str | Messages, str]], field: str) -> list[list[int]]:
        """RM inputs for `/v1/score`: (prompt text or messages, response) pairs, checked against the
        limits (count, characters, context, total tokens) and never truncated."""
        rm = self.reward_model
        if len(pairs) > self.max_score_inputs:
            raise InvalidInput(
                f"{field} has {len(pairs)} entries; this server scores at most {self.max_score_inputs} "
                "per request (--max-score-inputs)",
                field,
            )
        for index, (prompt, response) in enumerate(pairs):
            self._check_chars(
                scoring_chars(prompt, response), rm.max_chars, rm.max_length, field, f"{field}[{index}]"
            )

        policy_tokenizer = self.policy.tokenizer

        def encode() -> list[list[int]]:
            return [scoring_input(rm, prompt, response, policy_tokenizer) for prompt, response in pairs]

        inputs = await self.tokenize(encode)
        for index, ids in enumerate(inputs):
            if len(ids) > rm.max_length:
                raise ContextTooLong(
                    f"{field}[{index}] is {len(ids)} tokens for the reward model, over its limit of "
                    f"{rm.max_length}; /v1/score does not truncate",
                    field,
                )
        total = sum(len(ids) for ids in inputs)
        if total > self.max_score_tokens:
            raise InvalidInput(
                f"{field} comes to {total} reward-model tokens; this server scores at most "
                f"{self.max_score_tokens} per request (--max-score-tokens)",
                field,
            )
        return inputs

    # --- the pipeline ---------------------------------------------------------------------------

    async def run(
        self,
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
        results = await gather_or_cancel(*(self._one(p, params, n, best_of, rejection) for p in prompts))
        if log and self.sample_log is not None:
            # Before the response: what is acknowledged is queued, and the queue is bounded.
            await self.sample_log.append_when_room(
                self._record(request_id, results, params, rejection), LOG_ROOM_SECONDS
            )
        return list(results)

    async def _sample(self, prompt: Prompt, params: SamplingParams, best_of: int) -> list[Candidate]:
        rows = draws(params, best_of)
        request = SampleRequest(prompt.token_ids, rows, params, weights=self.loaded_policy.weights)
        candidates = await self.sampler.sample(request)
        # Greedy: the one decoded completion stands for every candidate (copies, not shared objects).
        return [*candidates, *(replace(candidates[0]) for _ in range(best_of - rows))]

    async def _rewards(self, prompt: Prompt, candidates: list[Candidate]) -> list[tuple[float, bool]]:
        """(reward, truncated) of each candidate as it stands."""
        inputs = await self.tokenize(lambda: [self.reward_input(prompt, c.text) for c in candidates])
        rewards = await self.score([i.token_ids for i in inputs])
        return [(r, i.truncated) for r, i in zip(rewards, inputs, strict=True)]

    async def _sample_and_prune(
        self, prompt: Prompt, params: SamplingParams, best_of: int, rejection: EarlyRejection
    ) -> tuple[list[Candidate], list[tuple[float, bool]], list[bool]]:
        """Early rejection (server/rejection.py): candidates, their rewards, and which were pruned."""
        candidates = await self._sample(prompt, replace(params, max_tokens=rejection.after_tokens), best_of)
        rewards = await self._rewards(prompt, candidates)
        # Cut at the decision point ("length"), not ended by eos or a stop string: unfinished. The
        # finished ones are complete and cost nothing more, so only the unfinished compete to go on.
        unfinished = [i for i, c in enumerate(candidates) if c.finish_reason == "length"]
        by_reward = rank_by_reward([rewards[i][0] for i in unfinished])
        going = sorted(unfinished[j] for j in by_reward[: rejection.survivors(best_of)])
        weights = self.loaded_policy.weights
        rests = await gather_or_cancel(
            *(
                self.sampler.sample(continuation(prompt.token_ids, candidates[i], params, i, weights))
                for i in going
            )
        )
        tokenizer, eos_ids = self.policy.tokenizer, self.policy.eos_ids
        survivors = await self.tokenize(
            lambda: [
                joined(candidates[i], rest, params.stop, tokenizer, eos_ids)
                for i, [rest] in zip(going, rests, strict=True)
            ]
        )
        for i, survivor in zip(going, survivors, strict=True):
            candidates[i] = survivor
        if going:
            finals = await self._rewards(prompt, [candidates[i] for i in going])
            for i, reward in zip(going, finals, strict=True):
                rewards[i] = reward
        pruned = [i in unfinished and i not in going for i in range(best_of)]
        metrics.PRUNED.inc(sum(pruned))
        return candidates, rewards, pruned

    async def _one(
        self, prompt: Prompt, params: SamplingParams, n: int, best_of: int, rejection: EarlyRejection | None
    ) -> BestOfNResult:
        if rejection is not None and rejection.prunes(params, best_of):
            candidates, scores, pruned = await self._sample_and_prune(prompt, params, best_of, rejection)
        else:
            candidates = await self._sample(prompt, params, best_of)
            scores, pruned = await self._rewards(prompt, candidates), [False] * best_of
        rewards = [r for r, _ in scores]
        order = rank_with_pruned_last(rewards, pruned)
        ranks = ranks_of(order)
        scored = [
            ScoredCandidate(c, r, rank, truncated, p)
            for c, (r, truncated), rank, p in zip(candidates, scores, ranks, pruned, strict=True)
        ]
        chosen = order[:n]

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

    def _record(
        self,
        request_id: str,
        results: list[BestOfNResult],
        params: SamplingParams,
        rejection: EarlyRejection | None,
    ) -> RequestRecord:
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
            policy=str(self.policy.path),
            policy_version=self.policy.version,
            reward_model=str(self.reward_model.path),
            reward_model_version=self.reward_model.version,
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

    @property
    def fingerprint(self) -> str:
        return f"bon-{self.policy.version}-{self.reward_model.version}"

    async def close(self) -> None:
        await self.sampler.close()
        await self.scorer.close()
        self._tokenizing.shutdown(wait=False)
