"""Best-of-N for one request: sample best_of, score each, rank, return the top n, log them all."""

from __future__ import annotations

import asyncio
import copy
import time
from dataclasses import dataclass

from server import metrics
from server.api.errors import APIError
from server.engines.contract import Candidate, Sampler, SampleRequest, SamplingParams
from server.engines.hf.scorer import BatchedScorer
from server.log.sample_log import CandidateRecord, SampleLog
from server.policy import Policy
from server.prompts import Prompt, PromptError, chat_prompt, render_messages, reward_input, text_prompt
from server.reward import Messages, RewardInput, RewardModel
from server.selection import rank_by_reward, ranks_of


@dataclass
class ScoredCandidate:
    candidate: Candidate
    reward: float
    rank: int
    reward_truncated: bool


@dataclass
class BestOfNResult:
    """One prompt's outcome: all candidates in sampling order and the indices chosen, best first."""

    prompt: Prompt
    candidates: list[ScoredCandidate]
    chosen: list[int]

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.candidate.token_ids) for c in self.candidates)


class BestOfN:
    """Holds the engines and the loaded models; every route goes through it."""

    def __init__(
        self,
        policy: Policy,
        reward_model: RewardModel,
        sampler: Sampler,
        scorer: BatchedScorer,
        sample_log: SampleLog | None,
        max_best_of: int,
        max_batch_tokens: int,
    ):
        self.policy = policy
        self.reward_model = reward_model
        self.sampler = sampler
        self.scorer = scorer
        self.sample_log = sample_log
        self.max_best_of = max_best_of
        self.max_batch_tokens = max_batch_tokens

    def pinned(self) -> BestOfN:
        """A view whose policy and reward model stay fixed for one request, whatever reloads
        happen meanwhile; it shares the engines and the log."""
        return copy.copy(self)

    def swap(self, policy: Policy | None = None, reward_model: RewardModel | None = None) -> None:
        """Serve new requests with new models; pinned views keep the old ones until they finish."""
        self.policy = policy or self.policy
        self.reward_model = reward_model or self.reward_model

    # --- prompt preparation (policy side) -------------------------------------------------------

    def text_prompt(self, text: str) -> Prompt:
        try:
            return text_prompt(self.policy.tokenizer, text)
        except PromptError as error:
            raise APIError(400, str(error), error.field) from None

    def chat_prompt(self, messages: Messages) -> Prompt:
        try:
            return chat_prompt(self.policy.tokenizer, messages)
        except PromptError as error:
            raise APIError(400, str(error), error.field) from None

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
            raise APIError(
                400,
                f"the policy's maximum context length is {self.policy.context_length} tokens, but "
                f"{longest + asked} were requested ({longest} in the prompt, {asked} to generate)",
                param,
                "context_length_exceeded",
            )
        return requested if requested is not None else min(default, room)

    def check_best_of(self, best_of: int, max_tokens: int, prompts: list[Prompt]) -> None:
        if best_of > self.max_best_of:
            raise APIError(
                400, f"best_of is {best_of}; this server allows at most {self.max_best_of}", "best_of"
            )
        need = max(len(p.token_ids) for p in prompts) + best_of * max_tokens
        if need > self.max_batch_tokens:
            raise APIError(
                400,
                f"one prompt needs {need} tokens of batch budget (prompt + best_of {best_of} x "
                f"max_tokens {max_tokens}) but --max-batch-tokens is {self.max_batch_tokens}",
                "max_tokens",
            )

    # --- reward side ------------------------------------------------------------------------------

    def reward_input(self, prompt: Prompt, completion: str) -> RewardInput:
        return reward_input(self.reward_model, prompt, completion)

    # --- the pipeline ---------------------------------------------------------------------------

    async def run(
        self,
        request_id: str,
        prompts: list[Prompt],
        params: SamplingParams,
        n: int,
        best_of: int,
        log: bool,
    ) -> list[BestOfNResult]:
        results = await asyncio.gather(*(self._one(p, params, n, best_of) for p in prompts))
        if log and self.sample_log is not None:
            self.sample_log.append(self._records(request_id, results, params))
        return list(results)

    async def _one(self, prompt: Prompt, params: SamplingParams, n: int, best_of: int) -> BestOfNResult:
        request = SampleRequest(prompt.token_ids, best_of, params, weights=self.policy)
        candidates = await self.sampler.sample(request)
        inputs = [self.reward_input(prompt, c.text) for c in candidates]
        rewards = await self.scorer.score([i.token_ids for i in inputs], self.reward_model)
        ranks = ranks_of(rewards)
        scored = [
            ScoredCandidate(c, r, rank, i.truncated)
            for c, r, rank, i in zip(candidates, rewards, ranks, inputs, strict=True)
        ]
        chosen = rank_by_reward(rewards)[:n]

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

    def _records(
        self, request_id: str, results: list[BestOfNResult], params: SamplingParams
    ) -> list[CandidateRecord]:
        now = time.time()
        params_logged = {
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "top_k": params.top_k,
            "stop": list(params.stop),
            "seed": params.seed,
            "best_of": len(results[0].candidates),
            "n": len(results[0].chosen),
        }
        return [
            CandidateRecord(
                request_id=request_id,
                prompt_index=prompt_index,
                candidate_index=index,
                prompt=result.prompt.logged(),
                completion=s.candidate.text,
                reward=s.reward,
                rank=s.rank,
                finish_reason=s.candidate.finish_reason,
                policy=str(self.policy.path),
                policy_version=self.policy.version,
                reward_model=str(self.reward_model.path),
                reward_model_version=self.reward_model.version,
                params=params_logged,
                prompt_tokens=len(result.prompt.token_ids),
                completion_tokens=len(s.candidate.token_ids),
                reward_truncated=s.reward_truncated,
                created=now,
            )
            for prompt_index, result in enumerate(results)
            for index, s in enumerate(result.candidates)
        ]

    @property
    def fingerprint(self) -> str:
        return f"bon-{self.policy.version}-{self.reward_model.version}"

    async def close(self) -> None:
        await self.sampler.close()
        await self.scorer.close()
