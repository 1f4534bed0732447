"""Loading the policy: any HF causal-LM directory, plus what sampling needs to know about it."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from server.checkpoints import checkpoint_dir, context_length, loading, model_version, torch_dtype

log = logging.getLogger(__name__)


@dataclass
class Policy:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    path: Path
    version: str
    context_length: int
    eos_ids: set[int]


def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Every token that ends a candidate: generation_config's (may be a list) and the tokenizer's."""
    ids: set[int] = set()
    configured = getattr(model.generation_config, "eos_token_id", None)
    if configured is not None:
        ids.update(configured if isinstance(configured, list) else [configured])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def load_policy(path: str | Path, device: str, dtype: str) -> Policy:
    directory = checkpoint_dir(path, "policy", "--policy")
    with loading("policy", directory):
        tokenizer = AutoTokenizer.from_pretrained(directory)
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch_dtype(dtype)).to(device).eval()
    if tokenizer.pad_token_id is None:
        # Padding positions are masked out; any id will do, eos is the customary one.
        log.warning("policy tokenizer has no pad token; padding with eos (%s)", tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    return Policy(
        model=model,
        tokenizer=tokenizer,
        path=directory,
        version=model_version(directory),
        context_length=context_length(model.config, tokenizer),
        eos_ids=_eos_ids(model, tokenizer),
    )
