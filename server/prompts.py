"""How a prompt becomes policy tokens, and a candidate becomes reward-model input.

Shared by the server and the trainers, so a model is trained on exactly the inputs it is served.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from server.failures import InvalidInput
from server.process_reward import StepLayout
from server.reward import Messages, RewardInput, RewardModelInfo, encode_candidate


@dataclass
class Prompt:
    """One prompt, as the policy sees it (token ids) and as the log and the RM see it (text)."""

    token_ids: list[int]
    text: str  # the prompt text the policy saw (chat: rendered by the policy's template)
    messages: Messages | None = None  # chat requests only
    reference: str | None = None  # the known answer a request gave, for rule reward members

    def logged(self) -> str | Messages:
        return self.messages if self.messages is not None else self.text


def unicode_text(text: str) -> str:
    """JSON can carry a lone surrogate ("\\ud800"): that is not Unicode text, and no tokenizer (nor
    SQLite) takes it. Raises ValueError saying where it is."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(
            f"contains an unpaired surrogate ({text[error.start]!r} at {error.start}), which is not text"
        ) from None
    return text


def text_prompt(tokenizer: PreTrainedTokenizerBase, text: str) -> Prompt:
    """A completion prompt, with the tokenizer's default special tokens."""
    ids = tokenizer(text).input_ids
    if not ids and tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id]  # an empty prompt starts from bos, as OpenAI allows
    if not ids:
        raise InvalidInput("prompt is empty and the policy has no bos token to start from", "prompt")
    return Prompt(token_ids=ids, text=text)


def render_messages(tokenizer: PreTrainedTokenizerBase, messages: Messages) -> str:
    """The conversation ready for the assistant's turn; without a chat template, a line per message."""
    if tokenizer.chat_template:
        return str(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages)


def chat_prompt(tokenizer: PreTrainedTokenizerBase, messages: Messages) -> Prompt:
    if not tokenizer.chat_template:
        raise InvalidInput("the policy's tokenizer has no chat template; use /v1/completions", "messages")
    text = render_messages(tokenizer, messages)
    # The template wrote the special tokens itself; defaults would add a second bos.
    return Prompt(token_ids=tokenizer(text, add_special_tokens=False).input_ids, text=text, messages=messages)


def make_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str | Messages) -> Prompt:
    return text_prompt(tokenizer, prompt) if isinstance(prompt, str) else chat_prompt(tokenizer, prompt)


def reward_input(reward_model: RewardModelInfo, prompt: Prompt, completion: str) -> RewardInput:
    """The RM's input for one candidate, after the RM's length rule."""
    return reward_model.fit(reward_model.encode(prompt.text, prompt.messages, completion))


def scoring_chars(prompt: str | Messages, response: str) -> int:
    """Characters of a (prompt, response) pair a caller asks to score: checked before tokenizing."""
    return len(response) + (
        len(prompt) if isinstance(prompt, str) else sum(len(m["content"]) for m in prompt)
    )


def scoring_input(
    rm_tokenizer: PreTrainedTokenizerBase,
    prompt: str | Messages,
    response: str,
    policy_tokenizer: PreTrainedTokenizerBase,
    steps: StepLayout | None = None,
) -> list[int]:
    """The RM input of a (prompt, response) pair as given (`/v1/score`, `bon score`, the reward
    trainers), before any length rule: a text prompt by the completions rule, messages by the RM's
    chat template, or, when the RM has none, the policy's rendering of them (what the policy was
    served); a process reward model's `steps` mark the response."""
    if isinstance(prompt, str):
        return encode_candidate(rm_tokenizer, prompt, None, response, steps)
    return encode_candidate(rm_tokenizer, render_messages(policy_tokenizer, prompt), prompt, response, steps)
