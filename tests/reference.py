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


@cache
def _load_prm(path: Path, layout: str):
    """The PRM's body and a function from hidden states to (steps, labels) logits, built here from
    its weights (the Qwen head from its tensors, Math-Shepherd's from the LM head's rows)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoModelForTokenClassification, Qwen2Model

    if layout == "qwen":
        body = Qwen2Model.from_pretrained(path).eval()
        w = load_file(str(path / "model.safetensors"))

        def head(hidden):
            inner = torch.relu(hidden @ w["score.0.weight"].T + w["score.0.bias"])
            return inner @ w["score.2.weight"].T + w["score.2.bias"]

        return body, head
    if layout == "shepherd":
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        return model.model, model.lm_head
    model = AutoModelForTokenClassification.from_pretrained(path).eval()
    return model.model, model.score


@torch.no_grad()
def step_scores(prm_dir: Path, layout: str, ids: list[int], step_id: int, good_bad: tuple[int, int] | None):
    """Each step's score: the head at the step tokens, softmax taking good (sigmoid for one label)."""
    body, head = _load_prm(prm_dir, layout)
    hidden = body(torch.tensor([ids])).last_hidden_state[0]  # (T, H)
    at = [t for t, token in enumerate(ids) if token == step_id]
    logits = head(hidden[at])  # (steps, labels or vocabulary)
    if good_bad is not None:
        good, bad = good_bad
        return torch.softmax(logits[:, [good, bad]], -1)[:, 0].tolist()
    if logits.shape[-1] == 1:
        return torch.sigmoid(logits[:, 0]).tolist()
    return torch.softmax(logits, -1)[:, 1].tolist()
