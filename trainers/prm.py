"""Process reward model recipe: step-labelled answers into a PRM in Math-Shepherd's layout.

    bon train prm --base DIR --data steps.jsonl --output DIR

Rows are {"prompt", "steps": [str, ...], "labels": [...]}, a label 1 (a good step), 0 (a bad one)
or the probability that the step is good (`bon label-steps` writes such rows). The PRM is the
base causal LM read at a step token placed after each step, which the tokenizer gains if it lacks
it: a step's score is softmax over the logits of the bad and good tokens, taking good
(Math-Shepherd, Wang et al. 2024). The loss is the cross-entropy of that score against the label,
at the step tokens only. An answer is its steps joined by --step-delimiter, marked and encoded
exactly as `bon serve` reads a PRM (server/process_reward.py); the output is the base's own
architecture with a `bon_reward.json` beside it, which both engines load.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from server.checkpoints import checkpoint_dir, pad_with_eos
from server.engines.hf.models import pad_right
from server.engines.hf.process import StepLogits
from server.failures import CheckpointError
from server.process_reward import CONFIG_FILE, StepLayout, step_layout
from server.prompts import scoring_input
from server.reward import fit_tail
from trainers.arguments import TrainArgs, prm_parser, train_args
from trainers.data import RecipeError, StepExample, load_steps
from trainers.engine import (
    check_new_output,
    fit,
    hold_out,
    make_accelerator,
    mergeable,
    publish,
    summary,
    with_lora,
    write_history,
)

log = logging.getLogger(__name__)


@dataclass
class EncodedAnswer:
    token_ids: list[int]
    positions: list[int]  # where the step tokens are: the labels' places
    labels: list[float]  # of the steps whose token survived the length rule (the last ones)


def reward_file(step_token: str, good_token: str, bad_token: str) -> dict[str, str]:
    return {"kind": "process", "step_token": step_token, "good_token": good_token, "bad_token": bad_token}


def encode_answer(
    tokenizer: PreTrainedTokenizerBase, layout: StepLayout, example: StepExample, max_length: int
) -> EncodedAnswer:
    """The server's PRM input of the answer (its steps joined by the delimiter), after its length
    rule; a step cut off at the front loses its label with it."""
    answer = layout.delimiter.join(example.steps)
    ids = fit_tail(scoring_input(tokenizer, example.prompt, answer, tokenizer, layout), max_length).token_ids
    positions = [t for t, token in enumerate(ids) if token == layout.step_id]
    return EncodedAnswer(ids, positions, example.labels[len(example.labels) - len(positions) :])


def collate(answers: list[EncodedAnswer], pad_id: int) -> dict[str, torch.Tensor]:
    input_ids, mask = pad_right([a.token_ids for a in answers], pad_id)
    rows = [i for i, a in enumerate(answers) for _ in a.positions]
    return {
        "input_ids": input_ids,  # (B, T)
        "attention_mask": mask,
        "rows": torch.tensor(rows, dtype=torch.long),  # (S,) every step of the batch
        "positions": torch.tensor([t for a in answers for t in a.positions], dtype=torch.long),  # (S,)
        "labels": torch.tensor([y for a in answers for y in a.labels], dtype=torch.float),  # (S,)
    }


def step_log_probs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(S, 2) log-probabilities of [bad, good] at every step token of the batch."""
    logits = model(batch["input_ids"], batch["attention_mask"])  # (B, T, 2)
    return torch.log_softmax(logits[batch["rows"], batch["positions"]], -1)


def step_loss(log_probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against hard or soft labels: -(y log p_good + (1 - y) log p_bad), averaged."""
    return -(labels * log_probs[:, 1] + (1 - labels) * log_probs[:, 0]).mean()


def prm_step(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    log_probs = step_log_probs(model, batch)
    correct = ((log_probs[:, 1].exp() > 0.5) == (batch["labels"] >= 0.5)).float().mean().item()
    return step_loss(log_probs, batch["labels"]), {"train_step_accuracy": correct}


@torch.no_grad()
def evaluate(model: torch.nn.Module, answers: list[EncodedAnswer], pad_id: int, device) -> dict[str, float]:
    """Held-out step accuracy (score above 0.5 against a label of at least 0.5) and loss."""
    if not answers:
        return {}
    correct = steps = 0
    loss = 0.0
    for start in range(0, len(answers), 16):
        batch = {k: v.to(device) for k, v in collate(answers[start : start + 16], pad_id).items()}
        log_probs = step_log_probs(model, batch)
        correct += int(((log_probs[:, 1].exp() > 0.5) == (batch["labels"] >= 0.5)).sum())
        loss += step_loss(log_probs, batch["labels"]).item() * len(batch["labels"])
        steps += len(batch["labels"])
    return {"eval_step_accuracy": correct / steps, "eval_loss": loss / steps, "eval_steps": float(steps)}


def with_step_token(tokenizer: PreTrainedTokenizerBase, model, step_token: str) -> None:
    """Give the tokenizer the step token as one token (and the model its embedding) if it lacks it."""
    if len(tokenizer.encode(step_token, add_special_tokens=False)) == 1:
        return
    tokenizer.add_tokens([step_token])
    model.resize_token_embeddings(len(tokenizer))
    log.info("added the step token %r to the tokenizer (id %d)", step_token, len(tokenizer) - 1)


def train_prm(
    base: Path,
    examples: list[StepExample],
    args: TrainArgs,
    output: Path,
    delimiter: str,
    tokens: dict[str, str],
    eval_fraction: float = 0.1,
) -> list[dict[str, float]]:
    """Train and publish a PRM; returns the history (the last row holds the eval numbers)."""
    check_new_output(output)
    accelerator = make_accelerator(args)
    tokenizer = AutoTokenizer.from_pretrained(base)
    pad_with_eos(tokenizer, "base")
    model = AutoModelForCausalLM.from_pretrained(base)
    with_step_token(tokenizer, model, tokens["step_token"])
    try:
        layout = step_layout(tokens, base, model.config, tokenizer, delimiter)
    except CheckpointError as error:
        raise RecipeError(f"{error}: pick single-token --good-token and --bad-token") from None
    model = with_lora(model, args, "CAUSAL_LM")

    encoded = [encode_answer(tokenizer, layout, e, args.max_length) for e in examples]
    if dropped := sum(1 for a in encoded if not a.positions):
        log.warning(
            "%d answer(s) lost every step to --max-length %d and teach nothing", dropped, args.max_length
        )
    encoded = [a for a in encoded if a.positions]
    held_out, encoded = hold_out(encoded, eval_fraction, args.seed, "answers")
    if not encoded:
        raise RecipeError("no answer to train on (every one was held out or cut to nothing)")

    reader = StepLogits(model, layout)
    loader = DataLoader(
        encoded,
        batch_size=args.batch_size,
        shuffle=True,
        collate_fn=lambda b: collate(b, tokenizer.pad_token_id),
    )
    reader, loader = accelerator.prepare(reader, loader)
    history = fit(
        accelerator,
        reader,
        loader,
        prm_step,
        args,
        len(loader),
        "process reward model",
        evaluate=lambda: evaluate(reader, held_out, tokenizer.pad_token_id, accelerator.device),
    )

    def write(directory: Path) -> None:
        trained = mergeable(accelerator.unwrap_model(reader).model)
        trained.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        (directory / CONFIG_FILE).write_text(json.dumps(tokens, ensure_ascii=False) + "\n")
        write_history(history, directory, "process reward model")

    publish(accelerator, output, write)
    return history


def main(argv: list[str] | None = None) -> dict:
    args = prm_parser().parse_args(argv)
    checkpoint_dir(args.base, "base model", "--base")
    check_new_output(args.output)
    examples = load_steps(args.data, args.step_delimiter)
    if not examples:
        raise RecipeError(f"{args.data}: no rows")
    labels = [y for e in examples for y in e.labels]
    data = {
        "answers": len(examples),
        "steps": len(labels),
        "good_share": round(sum(labels) / len(labels), 4),
    }
    log.info("read %(answers)d answers with %(steps)d labelled steps", data)
    tokens = reward_file(args.step_token, args.good_token, args.bad_token)
    history = train_prm(
        args.base, examples, train_args(args), args.output, args.step_delimiter, tokens, args.eval_fraction
    )
    result = {k: round(v, 4) for k, v in history[-1].items() if k.startswith("eval_")}
    if not result:
        result = {
            "note": "nothing was held out (--eval-fraction 0, or too few answers): no held-out accuracy"
        }
    return summary("prm", args.output, data, result)
