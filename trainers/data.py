"""Training data formats: SFT examples and preference groups (pairs, rankings with ties, feedback).

Preference data, JSONL, each prompt a string or a chat messages list:
- pairs: {"prompt", "chosen", "rejected"} with optional "margin" (TRL / OpenRLHF convention);
- rankings: {"prompt", "responses": [...], "ranks": [...]} where rank 1 is best and equal ranks
  are ties, or {"prompt", "responses", "scores": [...]} where higher is better.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from server.process_reward import split_steps

if TYPE_CHECKING:
    from server.log.sources import Locations

Prompt = str | list[dict[str, str]]


class RecipeError(ValueError):
    """A recipe asked to run on something it cannot use (a file, a flag, a directory); the message
    says what and how to fix it, and `bon train` prints it as one line."""


class DataError(RecipeError):
    """A record that cannot be used; the message names the file, line and field."""


@dataclass
class SFTExample:
    prompt: Prompt
    completion: str


@dataclass
class PreferenceGroup:
    """K responses to one prompt; `ranks[i] < ranks[j]` means response i is preferred."""

    prompt: Prompt
    responses: list[str]
    ranks: list[float]
    margin: float = 0.0  # required reward gap for every pair of this group

    def pairs(self) -> list[tuple[int, int]]:
        """(winner, loser) for every two responses of different rank; ties give no pair."""
        k = len(self.responses)
        return [(i, j) for i in range(k) for j in range(k) if self.ranks[i] < self.ranks[j]]


def read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, record) for every non-blank line."""
    if not Path(path).is_file():
        raise DataError(f"{path}: no such file")
    records = []
    with Path(path).open() as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise DataError(f"{path}:{number}: not JSON ({error})") from None
                if not isinstance(record, dict):
                    raise DataError(f"{path}:{number}: each line must be a JSON object")
                records.append((number, record))
    return records


def read_prompt(record: dict, where: str) -> Prompt:
    prompt = record.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and all(
        isinstance(m, dict) and "role" in m and "content" in m for m in prompt
    ):
        return prompt
    raise DataError(f"{where}: 'prompt' must be a string or a list of {{role, content}} messages")


def load_sft(path: Path) -> list[SFTExample]:
    """{"prompt", "completion"} records, or {"messages": [...]} whose last message is the assistant's."""
    examples = []
    for number, record in read_jsonl(path):
        where = f"{path}:{number}"
        if "messages" in record:
            messages = record["messages"]
            if not messages or messages[-1].get("role") != "assistant":
                raise DataError(f"{where}: 'messages' must end with an assistant message (the target)")
            examples.append(SFTExample(messages[:-1], messages[-1]["content"]))
        elif isinstance(record.get("completion"), str):
            examples.append(SFTExample(read_prompt(record, where), record["completion"]))
        else:
            raise DataError(f"{where}: needs 'prompt' and 'completion', or 'messages'")
    return examples


def preference_group(record: dict, where: str) -> PreferenceGroup:
    """One JSONL record (pair or ranking) as a group."""
    prompt = read_prompt(record, where)
    if "chosen" in record or "rejected" in record:
        chosen, rejected = record.get("chosen"), record.get("rejected")
        if not isinstance(chosen, str) or not isinstance(rejected, str):
            raise DataError(f"{where}: 'chosen' and 'rejected' must both be strings")
        return PreferenceGroup(prompt, [chosen, rejected], [1, 2], float(record.get("margin", 0.0)))
    responses = record.get("responses")
    if (
        not isinstance(responses, list)
        or len(responses) < 2
        or not all(isinstance(r, str) for r in responses)
    ):
        raise DataError(f"{where}: 'responses' must list at least two strings")
    if "ranks" in record:
        ranks = record["ranks"]
    elif "scores" in record:
        ranks = [-s for s in record["scores"]] if isinstance(record["scores"], list) else None
    else:
        raise DataError(f"{where}: a ranking needs 'ranks' (1 = best) or 'scores' (higher = better)")
    if not isinstance(ranks, list) or len(ranks) != len(responses):
        raise DataError(f"{where}: 'ranks'/'scores' must have one number per response")
    return PreferenceGroup(prompt, responses, [float(r) for r in ranks], float(record.get("margin", 0.0)))


def load_prompts(path: Path) -> list[Prompt]:
    """JSONL with a "prompt" (string or messages) per line."""
    return [read_prompt(record, f"{path}:{number}") for number, record in read_jsonl(path)]


def load_preferences(paths: list[Path]) -> list[PreferenceGroup]:
    groups = []
    for path in paths:
        for number, record in read_jsonl(path):
            groups.append(preference_group(record, f"{path}:{number}"))
    return groups


def load_feedback(sample_log: Locations) -> list[PreferenceGroup]:
    """Comparisons collected by `POST /v1/feedback`, as groups over the ranked candidates."""
    from server.log.sources import read_feedback

    groups = []
    for row in read_feedback(sample_log):
        ranked = [(c, r) for c, r in zip(row["completions"], row["ranks"], strict=True) if r is not None]
        if row["prompt"] is not None and len(ranked) >= 2:
            groups.append(
                PreferenceGroup(row["prompt"], [c for c, _ in ranked], [float(r) for _, r in ranked])
            )
    return groups


@dataclass
class StepExample:
    """An answer written as steps, each labelled good (1), bad (0) or with a probability of good."""

    prompt: Prompt
    steps: list[str]
    labels: list[float]


def step_example(record: dict, where: str, delimiter: str) -> StepExample:
    """One {"prompt", "steps", "labels"} record. The answer the server scores is the steps joined
    by the delimiter, and it splits them back there: so no step may hold the delimiter or be blank
    (but a blank answer is one blank step, as the server reads it)."""
    prompt = read_prompt(record, where)
    steps, labels = record.get("steps"), record.get("labels")
    if not isinstance(steps, list) or not steps or not all(isinstance(s, str) for s in steps):
        raise DataError(f"{where}: 'steps' must list at least one string")
    if not isinstance(labels, list) or len(labels) != len(steps):
        raise DataError(f"{where}: 'labels' must have one label per step ({len(steps)})")
    for i, label in enumerate(labels):
        if isinstance(label, bool) or not isinstance(label, int | float) or not 0 <= label <= 1:
            raise DataError(f"{where}: labels[{i}] is {label!r}; a label is 0, 1 or a probability in [0, 1]")
    if split_steps(delimiter.join(steps), delimiter) != steps:
        i = next(i for i, s in enumerate(steps) if not s.strip() or delimiter in s)
        raise DataError(
            f"{where}: steps[{i}] is blank or holds the step delimiter {delimiter!r}; the server "
            "could not split the answer back into these steps"
        )
    return StepExample(prompt, steps, [float(label) for label in labels])


def load_steps(path: Path, delimiter: str) -> list[StepExample]:
    return [step_example(record, f"{path}:{number}", delimiter) for number, record in read_jsonl(path)]
