"""Best-of-N for one request: sample best_of, score each, rank, return the top n, log them all."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from server import metrics
from server.errors import APIError
from server.policy import Policy
from server.reward import Messages, RewardInput, RewardModel
from server.sample_log import CandidateRecord, SampleLog
from server.sampling import Candidate, Sampler, SampleRequest, SamplingParams
from server.scorer import BatchedScorer
from server.selection import rank_by_reward, ranks_of


@dataclass
class Prompt:
    """One prompt, as the policy sees it (token ids) and as the log and the RM see it (text)."""

    token_ids: list[int]
    text: str  # the prompt text the policy saw (chat: rendered by the policy's template)
    messages: Messages | None = None  # chat requests only

    def logged(self) -> str | Messages:
        return self.messages if self.messages is not None else self.text


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
    completion_tokens: int = field(init=False)

    def __post_init__(self):
        self.completion_tokens = sum(len(c.candidate.token_ids) for c in self.candidates)


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

    # --- prompt preparation (policy side) -------------------------------------------------------

    def text_prompt(self, text: str) -> Prompt:
        tokenizer = self.policy.tokenizer
        ids = tokenizer(text).input_ids
        if not ids and tokenizer.bos_token_id is not None:
            ids = [tokenizer.bos_token_id]  # an empty prompt starts from bos, as OpenAI allows
        if not ids:
            raise APIError(400, "prompt is empty and the policy has no bos token to start from", "prompt")
        return Prompt(token_ids=ids, text=text)

    def chat_prompt(self, messages: Messages) -> Prompt:
        if not self.policy.tokenizer.chat_template:
            raise APIError(
                400, "the policy's tokenizer has no chat template; use /v1/completions", "messages"
            )
        text = self.render_messages(messages)
        # The template wrote the special tokens itself; defaults would add a second bos.
        ids = self.policy.tokenizer(text, add_special_tokens=False).input_ids
        return Prompt(token_ids=ids, text=text, messages=messages)

    def render_messages(self, messages: Messages) -> str:
        """The conversation as the policy sees it, ready for the assistant's turn.

        Without a policy chat template (only /v1/score gets here then), one line per message.
        """
        tokenizer = self.policy.tokenizer
        if tokenizer.chat_template:
            return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages)

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
        rm = self.reward_model
        if prompt.messages is not None:
            ids = rm.encode_chat(prompt.messages, completion, fallback_prompt=prompt.text)
        else:
            ids = rm.encode_completion(prompt.text, completion)
        return rm.fit(ids)

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
        candidates = await self.sampler.sample(SampleRequest(prompt.token_ids, best_of, params))
        inputs = [self.reward_input(prompt, c.text) for c in candidates]
        rewards = await self.scorer.score([i.token_ids for i in inputs])
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
