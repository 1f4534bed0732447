"""Reward-model recipe: a Bradley-Terry head on an SFT policy, from pairs, rankings and feedback.

    bon train rm --base DIR --data FILE [FILE...] [--sample-log PATH] --output DIR

Each step scores all K responses of every prompt in the batch in one forward pass and uses every
pair of different rank (InstructGPT's K-choose-2); ties give no pair. Loss: mean over pairs of
-log sigmoid(r_w - r_l - margin), plus an optional centering term. The input of each response
is built exactly as `bon serve` builds it, and the result is an HF sequence-classification
directory (num_labels=1, pad token set) that `bon serve` and vLLM load unchanged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from server.checkpoints import checkpoint_dir, pad_with_eos
from server.engines.hf.models import LastTokenReward, pad_right
from server.prompts import scoring_input
from server.reward import fit_tail, write_stats
from trainers.arguments import TrainArgs, rm_parser, train_args
from trainers.data import PreferenceGroup, RecipeError, load_feedback, load_preferences
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
from trainers.losses import bradley_terry_loss, reward_centering

log = logging.getLogger(__name__)


def encode_response(tokenizer: PreTrainedTokenizerBase, prompt, response: str, max_length: int) -> list[int]:
    """The server's RM input rule and length rule (server/prompts.py, server/reward.py). The base
    is the SFT policy, so its tokenizer also renders chat prompts, as the policy's does on the server."""
    return fit_tail(scoring_input(tokenizer, prompt, response, tokenizer), max_length).token_ids


@dataclass
class EncodedGroup:
    responses: list[list[int]]
    pairs: list[tuple[int, int]]
    margin: float


def collate(groups: list[EncodedGroup], pad_id: int) -> dict[str, torch.Tensor]:
    """All responses of all groups flattened into one batch, pairs re-indexed into it."""
    sequences, winners, losers, margins = [], [], [], []
    for group in groups:
        offset = len(sequences)
        sequences += group.responses
        for w, lo in group.pairs:
            winners.append(offset + w)
            losers.append(offset + lo)
            margins.append(group.margin)
    input_ids, mask = pad_right(sequences, pad_id)
    return {
        "input_ids": input_ids,  # (N, T), N = all responses of the batch
        "attention_mask": mask,
        "winners": torch.tensor(winners, dtype=torch.long),  # (P,)
        "losers": torch.tensor(losers, dtype=torch.long),
        "margins": torch.tensor(margins, dtype=torch.float),
    }


def make_step(centering: float):
    def rm_step(
        model: torch.nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        rewards = model(
            batch["input_ids"], batch["attention_mask"]
        )  # (N,) one forward for all K of each prompt
        loss = bradley_terry_loss(rewards, batch["winners"], batch["losers"], batch["margins"])
        if centering:
            loss = loss + reward_centering(rewards, centering)
        accuracy = (rewards[batch["winners"]] > rewards[batch["losers"]]).float().mean().item()
        return loss, {"train_accuracy": accuracy}

    return rm_step


@torch.no_grad()
def evaluate(model: torch.nn.Module, groups: list[EncodedGroup], pad_id: int, device) -> dict[str, float]:
    """Held-out pairwise accuracy, BT loss and reward mean/std."""
    if not groups:
        return {}
    correct = pairs = 0
    losses, rewards_all = [], []
    for start in range(0, len(groups), 16):
        batch = {k: v.to(device) for k, v in collate(groups[start : start + 16], pad_id).items()}
        rewards = model(batch["input_ids"], batch["attention_mask"])
        rewards_all.append(rewards)
        if len(batch["winners"]):
            margin = rewards[batch["winners"]] - rewards[batch["losers"]]
            correct += int((margin > 0).sum())
            pairs += len(margin)
            losses.append(
                bradley_terry_loss(rewards, batch["winners"], batch["losers"], batch["margins"]) * len(margin)
            )
    rewards = torch.cat(rewards_all)
    return {
        "eval_accuracy": correct / max(pairs, 1),
        "eval_loss": float(sum(losses) / max(pairs, 1)),
        "eval_reward_mean": rewards.mean().item(),
        "eval_reward_std": rewards.std().item() if len(rewards) > 1 else 0.0,
    }


@torch.no_grad()
def training_rewards(model: torch.nn.Module, groups: list[EncodedGroup], pad_id: int, device) -> list[float]:
    """The trained model's reward of every training response, in batches of 16 groups (dropout
    off: the rewards it will serve)."""
    model.eval()
    rewards: list[float] = []
    for start in range(0, len(groups), 16):
        batch = collate(groups[start : start + 16], pad_id)
        rewards += model(batch["input_ids"].to(device), batch["attention_mask"].to(device)).tolist()
    return rewards


@torch.no_grad()
def shrink_toward_fresh(model: PreTrainedModel, fraction: float, seed: int) -> None:
    """Shrink and perturb (Ash & Adams, 2020): move each weight `fraction` of the way to a fresh init.

    A policy fine-tuned long on narrow data answers from features that resist being re-purposed
    into a judge: its RM learns the answers' prior long before their relation to the prompt. The
    fresh share restores that plasticity; the SFT share keeps what the policy knows. Normalisation
    layers keep their trained values, since their fresh init (ones, zeros) perturbs nothing.
    """
    torch.manual_seed(seed)
    fresh = type(model)(model.config).to(model.dtype)
    norms = {name for name, module in model.named_modules() if "norm" in type(module).__name__.lower()}
    for (name, weight), (_, init) in zip(model.named_parameters(), fresh.named_parameters(), strict=True):
        if name.rpartition(".")[0] not in norms:
            weight.lerp_(init, fraction)


def policy_with_a_fresh_head(base: Path) -> PreTrainedModel:
    """The policy's body under a new one-label score head. transformers reports the head's weights
    as MISSING in a table that reads like an error; here it is the point, and one line says so."""
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    finally:
        hf_logging.set_verbosity(previous)
    fresh = [name for name, _ in model.named_parameters() if name.split(".")[0] in ("score", "classifier")]
    log.info("starting from %s with a fresh score head (%s): the reward model's only new weights",
             base, ", ".join(fresh) or "none")  # fmt: skip
    return model


def train_reward_model(
    base: Path,
    groups: list[PreferenceGroup],
    args: TrainArgs,
    output: Path,
    eval_fraction: float = 0.1,
    centering: float = 0.0,
    eval_groups: list[PreferenceGroup] | None = None,
    shrink: float = 0.0,
) -> list[dict[str, float]]:
    """Train and publish a reward model; returns the history (the last row holds the eval numbers)."""
    check_new_output(output)
    accelerator = make_accelerator(args)
    tokenizer = AutoTokenizer.from_pretrained(base)
    pad_with_eos(tokenizer, "base")
    model = policy_with_a_fresh_head(base)
    model.config.pad_token_id = tokenizer.pad_token_id
    if shrink:
        shrink_toward_fresh(model, shrink, args.seed)
    model = with_lora(model, args, "SEQ_CLS")

    def encode(group: PreferenceGroup) -> EncodedGroup:
        responses = [encode_response(tokenizer, group.prompt, r, args.max_length) for r in group.responses]
        return EncodedGroup(responses, group.pairs(), group.margin)

    encoded = [g for g in map(encode, groups) if g.pairs]  # all-tie groups teach nothing
    if eval_groups is None:
        held_out, encoded = hold_out(encoded, eval_fraction, args.seed, "groups")
    else:
        held_out = [encode(g) for g in eval_groups]
    if not encoded:
        raise RecipeError("no training pairs: every group is a single response or all ties")

    scorer = LastTokenReward(model)
    loader = DataLoader(
        encoded,
        batch_size=args.batch_size,
        shuffle=True,
        collate_fn=lambda gs: collate(gs, tokenizer.pad_token_id),
    )
    scorer, loader = accelerator.prepare(scorer, loader)
    history = fit(
        accelerator,
        scorer,
        loader,
        make_step(centering),
        args,
        len(loader),
        "reward model",
        evaluate=lambda: evaluate(scorer, held_out, tokenizer.pad_token_id, accelerator.device),
    )

    def write(directory: Path) -> None:
        unwrapped = accelerator.unwrap_model(scorer)
        # Its reward distribution on what it was trained on: what standardises it beside other
        # reward models when bon serve combines several (server/reward.py, reward_stats.json).
        stats = write_stats(
            directory, training_rewards(unwrapped, encoded, tokenizer.pad_token_id, accelerator.device)
        )
        log.info("reward on its training responses: mean %.4f, std %.4f", stats.mean, stats.std)
        trained = mergeable(unwrapped.model)
        trained.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        write_history(history, directory, "reward model")

    publish(accelerator, output, write)
    return history


def main(argv: list[str] | None = None) -> dict:
    parser = rm_parser()
    args = parser.parse_args(argv)
    checkpoint_dir(args.base, "base model", "--base")
    check_new_output(args.output)
    groups = load_preferences(args.data)
    feedback = load_feedback(args.sample_log) if args.sample_log else []
    if not groups + feedback:
        parser.error("no data: give --data FILE and/or --sample-log PATH")
    data = {
        "groups": len(groups),
        "pairs": sum(len(g.pairs()) for g in groups),
        "feedback_groups": len(feedback),
        "feedback_pairs": sum(len(g.pairs()) for g in feedback),
    }
    log.info(
        "read %(groups)d preference groups (%(pairs)d pairs) and %(feedback_groups)d feedback groups "
        "(%(feedback_pairs)d pairs)",
        data,
    )
    groups += feedback
    history = train_reward_model(
        args.base,
        groups,
        train_args(args),
        args.output,
        args.eval_fraction,
        args.centering,
        shrink=args.shrink,
    )
    result = {k: round(v, 4) for k, v in history[-1].items() if k.startswith("eval_")}
    if not result:
        result = {"note": "nothing was held out (--eval-fraction 0, or too few groups): no held-out accuracy"}
    return summary("rm", args.output, data, result)
