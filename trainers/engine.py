"""What every recipe shares: arguments, the accelerate set-up, the optimisation loop, publishing.

The loop is written once here and takes a recipe's loss function, so gradient accumulation,
clipping, scheduling, logging and progress look the same in SFT, reward and RAFT training.
accelerate does DDP/FSDP/DeepSpeed: `accelerate launch` or `torchrun` start the processes, this
code does not change.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm import tqdm
from transformers import PreTrainedModel

from server.threads import apply_torch_threads
from trainers.arguments import TrainArgs
from trainers.data import RecipeError

log = logging.getLogger(__name__)
Item = TypeVar("Item")


def hold_out(items: list[Item], fraction: float, seed: int, what: str) -> tuple[list[Item], list[Item]]:
    """(held out, training): `items` shuffled by `seed`, their first `fraction` held out for
    evaluation. A fraction of a few items rounds to none: one is held out if one can be spared."""
    items = list(items)
    random.Random(seed).shuffle(items)
    held = int(len(items) * fraction)
    if fraction > 0 and held == 0:
        held = 1 if len(items) >= 2 else 0
    log.info("holding out %d of %d %s for evaluation", held, len(items), what)
    if fraction > 0 and not held:
        log.warning("%d %s: too few to hold any out, so there is no held-out accuracy", len(items), what)
    return items[:held], items[held:]


def summary(recipe: str, output: Path, data: dict, result: dict) -> dict:
    """What every recipe reports at the end, in one shape: what it read, what it made."""
    return {"recipe": recipe, "output": str(Path(output).resolve()), "data": data, "result": result}


def make_accelerator(args: TrainArgs) -> Accelerator:
    # Without an accelerator, accelerate runs multi-process (gloo) only when told it is on CPU;
    # otherwise torchrun's processes would each train alone, unaware of the others.
    on_cpu = not torch.cuda.is_available() and not torch.backends.mps.is_available()
    accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps, cpu=on_cpu)
    apply_torch_threads(args.torch_threads)
    set_seed(args.seed)
    return accelerator


def with_lora(model: PreTrainedModel, args: TrainArgs, task_type: str) -> PreTrainedModel:
    if args.lora_rank <= 0:
        return model
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise RecipeError("--lora-rank needs peft: pip install 'bon[lora]'") from None
    config = LoraConfig(
        r=args.lora_rank, lora_alpha=2 * args.lora_rank, target_modules="all-linear", task_type=task_type
    )
    return get_peft_model(model, config)


def mergeable(model) -> PreTrainedModel:
    """The plain HF model to save: LoRA adapters merged in, so `bon serve` and vLLM load it as is."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


def fit(
    accelerator: Accelerator,
    model: torch.nn.Module,
    batches: Iterable,
    loss_fn: Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict[str, float]]],
    args: TrainArgs,
    steps_per_epoch: int,
    description: str,
    evaluate: Callable[[], dict[str, float]] | None = None,
) -> list[dict[str, float]]:
    """Train `model` (already prepared) for `args.epochs`; returns one history row per optimiser step.

    `loss_fn(model, batch)` returns the loss and extra numbers to log. `evaluate()`, if given,
    runs after each epoch and its numbers join that step's row.
    """
    if not args.learning_rate > 0:
        raise RecipeError(f"--learning-rate is {args.learning_rate}: training would change nothing")
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.learning_rate, weight_decay=args.weight_decay)
    total = max(1, math.ceil(steps_per_epoch / args.gradient_accumulation_steps) * args.epochs)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda update: learning_rate_factor(update, total, args.warmup_ratio)
    )
    optimizer, schedule = accelerator.prepare(optimizer, schedule)

    history: list[dict[str, float]] = []
    bar = tqdm(total=total, desc=description, disable=not accelerator.is_local_main_process)
    step = 0
    for epoch in range(args.epochs):
        model.train()
        for batch in batches:
            with accelerator.accumulate(model):
                loss, extra = loss_fn(model, batch)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(trainable, args.max_grad_norm)
                used = optimizer.param_groups[0]["lr"]  # the rate this update takes, before the step
                optimizer.step()
                schedule.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                step += 1
                # The mean over processes, so every rank logs the same numbers.
                row = {"step": step, "epoch": epoch + 1, "lr": used}
                row["loss"] = accelerator.reduce(loss.detach(), reduction="mean").item()
                row.update(extra)
                history.append(row)
                bar.update()
                bar.set_postfix(loss=f"{row['loss']:.4f}")
        if evaluate is not None:
            model.eval()
            history[-1].update(evaluate())
            model.train()
    bar.close()
    return history


def learning_rate_factor(update: int, total: int, warmup_ratio: float) -> float:
    """The share of the peak learning rate that update `update` (0-based, of `total`) takes: a
    linear warm-up over ceil(warmup_ratio x total) updates, then a linear decay. No update takes
    0 (transformers' schedules give the first warm-up update 0 and, with one update in all, that
    run trained nothing): warm-up climbs from 1/(warmup + 1) of the peak, and the decay ends one
    step above 0."""
    warmup = min(math.ceil(warmup_ratio * total), total - 1)
    return min((update + 1) / (warmup + 1), (total - update) / (total - warmup))


def check_new_output(output: Path) -> None:
    if output.exists():
        raise RecipeError(f"--output {output} already exists; each run writes a new checkpoint directory")


def publish(accelerator: Accelerator, output: Path, write: Callable[[Path], None]) -> None:
    """Write a checkpoint into a temporary sibling, then rename it to `output` in one step.

    A reader (a server watching the parent directory) sees either nothing or the whole checkpoint;
    a run that dies midway leaves only a `.tmp-` directory behind, never a half-written `output`.
    """
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        check_new_output(output)
        output.parent.mkdir(parents=True, exist_ok=True)
        staging = output.parent / f".{output.name}.tmp-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        try:
            write(staging)
            _readable(staging)
            os.rename(staging, output)  # atomic on one filesystem; fails if output appeared meanwhile
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()


def _readable(directory: Path) -> None:
    """The modes a plain file write would give (0666 and 0777 less the umask): safetensors writes
    its files 0600, which a server running as another user cannot read."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def write_history(history: list[dict[str, float]], directory: Path, title: str) -> None:
    """training_history.json and training_curves.png (one panel per logged quantity)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (directory / "training_history.json").write_text(json.dumps(history, indent=1))
    keys = [k for k in dict.fromkeys(k for row in history for k in row) if k not in ("step", "epoch")]
    if not keys:
        return
    figure, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    for axis, key in zip(axes[0], keys, strict=True):
        points = [(row["step"], row[key]) for row in history if key in row]
        axis.plot(*zip(*points, strict=True), marker="." if len(points) < 30 else None)
        axis.set_title(key)
        axis.set_xlabel("step")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(directory / "training_curves.png", dpi=80)
    plt.close(figure)
