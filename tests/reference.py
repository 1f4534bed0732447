"""Independent recomputation of rewards with a plain transformers forward, batch of one.

It restates the documented input rules (completions: prompt + completion with the RM tokenizer's
default special tokens; chat: the RM's own chat template, or the policy's rendered prompt +
completion when the RM has none) and lets HF's own pooling pick the token.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer


@cache
def _load(path: Path):
    return AutoModelForSequenceClassification.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(
        path
    )


@torch.no_grad()
def reward_of_ids(rm_dir: Path, ids: list[int]) -> float:
    model, _ = _load(rm_dir)
    return model(torch.tensor([ids])).logits[0, 0].item()


def completion_reward(rm_dir: Path, prompt: str, completion: str) -> float:
    _, tok = _load(rm_dir)
    return reward_of_ids(rm_dir, tok(prompt + completion).input_ids)


def chat_reward(rm_dir: Path, policy_dir: Path, messages: list[dict], completion: str) -> float:
    _, tok = _load(rm_dir)
    if tok.chat_template:
        text = tok.apply_chat_template(
            [*messages, {"role": "assistant", "content": completion}], tokenize=False
        )
        return reward_of_ids(rm_dir, tok(text, add_special_tokens=False).input_ids)
    policy_tok = AutoTokenizer.from_pretrained(policy_dir)
    prompt = policy_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return completion_reward(rm_dir, prompt, completion)
