"""Process reward models (PRMs): a reward per step, read at a step token placed after each step.

Three layouts are read, from the config and, where the config cannot say, a `bon_reward.json`
beside it (`{"kind": "process", "step_token": ..., "good_token": ..., "bad_token": ...}`):

- `qwen`: Qwen2.5-Math-PRM (`Qwen2ForProcessRewardModel`): a Qwen2 body and a head
  Linear(h, h) -> ReLU -> Linear(h, 2); steps end with `<extra_0>`; a step's score is
  softmax(logits)[1] there.
- `shepherd`: Math-Shepherd: a causal LM; a step tag (` ки`) after each step; a step's score is
  softmax over the logits of the bad and good tokens, taking good.
- `token`: a `*ForTokenClassification` read at the step token: label 1 of two is good; one label
  is a logit, read through a sigmoid.

Every layout comes down to a few logits per step whose last column is "good" (the shepherd layout's
two columns are ordered [bad, good] to match): `step_probability` turns them into a score, the same
for both engines. A completion is split into steps at a delimiter ("\\n\\n" by default), and each
step gets the layout's suffix; a step token written in the text itself is removed first, so a
completion cannot invent steps.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from transformers import PretrainedConfig, PreTrainedTokenizerBase

from server.failures import CheckpointError, InvalidInput

Layout = Literal["qwen", "shepherd", "token"]
DEFAULT_DELIMITER = "\n\n"
AGGREGATES = ("last", "min", "prod", "mean")
DEFAULT_AGGREGATE = "min"
CONFIG_FILE = "bon_reward.json"
QWEN_ARCHITECTURE = "Qwen2ForProcessRewardModel"
QWEN_STEP_TOKEN = "<extra_0>"


@dataclass(frozen=True)
class StepLayout:
    """How a process reward model reads steps: where its step token goes and what it reads there."""

    layout: Layout
    step_token: str
    step_id: int
    suffix: str  # written after each step; contains the step token
    delimiter: str  # what separates steps in a completion
    good_id: int | None = None  # shepherd: the vocabulary's "good" and "bad" tokens
    bad_id: int | None = None

    def clean(self, text: str) -> str:
        """`text` without the step token: only the marking places it."""
        return text.replace(self.step_token, "")

    def steps(self, completion: str) -> list[str]:
        """The completion's steps (`split_steps`), the step token removed."""
        return split_steps(self.clean(completion), self.delimiter)

    def mark(self, completion: str) -> str:
        """The completion as the PRM reads it: each step followed by the layout's suffix."""
        return "".join(step + self.suffix for step in self.steps(completion))

    def described(self) -> str:
        tokens = f", good/bad tokens {self.good_id}/{self.bad_id}" if self.good_id is not None else ""
        return (
            f"process reward model ({self.layout} layout): step token {self.step_token!r} "
            f"(id {self.step_id}){tokens}, steps split at {self.delimiter!r}"
        )


def split_steps(text: str, delimiter: str) -> list[str]:
    """The non-blank pieces of `text` between delimiters; a text with none is one (empty) step, so
    every answer has a score."""
    return [s for s in text.split(delimiter) if s.strip()] or [text]


def token_id(tokenizer: PreTrainedTokenizerBase, token: str, what: str, directory: Path) -> int:
    """The id `token` encodes to: one token (a leading-space variant counts, as Math-Shepherd's
    tokenizer writes "ки"); CheckpointError otherwise."""
    ids = tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1:
        raise CheckpointError(
            f"{directory}: the {what} {token!r} is {len(ids)} tokens in its tokenizer; it must be one"
        )
    return ids[0]


def _read_file(directory: Path) -> dict | None:
    path = directory / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
    except ValueError as error:
        raise CheckpointError(f"{path}: not JSON ({error})") from None
    if not isinstance(raw, dict) or raw.get("kind") not in ("process", "outcome"):
        raise CheckpointError(f'{path}: expected an object with "kind": "process" or "outcome"')
    return raw


def _string(raw: dict, key: str, directory: Path, default: str | None = None) -> str:
    value = raw.get(key, default)
    if not isinstance(value, str) or not value:
        raise CheckpointError(f"{directory / CONFIG_FILE}: {key!r} must be a non-empty string")
    return value


def read_step_layout(
    directory: Path, config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase, delimiter: str
) -> StepLayout | None:
    """The PRM layout of a checkpoint, or None for an outcome (Bradley-Terry) reward model."""
    raw = _read_file(directory) or {}
    architectures = config.architectures or []
    if raw.get("kind") == "outcome" or (not raw and QWEN_ARCHITECTURE not in architectures):
        return None
    return step_layout(raw, directory, config, tokenizer, delimiter)


def step_layout(
    raw: dict, directory: Path, config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase, delimiter: str
) -> StepLayout:
    """The layout a `bon_reward.json` (`raw`, {} for none) and a config describe; CheckpointError
    naming `directory` when they do not fit its tokenizer."""
    architectures = config.architectures or []
    if QWEN_ARCHITECTURE in architectures:
        layout: Layout = "qwen"
        step_token = _string(raw, "step_token", directory, QWEN_STEP_TOKEN)
    else:
        step_token = _string(raw, "step_token", directory)
        token_classifier = any(a.endswith("ForTokenClassification") for a in architectures)
        layout = "token" if token_classifier else "shepherd"
    default_suffix = f" {step_token}\n" if layout == "shepherd" else step_token
    suffix = _string(raw, "step_suffix", directory, default_suffix)
    step_id = token_id(tokenizer, step_token, "step token", directory)
    if tokenizer.encode(suffix, add_special_tokens=False).count(step_id) != 1:
        raise CheckpointError(f"{directory}: the step suffix {suffix!r} must hold the step token once")
    good = bad = None
    if layout == "shepherd":
        good = token_id(tokenizer, _string(raw, "good_token", directory, "+"), "good token", directory)
        bad = token_id(tokenizer, _string(raw, "bad_token", directory, "-"), "bad token", directory)
    if layout in ("qwen", "token") and config.num_labels not in (1, 2):
        raise CheckpointError(
            f"{directory}: a process reward model's head has 1 or 2 labels, not {config.num_labels}"
        )
    if not delimiter:
        raise InvalidInput("the step delimiter must not be empty", "--step-delimiter")
    return StepLayout(layout, step_token, step_id, suffix, delimiter, good, bad)


def step_probability(logits: list[float]) -> float:
    """A step's score from its logits, the last column being "good": softmax over two, sigmoid of one."""
    if len(logits) == 1:  # sigmoid, written so neither branch overflows
        z = math.exp(-abs(logits[0]))
        return 1 / (1 + z) if logits[0] >= 0 else z / (1 + z)
    top = max(logits)
    weights = [math.exp(v - top) for v in logits]
    return weights[-1] / sum(weights)


def aggregate(steps: list[float], rule: str) -> float:
    """One reward from a candidate's step scores: `last`, `min`, `prod` or `mean`."""
    if rule == "last":
        return steps[-1]
    if rule == "min":
        return min(steps)
    if rule == "prod":
        return math.prod(steps)
    if rule == "mean":
        return sum(steps) / len(steps)
    raise InvalidInput(
        f"step_aggregate must be one of {', '.join(AGGREGATES)}, not {rule!r}", "step_aggregate"
    )
