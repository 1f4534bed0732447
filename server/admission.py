"""Admission: what a request may ask, checked before any engine sees it, and its tokenizing.

The limits (prompts per request, best_of, batch budget, scored inputs and tokens, context) live
here once, for the routes and for the batch jobs (`bon generate`, `bon score`), which are checked
against the same rules as the server.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from transformers import PreTrainedTokenizerBase

from server.engines.contract import SamplingParams, sampling_cost
from server.failures import ContextTooLong, InvalidInput
from server.policy import PolicyInfo
from server.prompts import Prompt, chat_prompt, scoring_chars, scoring_input, text_prompt
from server.reward import Messages, RewardModelInfo

T = TypeVar("T")


@dataclass(frozen=True)
class Limits:
    max_best_of: int
    max_batch_tokens: int
    max_prompts: int  # per request: more could never fit the queue
    max_score_inputs: int
    max_score_tokens: int


def draws(params: SamplingParams, best_of: int) -> int:
    """Distinct candidates to decode. Temperature 0 is greedy and has exactly one completion, so with
    best_of > 1 it is decoded once and stands for every candidate (vLLM refuses greedy n > 1;
    decoding the same row best_of times would only cost more)."""
    return 1 if params.temperature == 0 else best_of


def check_chars(chars: int, limit: int, tokens: int, field: str, name: str | None = None) -> None:
    """A text over `limit` characters cannot fit a `tokens`-token context: refused untokenized."""
    if chars > limit:
        raise ContextTooLong(
            f"{name or field} is {chars} characters: no text over {limit} characters fits the "
            f"{tokens}-token context, so it was not tokenized",
            field,
        )


def score_input(
    reward_model: RewardModelInfo,
    prompt: str | Messages,
    response: str,
    policy_tokenizer: PreTrainedTokenizerBase,
    name: str,
    field: str,
) -> list[int]:
    """The RM input of a (prompt, response) pair a caller asks to score (`/v1/score`, `bon score`):
    whole, or ContextTooLong naming `name`; scored inputs are never truncated."""
    rm = reward_model
    check_chars(scoring_chars(prompt, response), rm.max_chars, rm.max_length, field, name)
    ids = scoring_input(rm.tokenizer, prompt, response, policy_tokenizer, rm.steps)
    if len(ids) > rm.max_length:
        raise ContextTooLong(
            f"{name} is {len(ids)} tokens for the reward model, over its limit of {rm.max_length}; "
            "scored inputs are never truncated",
            field,
        )
    return ids


class Admission:
    """The limits, and the one thread every tokenizer call runs on."""

    def __init__(self, limits: Limits):
        self.limits = limits
        # Tokenizing a long text takes long enough to stall every other request if it ran on the
        # event loop. One thread: a fast tokenizer must not be called from two threads at once
        # (its Rust side raises "Already borrowed").
        self._tokenizing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bon-tokenize")

    async def tokenize(self, work: Callable[[], T]) -> T:
        """Run `work` (any tokenizer calls) on the tokenizing thread."""
        return await asyncio.get_running_loop().run_in_executor(self._tokenizing, work)

    def check_prompts(self, count: int) -> None:
        """A request with more prompts than the queue holds could never be admitted: 400, not 429."""
        if count > self.limits.max_prompts:
            raise InvalidInput(
                f"the request has {count} prompts; this server takes at most {self.limits.max_prompts} "
                "at once (--max-queued-prompts)",
                "prompt",
            )

    async def text_prompts(self, policy: PolicyInfo, texts: list[str]) -> list[Prompt]:
        """A completions request's prompts: their count and size checked, then tokenized."""
        self.check_prompts(len(texts))
        for text in texts:
            check_chars(len(text), policy.max_prompt_chars, policy.context_length, "prompt")
        tokenizer = policy.tokenizer
        return await self.tokenize(lambda: [text_prompt(tokenizer, text) for text in texts])

    async def chat_prompt(self, policy: PolicyInfo, messages: Messages) -> Prompt:
        chars = sum(len(m["content"]) for m in messages)
        check_chars(chars, policy.max_prompt_chars, policy.context_length, "messages")
        tokenizer = policy.tokenizer
        return await self.tokenize(lambda: chat_prompt(tokenizer, messages))

    @staticmethod
    def resolve_max_tokens(
        policy: PolicyInfo, prompts: list[Prompt], requested: int | None, default: int
    ) -> int:
        """The request's max_tokens, or the server default clamped to what the context leaves."""
        longest = max(len(p.token_ids) for p in prompts)
        room = policy.context_length - longest
        # Blame the prompt when it leaves no room at all, else the max_tokens asked for.
        param = "max_tokens" if room >= 1 else "messages" if prompts[0].messages is not None else "prompt"
        if room < 1 or (requested is not None and requested > room):
            asked = requested if requested is not None else 1
            raise ContextTooLong(
                f"the policy's maximum context length is {policy.context_length} tokens, but "
                f"{longest + asked} were requested ({longest} in the prompt, {asked} to generate)",
                param,
            )
        return requested if requested is not None else min(default, room)

    def check_best_of(self, best_of: int, params: SamplingParams, prompts: list[Prompt]) -> None:
        if best_of > self.limits.max_best_of:
            raise InvalidInput(
                f"best_of is {best_of}; this server allows at most {self.limits.max_best_of}", "best_of"
            )
        rows = draws(params, best_of)
        need = sampling_cost(max(len(p.token_ids) for p in prompts), rows, params.max_tokens)
        if need > self.limits.max_batch_tokens:
            raise InvalidInput(
                f"one prompt needs {need} tokens of batch budget (prompt + {rows} candidates x "
                f"max_tokens {params.max_tokens}) but --max-batch-tokens is {self.limits.max_batch_tokens}",
                "max_tokens",
            )

    async def score_inputs(
        self,
        reward_model: RewardModelInfo,
        policy_tokenizer: PreTrainedTokenizerBase,
        pairs: list[tuple[str | Messages, str]],
        field: str,
    ) -> list[list[int]]:
        """RM inputs for `/v1/score`: (prompt text or messages, response) pairs, checked against the
        limits (count, characters, context, total tokens) and never truncated."""
        if len(pairs) > self.limits.max_score_inputs:
            raise InvalidInput(
                f"{field} has {len(pairs)} entries; this server scores at most "
                f"{self.limits.max_score_inputs} per request (--max-score-inputs)",
                field,
            )
        for index, (prompt, response) in enumerate(pairs):  # before any tokenizing
            check_chars(
                scoring_chars(prompt, response),
                reward_model.max_chars,
                reward_model.max_length,
                field,
                f"{field}[{index}]",
            )
        inputs = await self.tokenize(
            lambda: [
                score_input(reward_model, prompt, response, policy_tokenizer, f"{field}[{index}]", field)
                for index, (prompt, response) in enumerate(pairs)
            ]
        )
        total = sum(len(ids) for ids in inputs)
        if total > self.limits.max_score_tokens:
            raise InvalidInput(
                f"{field} comes to {total} reward-model tokens; this server scores at most "
                f"{self.limits.max_score_tokens} per request (--max-score-tokens)",
                field,
            )
        return inputs

    def close(self) -> None:
        self._tokenizing.shutdown(wait=False)
