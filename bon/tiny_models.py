"""Tiny Hugging Face models built from configs, with tokenizers trained here.

No model hub is reachable from the machines this project is developed and tested on, so the test
suite and the default serving pair are made locally: a byte-level BPE tokenizer trained by
`tokenizers` on a small synthetic corpus, and randomly initialised models from `GPT2Config`,
`LlamaConfig` or `Qwen2Config`. Everything is saved as ordinary HF directories, so the code that
loads them is the same code that loads a real checkpoint.

Usage: python -m bon.tiny_models OUTPUT_DIR   (writes OUTPUT_DIR/policy and OUTPUT_DIR/reward_model)
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    GPT2Config,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

# A template with distinct role markers, so the RM's rendering of a conversation visibly differs from
# the policy's and tests can tell which template was applied.
CHAT_TEMPLATE_ANGLE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CHAT_TEMPLATE_COLON = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)

_WORDS = (
    "the a an one two three four five six seven eight nine ten cat dog bird fish tree river "
    "stone city road house light dark red blue green small large quick slow happy sad runs "
    "jumps sees makes takes gives finds knows thinks says answer question what why how when "
    "where who is are was were be have has had do does did will would can could and or but "
    "if then because so plus minus equals capital of country paris rome tokyo"
).split()


def synthetic_corpus(lines: int = 2000, seed: int = 0) -> list[str]:
    """Sentences of common words and small sums, enough for a BPE to learn useful merges."""
    rng = random.Random(seed)
    corpus = []
    for _ in range(lines):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 14)))
        corpus.append(f"{words}. {a} + {b} = {a + b}.")
    return corpus


def train_tokenizer(
    vocab_size: int,
    special: dict[str, str],
    seed: int = 0,
    chat_template: str | None = None,
    prepend_bos: bool = False,
    corpus: list[str] | None = None,
    individual_digits: bool = False,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer; `special` maps HF roles (bos/eos/pad/unk) to token strings.

    `prepend_bos` makes the tokenizer add its bos token by default, as Llama's does, so callers
    must respect `add_special_tokens` to get the right input. `individual_digits` keeps every digit
    its own token (arithmetic is far easier to learn that way). `corpus` defaults to synthetic text.
    """
    extra = ["<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    specials = list(dict.fromkeys([*special.values(), *extra]))
    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        if individual_digits
        else byte_level
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus or synthetic_corpus(seed=seed), trainer=trainer)
    if prepend_bos:
        bos = special["bos_token"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, **special)
    if chat_template is not None:
        hf.chat_template = chat_template
    return hf


# Every head 32 wide: vLLM's CPU attention refuses head_dim 16, and the same tiny models serve
# both engines' tests.
HEAD_DIM = 32


def _causal_config(arch: str, tok: PreTrainedTokenizerFast, hidden: int, layers: int, ctx: int):
    heads = max(1, hidden // HEAD_DIM)
    common = dict(
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    if arch == "gpt2":
        return GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, n_positions=ctx, **common)
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch]
    return cls(
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),  # grouped-query attention, as Llama and Qwen2 ship
        max_position_embeddings=ctx,
        tie_word_embeddings=True,
        **common,
    )


def build_model(
    out: Path,
    arch: str,
    tok: PreTrainedTokenizerFast,
    reward_model: bool = False,
    hidden: int = 64,
    layers: int = 2,
    ctx: int = 256,
    seed: int = 0,
) -> Path:
    """Save a randomly initialised causal LM (or a one-label reward model) and its tokenizer."""
    torch.manual_seed(seed)
    config = _causal_config(arch, tok, hidden, layers, ctx)
    if reward_model:
        config.num_labels = 1
        model = AutoModelForSequenceClassification.from_config(config)
    else:
        model = AutoModelForCausalLM.from_config(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


# Each process reward model layout: its step token, and what `bon_reward.json` says beside it
# (Qwen2.5-Math-PRM's layout needs none: its architecture names the step token).
PRM_LAYOUTS = {
    "qwen": ("<extra_0>", None),
    "shepherd": ("ки", {"kind": "process", "step_token": "ки", "good_token": "+", "bad_token": "-"}),
    "token": ("<step>", {"kind": "process", "step_token": "<step>"}),
}


def build_prm(
    out: Path, layout: str, tok: PreTrainedTokenizerFast, labels: int = 2, hidden: int = 64, seed: int = 0
) -> Path:
    """Save a randomly initialised process reward model in one of the layouts bon reads: `qwen`
    (Qwen2.5-Math-PRM's architecture), `shepherd` (a Llama causal LM read at + and -) or `token`
    (a Llama token classifier with `labels` labels)."""
    from server.engines.hf.process import Qwen2ForProcessRewardModel

    torch.manual_seed(seed)
    step_token, reward_file = PRM_LAYOUTS[layout]
    if layout == "shepherd":
        tok.add_tokens([step_token])  # an ordinary token, as in Math-Shepherd's vocabulary
    else:
        tok.add_special_tokens({"additional_special_tokens": [step_token]})
    config = _causal_config("qwen2" if layout == "qwen" else "llama", tok, hidden, 2, 256)
    if layout == "qwen":
        config.num_labels = 2
        model = Qwen2ForProcessRewardModel(config)
    elif layout == "shepherd":
        model = AutoModelForCausalLM.from_config(config)
    else:
        config.num_labels = labels
        model = AutoModelForTokenClassification.from_config(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    if reward_file is not None:
        (out / "bon_reward.json").write_text(json.dumps(reward_file, ensure_ascii=False) + "\n")
    return out


def tokenizer_a() -> PreTrainedTokenizerFast:
    """GPT-2 style: one token serves as bos and eos, a separate pad, angle-bracket chat template."""
    return train_tokenizer(
        300,
        {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|pad|>"},
        seed=0,
        chat_template=CHAT_TEMPLATE_ANGLE,
    )


def tokenizer_b(chat_template: str | None = CHAT_TEMPLATE_COLON) -> PreTrainedTokenizerFast:
    """Llama style: distinct bos/eos/pad, a different vocabulary and a different chat template."""
    return train_tokenizer(
        420,
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"},
        seed=1,
        chat_template=chat_template,
        prepend_bos=True,
    )


def build_default_pair(out: Path) -> tuple[Path, Path]:
    """The default serving pair: a GPT-2 policy and a Llama reward model with another tokenizer."""
    policy = build_model(out / "policy", "gpt2", tokenizer_a(), seed=0)
    reward = build_model(out / "reward_model", "llama", tokenizer_b(), reward_model=True, seed=1)
    return policy, reward


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m bon.tiny_models OUTPUT_DIR")
    for path in build_default_pair(Path(sys.argv[1])):
        print(path)
