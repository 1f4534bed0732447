"""What the service knows of a policy: its tokenizer and limits, read without loading its weights.

The weights belong to the sampling engine (`Sampler.load`); reading a checkpoint here is cheap, so
a vLLM deployment does not hold the policy twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from transformers import AutoConfig, AutoTokenizer, GenerationConfig, PreTrainedTokenizerBase

from server.checkpoints import (
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


@dataclass(frozen=True)
class PolicyInfo:
    path: Path
    version: str
    tokenizer: PreTrainedTokenizerBase
    context_length: int
    eos_ids: frozenset[int]  # every token that ends a candidate
    dtype: str  # the checkpoint's own dtype: what --dtype auto keeps
    max_prompt_chars: int  # a longer prompt cannot fit the context: refused before tokenizing


def _eos_ids(directory: Path, config, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """generation_config's eos ids (an int or a list), else the model config's, plus the tokenizer's;
    the same set transformers' generate and vLLM stop on."""
    if (directory / "generation_config.json").is_file():
        generation = GenerationConfig.from_pretrained(directory)
    else:
        generation = GenerationConfig.from_model_config(config)
    configured = generation.eos_token_id
    ids = set(configured if isinstance(configured, list) else [configured] if configured is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


def read_policy(path: str | Path) -> PolicyInfo:
    """Read a policy checkpoint's config and tokenizer; raises CheckpointError naming what is wrong."""
    directory = checkpoint_dir(path, "policy", "--policy", generates=True)
    with loading("policy", directory):
        config = AutoConfig.from_pretrained(directory)
        tokenizer = AutoTokenizer.from_pretrained(directory)
        weight_names(directory)  # a missing or unreadable weights file is refused now, not at load
        eos_ids = _eos_ids(directory, config, tokenizer)
    pad_with_eos(tokenizer, "policy")
    context = context_length(config, tokenizer)
    return PolicyInfo(
        path=directory,
        version=model_version(directory),
        tokenizer=tokenizer,
        context_length=context,
        eos_ids=eos_ids,
        dtype=checkpoint_dtype(config),
        max_prompt_chars=max_text_chars(tokenizer, context),
    )


def probe_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The prompt every engine test-runs a freshly loaded policy on (PROBE_PROMPT, or BOS alone)."""
    return tokenizer(PROBE_PROMPT).input_ids or [tokenizer.bos_token_id or 0]
