"""The Bradley-Terry reward model as the service knows it: its input rule, its limits, its checks.

The reward is the raw logit of a one-label sequence-classification head at the last real token
(no sigmoid: BT rewards are only meaningful as differences); the scoring engine computes it. The
input is always rebuilt from text with the RM's own tokenizer and chat template, because the
policy's tokens mean nothing to an RM trained with another vocabulary.

Length rule: an input longer than the RM's context keeps its last `max_length` tokens (the
completion and the end of the prompt) and is flagged `truncated`, counted in
`bon_reward_input_truncated_total` and stored in the candidate log. `/v1/score` refuses such an
input instead (400), since there the caller chose the text.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase

from server.checkpoints import (
    PROBE_COMPLETION,
    PROBE_PROMPT,
    checkpoint_dir,
    checkpoint_dtype,
    context_length,
    loading,
    max_text_chars,
    model_version,
    pad_with_eos,
    weight_names,
)
from server.failures import CheckpointError, InvalidInput, NonFiniteReward
from server.process_reward import DEFAULT_DELIMITER, StepLayout, aggregate, read_step_layout

Messages = list[dict[str, str]]


@dataclass
class Reward:
    """A scorer's reading of one input: what selection ranks by, and what it was made of."""

    value: float  # the reward candidates are ranked by
    members: dict[str, float] = field(default_factory=dict)  # per reward model, raw, when several
    steps: list[float] | None = None  # per step, from a process reward model


@dataclass
class RewardInput:
    token_ids: list[int]
    truncated: bool


def fit_tail(token_ids: list[int], max_length: int) -> RewardInput:
    """The RM length rule (this module's docstring), for the server and the trainers."""
    if len(token_ids) <= max_length:
        return RewardInput(token_ids, truncated=False)
    return RewardInput(token_ids[-max_length:], truncated=True)


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
    tokenizer: PreTrainedTokenizerBase,
    prompt_text: str,
    messages: Messages | None,
    completion: str,
    steps: StepLayout | None = None,
) -> list[int]:
    """The RM input rule, in one place for the server and the trainers: the chat rule when there
    are messages (falling back to `prompt_text`, the policy's rendering), else the completions rule.

    A process reward model (`steps`) reads the completion with its steps marked, and a step token
    written in the prompt is removed (it would read as a step). An empty text (an empty prompt and
    a completion cut at its first character) is read as the tokenizer's bos token, or else its
    eos: the RM has no reading of zero tokens.
    """
    if steps is not None:
        prompt_text, completion = steps.clean(prompt_text), steps.mark(completion)
        if messages is not None:
            messages = [{**m, "content": steps.clean(m["content"])} for m in messages]
    if messages is not None:
        ids = encode_chat(tokenizer, messages, completion, fallback_prompt=prompt_text)
    else:
        ids = encode_completion(tokenizer, prompt_text, completion)
    if ids:
        return ids
    stand_in = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if stand_in is None:
        raise InvalidInput("the text to score is empty and the reward model has no bos or eos token")
    return [stand_in]


@dataclass(frozen=True)
class RewardStats:
    """A reward model's reward distribution on its training data (`reward_stats.json`): what
    standardises it before it is combined with other members."""

    mean: float
    std: float

    def standardise(self, value: float) -> float:
        return (value - self.mean) / self.std


STATS_FILE = "reward_stats.json"


def read_stats(directory: Path) -> RewardStats | None:
    """The directory's `reward_stats.json`, or None without one; CheckpointError if it is malformed."""
    path = directory / STATS_FILE
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
        stats = RewardStats(float(raw["mean"]), float(raw["std"]))
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f'{path}: expected {{"mean": m, "std": s}} ({error!r})') from None
    if not (math.isfinite(stats.mean) and math.isfinite(stats.std) and stats.std > 0):
        raise CheckpointError(f"{path}: mean must be finite and std finite and above 0, not {raw}")
    return stats


def write_stats(directory: Path, rewards: list[float]) -> RewardStats:
    """Record the distribution of `rewards` (a trained model's, on its training data) beside it."""
    mean = sum(rewards) / len(rewards)
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / len(rewards)) or 1.0
    (directory / STATS_FILE).write_text(json.dumps({"mean": mean, "std": std}) + "\n")
    return RewardStats(mean, std)


@dataclass(frozen=True)
class RewardModelInfo:
    """What the service knows of a reward model, without its weights (the scorer holds those)."""

    path: Path
    version: str
    tokenizer: PreTrainedTokenizerBase
    max_length: int
    dtype: str  # the checkpoint's own dtype: what --dtype auto keeps
    max_chars: int  # a longer text cannot fit the context: /v1/score refuses it before tokenizing
    stats: RewardStats | None = None  # from reward_stats.json: standardises it among several members
    steps: StepLayout | None = None  # a process reward model's step layout; None: an outcome model

    def encode(self, prompt_text: str, messages: Messages | None, completion: str) -> list[int]:
        return encode_candidate(self.tokenizer, prompt_text, messages, completion, self.steps)

    def described(self) -> str:
        return self.steps.described() if self.steps is not None else "outcome reward model (raw logit)"

    def fit(self, token_ids: list[int]) -> RewardInput:
        """Apply the length rule of this module's docstring."""
        return fit_tail(token_ids, self.max_length)


HEADS = ("score", "classifier")  # what transformers names a sequence-classification head


def read_reward_model(path: str | Path, step_delimiter: str = DEFAULT_DELIMITER) -> RewardModelInfo:
    """Read and check a reward model's config, tokenizer and weight names; raises CheckpointError
    naming what is wrong with it. A process reward model (server/process_reward.py) splits
    completions into steps at `step_delimiter`."""
    directory = checkpoint_dir(path, "reward model", "--reward-model")
    with loading("reward model", directory):
        config = AutoConfig.from_pretrained(directory)
        tokenizer = AutoTokenizer.from_pretrained(directory)
        names = weight_names(directory)
        steps = read_step_layout(directory, config, tokenizer, step_delimiter)
    if steps is None:
        _check_outcome_head(directory, config, names)
    elif steps.layout != "shepherd" and not any(name.split(".")[0] in HEADS for name in names):
        raise CheckpointError(
            f"process reward model {directory} has no score or classifier head in its weights"
        )
    pad_with_eos(tokenizer, "reward model")
    context = context_length(config, tokenizer)
    return RewardModelInfo(
        path=directory,
        version=model_version(directory),
        tokenizer=tokenizer,
        max_length=context,
        dtype=checkpoint_dtype(config),
        max_chars=max_text_chars(tokenizer, context),
        stats=read_stats(directory),
        steps=steps,
    )


def _check_outcome_head(directory: Path, config, names: set[str]) -> None:
    """A Bradley-Terry reward model has one label and a trained head."""
    if config.num_labels != 1:
        raise CheckpointError(
            f"reward model {directory} has num_labels={config.num_labels}; a Bradley-Terry reward model "
            "has exactly one label (a causal LM directory reports 2: train a reward model first)"
        )
    if not any(name.split(".")[0] in HEADS for name in names):  # a causal LM given as --reward-model
        raise CheckpointError(
            f"reward model {directory} has no trained score head (no score.weight or classifier.weight "
            "in its weights); it looks like a causal LM, not a sequence-classification checkpoint"
        )


def read_steps(rewards: list[Reward], rule: str) -> list[Reward]:
    """A process reward model's readings, their value the `rule` aggregate of their step scores."""
    return [Reward(aggregate(r.steps or [], rule), steps=r.steps) for r in rewards]


def check_finite(rewards: list[Reward], reward_model: Path) -> list[Reward]:
    """`rewards` as they are, or NonFiniteReward naming the model and how many inputs it failed."""
    bad = [r.value for r in rewards if not math.isfinite(r.value)]
    if bad:
        raise NonFiniteReward(
            f"the reward model {reward_model} gave {len(bad)} of {len(rewards)} inputs a non-finite "
            f"reward ({bad[0]}); nothing was ranked or logged on it"
        )
    return rewards


def probe_input(reward_model: RewardModelInfo) -> list[int]:
    """The input every engine test-runs a freshly loaded reward model on."""
    return reward_model.encode(PROBE_PROMPT, None, PROBE_COMPLETION)
