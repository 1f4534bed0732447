"""The Bradley-Terry reward model: loading, rebuilding its input from text, scoring.

The reward is the raw logit of a one-label sequence-classification head at the last real token
(no sigmoid: BT rewards are only meaningful as differences). The input is always rebuilt from text
with the RM's own tokenizer and chat template, because the policy's tokens mean nothing to an RM
trained with another vocabulary.

Length rule: an input longer than the RM's context keeps its last `max_length` tokens (the
completion and the end of the prompt) and is flagged `truncated`, counted in
`bon_reward_input_truncated_total` and stored in the candidate log. `/v1/score` refuses such an
input instead (400), since there the caller chose the text.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from server.checkpoints import (
    CheckpointError,
    checkpoint_dir,
    context_length,
    loading,
    model_version,
    torch_dtype,
)

log = logging.getLogger(__name__)

Messages = list[dict[str, str]]


@dataclass
class RewardInput:
    token_ids: list[int]
    truncated: bool


def encode_completion(tokenizer: PreTrainedTokenizerBase, prompt: str, completion: str) -> list[int]:
    """Prompt text + completion text, with the RM tokenizer's default special tokens."""
    return tokenizer(prompt + completion).input_ids


def encode_chat(
    tokenizer: PreTrainedTokenizerBase, messages: Messages, completion: str, fallback_prompt: str
) -> list[int]:
    """The conversation plus the candidate as the assistant's turn, in the RM's chat template.

    Without a template, falls back to the completions rule on `fallback_prompt` (the prompt text
    the policy saw).
    """
    if not tokenizer.chat_template:
        return encode_completion(tokenizer, fallback_prompt, completion)
    text = tokenizer.apply_chat_template(
        [*messages, {"role": "assistant", "content": completion}], tokenize=False
    )
    # The template already wrote the special tokens; adding defaults would double the bos.
    return tokenizer(text, add_special_tokens=False).input_ids


def encode_candidate(
    tokenizer: PreTrainedTokenizerBase, prompt_text: str, messages: Messages | None, completion: str
) -> list[int]:
    """The RM input rule, in one place for the server and the trainers: the chat rule when there
    are messages (falling back to `prompt_text`, the policy's rendering), else the completions rule."""
    if messages is not None:
        return encode_chat(tokenizer, messages, completion, fallback_prompt=prompt_text)
    return encode_completion(tokenizer, prompt_text, completion)


def pad_right(inputs: list[list[int]], pad_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists as (B, T) input_ids and attention mask, right-padded."""
    width = max(len(ids) for ids in inputs)
    input_ids = torch.full((len(inputs), width), pad_id or 0, dtype=torch.long)  # pads are masked out
    mask = torch.zeros((len(inputs), width), dtype=torch.long)
    for i, ids in enumerate(inputs):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = 1
    return input_ids, mask


def score_head(model: PreTrainedModel) -> torch.nn.Module | None:
    for name in ("score", "classifier"):
        head = getattr(model, name, None)
        if isinstance(head, torch.nn.Module):
            return head
    return None


class LastTokenReward(torch.nn.Module):
    """A sequence-classification model read at the last real token, whatever the padding side.

    A module of its own (not a function reaching into the model) so that a distributed wrapper
    (DDP/FSDP via accelerate) wraps the whole computation and gradients synchronise.
    """

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        head = score_head(model)
        if head is None:
            raise CheckpointError(f"{type(model).__name__} has no score/classifier head")
        self.model, self.head = model, head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Args: input_ids (B, T); attention_mask (B, T), 1 on real tokens. Returns (B,) float32."""
        positions = (attention_mask.cumsum(-1) - 1).clamp_min(0)
        hidden = self.model.base_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=positions
        ).last_hidden_state  # (B, T, H)
        # The last real token is the rightmost 1 in the mask; the pad id plays no part, so a pad
        # token that also occurs in the text (pad == eos) cannot move the read-out.
        index = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
        last = (attention_mask * index).argmax(-1)  # (B,)
        picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, H)
        return self.head(picked).squeeze(-1).float()  # (B,)


@dataclass
class RewardModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    path: Path
    version: str
    max_length: int

    def __post_init__(self):
        self.scorer = LastTokenReward(self.model)

    def encode(self, prompt_text: str, messages: Messages | None, completion: str) -> list[int]:
        return encode_candidate(self.tokenizer, prompt_text, messages, completion)

    def fit(self, token_ids: list[int]) -> RewardInput:
        """Apply the length rule of this module's docstring."""
        if len(token_ids) <= self.max_length:
            return RewardInput(token_ids, truncated=False)
        return RewardInput(token_ids[-self.max_length :], truncated=True)

    @torch.inference_mode()
    def score(self, inputs: list[list[int]]) -> list[float]:
        """Raw logits for a batch of token-id lists."""
        if not inputs:
            return []
        input_ids, mask = pad_right(inputs, self.tokenizer.pad_token_id)
        return self.scorer(input_ids.to(self.model.device), mask.to(self.model.device)).tolist()


def load_reward_model(path: str | Path, device: str, dtype: str) -> RewardModel:
    """Load and check a reward model; raises `CheckpointError` naming what is wrong with it."""
    directory = checkpoint_dir(path, "reward model", "--reward-model")
    with loading("reward model", directory):
        config = AutoConfig.from_pretrained(directory)
    if config.num_labels != 1:
        raise CheckpointError(
            f"reward model {directory} has num_labels={config.num_labels}; a Bradley-Terry reward model "
            "has exactly one label (a causal LM directory reports 2: train a reward model first)"
        )
    with loading("reward model", directory):
        model, report = AutoModelForSequenceClassification.from_pretrained(
            directory, dtype=torch_dtype(dtype), output_loading_info=True
        )
        tokenizer = AutoTokenizer.from_pretrained(directory)
    head = score_head(model)
    head_missing = [k for k in report["missing_keys"] if k.split(".")[0] in ("score", "classifier")]
    if head is None or head_missing:
        raise CheckpointError(
            f"reward model {directory} has no trained score head "
            f"(missing: {', '.join(sorted(head_missing)) or 'score/classifier module'}); "
            "it looks like a causal LM, not a sequence-classification checkpoint"
        )
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        log.warning(
            "reward model tokenizer has no pad token; using eos (%s) for padding", tokenizer.eos_token
        )
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None and tokenizer.pad_token_id is not None:
        # Without it HF's own pooling reads the score at the wrong token (accuracy ~0.5 is the
        # symptom); our read-out does not use it, but saved and exported copies must be right.
        log.warning("reward model config has no pad_token_id; setting it to %s", tokenizer.pad_token_id)
        model.config.pad_token_id = tokenizer.pad_token_id
    return RewardModel(
        model=model.to(device).eval(),
        tokenizer=tokenizer,
        path=directory,
        version=model_version(directory),
        max_length=context_length(model.config, tokenizer),
    )
