"""SFT recipe: fine-tune a causal LM on prompt/completion or chat data, loss on completion tokens.

    bon train sft --base DIR --data FILE --output DIR [--epochs --learning-rate --batch-size ...]

Batches are grouped by length (similar lengths together, order of batches shuffled) so padding
stays small without packing's cross-example attention.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from server.checkpoints import checkpoint_dir, pad_with_eos
from server.engines.hf.models import pad_right
from server.prompts import make_prompt
from trainers.arguments import TrainArgs, sft_parser, train_args
from trainers.data import DataError, SFTExample, load_sft
from trainers.engine import (
    check_new_output,
    fit,
    make_accelerator,
    mergeable,
    publish,
    summary,
    with_lora,
    write_history,
)
from trainers.losses import IGNORE, completion_loss

log = logging.getLogger(__name__)


def encode(tokenizer: PreTrainedTokenizerBase, example: SFTExample, max_length: int) -> dict[str, list[int]]:
    """Token ids and labels; the prompt is tokenized exactly as `bon serve` tokenizes it.

    Text prompts take the tokenizer's default special tokens; chat prompts are rendered by the
    tokenizer's chat template with the generation prompt, and the completion is what the template
    adds for the assistant's turn. An eos ends every completion so the policy learns to stop.
    """
    prompt = make_prompt(tokenizer, example.prompt)  # the server's rule (server/prompts.py)
    if isinstance(example.prompt, str):
        completion_text = example.completion
    else:
        full_text = tokenizer.apply_chat_template(
            [*example.prompt, {"role": "assistant", "content": example.completion}], tokenize=False
        )
        if not full_text.startswith(prompt.text):
            raise ValueError(
                "the chat template renders the conversation differently with the answer appended"
            )
        completion_text = full_text[len(prompt.text) :]
    prompt_ids = prompt.token_ids
    completion_ids = tokenizer(completion_text, add_special_tokens=False).input_ids
    if tokenizer.eos_token_id is not None and completion_ids[-1:] != [tokenizer.eos_token_id]:
        completion_ids.append(tokenizer.eos_token_id)
    input_ids = (prompt_ids + completion_ids)[:max_length]
    labels = ([IGNORE] * len(prompt_ids) + completion_ids)[:max_length]
    return {"input_ids": input_ids, "labels": labels}


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int) -> list[list[int]]:
    """Shuffle, sort within windows of 50 batches by length, cut into batches, shuffle batches."""
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * 50
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lengths.__getitem__)
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(features: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded (B, T) tensors; padded label positions are IGNORE, so they carry no loss."""
    input_ids, mask = pad_right([f["input_ids"] for f in features], pad_id)
    labels, _ = pad_right([f["labels"] for f in features], IGNORE)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def sft_step(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
    return completion_loss(logits, batch["labels"]), {}


def finetune(
    base: Path,
    examples: list[SFTExample],
    args: TrainArgs,
    output: Path,
    title: str,
    extra_files: Callable[[], dict[str, dict]] | None = None,
) -> list[dict[str, float]]:
    """Fine-tune the causal LM at `base` on `examples` and publish it at `output` (SFT and RAFT).

    `extra_files()` is called on the main process just before publishing, for manifests.
    """
    check_new_output(output)
    accelerator = make_accelerator(args)
    tokenizer = AutoTokenizer.from_pretrained(base)
    pad_with_eos(tokenizer, "base")
    model = with_lora(AutoModelForCausalLM.from_pretrained(base), args, "CAUSAL_LM")
    features = [encode(tokenizer, e, args.max_length) for e in examples]
    batches = length_grouped_batches([len(f["input_ids"]) for f in features], args.batch_size, args.seed)
    loader = DataLoader(
        features, batch_sampler=batches, collate_fn=lambda fs: collate(fs, tokenizer.pad_token_id)
    )
    model, loader = accelerator.prepare(model, loader)
    history = fit(accelerator, model, loader, sft_step, args, len(loader), title)

    def write(directory: Path) -> None:
        mergeable(accelerator.unwrap_model(model)).save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        write_history(history, directory, title)
        for name, content in (extra_files() if extra_files else {}).items():
            (directory / name).write_text(json.dumps(content, indent=2))

    publish(accelerator, output, write)
    return history


def check_chat_template(base: Path, examples: list[SFTExample], data: Path) -> None:
    """Chat rows need the tokenizer's chat template: say so before any training starts."""
    chat = sum(not isinstance(e.prompt, str) for e in examples)
    if chat and not AutoTokenizer.from_pretrained(base).chat_template:
        raise DataError(
            f"{data}: {chat} rows are chat ('messages', or a list of messages as 'prompt'), but the "
            f"tokenizer of {base} has no chat template; give text prompts or a base with a template"
        )


def main(argv: list[str] | None = None) -> dict:
    args = sft_parser().parse_args(argv)
    checkpoint_dir(args.base, "base model", "--base", generates=True)
    check_new_output(args.output)
    examples = load_sft(args.data)
    check_chat_template(args.base, examples, args.data)
    chat = sum(not isinstance(e.prompt, str) for e in examples)
    log.info("read %d examples from %s (%d chat)", len(examples), args.data, chat)
    history = finetune(args.base, examples, train_args(args), args.output, "sft")
    data = {"examples": len(examples), "chat_examples": chat}
    return summary("sft", args.output, data, {"final_loss": round(history[-1]["loss"], 4)})
