"""A synthetic task whose reward depends on the whole completion: the share of "bright" words.

Built by hand (no training), so that what early rejection can and cannot gain is known:
- Words: the whole-word tokens of the test tokenizer (" city", " sad", ...), split by id into a
  bright half and a dark half.
- Policy: a Llama with no transformer layers, so the next word depends only on the last one. It
  stays in the last word's half with probability `stay` (0.95: a mood lasts about 20 words) and
  picks uniformly within the half; it never emits a special token, so every candidate runs to
  max_tokens. A candidate's first words say something, not everything, about its end.
- Reward model: a one-layer Llama with uniform attention (query and key weights zero): the last
  token's hidden state carries the mean brightness of the sequence, which the head reads. Its
  reward grows with the share of bright words in prompt + completion.
- Gold: the share of bright words among the completion's words, counted directly on the text.

    python benchmarks/mood_task.py OUTPUT_DIR   (writes OUTPUT_DIR/policy and OUTPUT_DIR/reward_model)
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from bon.tiny_models import tokenizer_b

HIDDEN = 64
BRIGHT, SIGNAL, CONSTANT = 0, 1, 2  # hidden dimensions the hand-set weights use


def word_tokens(tokenizer) -> dict[int, str]:
    """id -> word of every token that is a whole word with its leading space."""
    words = {}
    for token, index in tokenizer.get_vocab().items():
        if token.startswith("Ġ") and token[1:].isalpha():
            words[index] = token[1:]
    return dict(sorted(words.items()))


def bright_words(tokenizer) -> set[str]:
    return {word for i, word in enumerate(word_tokens(tokenizer).values()) if i % 2 == 0}


def dark_words(tokenizer) -> set[str]:
    return set(word_tokens(tokenizer).values()) - bright_words(tokenizer)


def gold(completion: str, bright: set[str]) -> float:
    words = completion.split()
    return sum(w in bright for w in words) / len(words) if words else 0.0


def _brightness(tokenizer) -> torch.Tensor:
    """(V,) +1 bright word, -1 dark word, 0 any other token."""
    signs = torch.zeros(len(tokenizer))
    for i, index in enumerate(word_tokens(tokenizer)):
        signs[index] = 1.0 if i % 2 == 0 else -1.0
    return signs


def _config(tokenizer, layers: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=HIDDEN, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip


@torch.no_grad()
def build_policy(out: Path, stay: float = 0.95) -> Path:
    tokenizer = tokenizer_b()
    signs = _brightness(tokenizer)
    model = LlamaForCausalLM(_config(tokenizer, layers=0))
    embed = torch.zeros(len(tokenizer), HIDDEN)
    embed[:, BRIGHT], embed[:, CONSTANT] = signs, 1.0
    model.model.embed_tokens.weight.copy_(embed)
    # After the final RMSNorm a word's hidden state is sqrt(HIDDEN / 2) * (sign, 0, 1, 0...): the
    # same-half words get logit +a * scale, the others -a * scale, so P(stay) = sigmoid(2 a scale).
    scale = math.sqrt(HIDDEN / 2)
    a = math.log(stay / (1 - stay)) / (2 * scale)
    head = torch.zeros(len(tokenizer), HIDDEN)
    head[:, BRIGHT] = a * signs
    head[:, CONSTANT] = torch.where(signs == 0, -10.0, 0.0)  # special and partial tokens: never
    model.lm_head.weight.copy_(head)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@torch.no_grad()
def build_reward_model(out: Path) -> Path:
    tokenizer = tokenizer_b()
    signs = _brightness(tokenizer)
    config = _config(tokenizer, layers=1)
    config.num_labels = 1
    model = LlamaForSequenceClassification(config)
    for parameter in model.parameters():
        parameter.zero_()
    embed = torch.zeros(len(tokenizer), HIDDEN)
    embed[:, BRIGHT], embed[:, CONSTANT] = signs, 4.0
    model.model.embed_tokens.weight.copy_(embed)
    layer = model.model.layers[0]
    for norm in (layer.input_layernorm, layer.post_attention_layernorm, model.model.norm):
        norm.weight.fill_(1.0)
    # Zero queries and keys: every position attends equally to all before it, so the attention
    # output is the mean of the values, and the value is a token's brightness.
    layer.self_attn.v_proj.weight[0, BRIGHT] = 1.0
    layer.self_attn.o_proj.weight[SIGNAL, 0] = 1.0
    model.score.weight[0, SIGNAL] = 10.0
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def build(out: Path, stay: float = 0.95) -> tuple[Path, Path]:
    policy, reward_model = build_policy(out / "policy", stay), build_reward_model(out / "reward_model")
    (out / "bright_words.json").write_text(json.dumps(sorted(bright_words(tokenizer_b()))))
    (out / "dark_words.json").write_text(json.dumps(sorted(dark_words(tokenizer_b()))))
    return policy, reward_model


if __name__ == "__main__":
    print(build(Path(sys.argv[1])))
