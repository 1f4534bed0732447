"""Command-line parsers of the trainers' commands (`bon train sft|rm|raft`, `bon eval`, `bon demo`)
and the hyperparameters every recipe shares.

Nothing heavy is imported here: `bon` parses a command's flags, and answers --help or a usage
error, before the recipe (and torch) is imported.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from pathlib import Path

from server.arguments import READ_HELP, THREADS_HELP, HelpFormatter, job_parser, module_doc
from server.rules import LAST_NUMBER


@dataclass
class TrainArgs:
    """Hyperparameters shared by the recipes; defaults suit fine-tuning a real pretrained model."""

    epochs: int = 1
    learning_rate: float = 1e-5  # full fine-tuning of a pretrained LM; tiny models from scratch want ~1e-3
    batch_size: int = 8  # per process, before accumulation
    max_length: int = 1024
    seed: int = 0
    gradient_accumulation_steps: int = 1
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lora_rank: int = 0  # > 0 trains LoRA adapters (peft) and merges them into the saved checkpoint
    torch_threads: int = 0  # 0: half the cores, so a run beside a server does not take them all


# The --help line of each TrainArgs field.
TRAIN_HELP = {
    "epochs": "passes over the data",
    "learning_rate": "peak learning rate (linear warm-up, then linear decay; every update's is > 0)",
    "batch_size": "examples per step and process, before accumulation",
    "max_length": "tokens per example; longer ones are cut",
    "seed": "seeds data order, initialisation and sampling",
    "gradient_accumulation_steps": "steps whose gradients add up before one update",
    "warmup_ratio": "share of the updates spent warming up",
    "weight_decay": "AdamW weight decay",
    "max_grad_norm": "gradient clipping norm",
    "lora_rank": "> 0: train LoRA adapters of this rank (peft) and merge them when saving",
    "torch_threads": THREADS_HELP,
}


def add_train_args(parser: argparse.ArgumentParser, **defaults) -> None:
    """One flag per TrainArgs field; a recipe may change a default (e.g. a reward model's lr)."""
    base = TrainArgs(**defaults)
    group = parser.add_argument_group("training")
    for name, value in asdict(base).items():
        group.add_argument(
            "--" + name.replace("_", "-"), type=type(value), default=value, help=TRAIN_HELP[name]
        )


def train_args(namespace: argparse.Namespace) -> TrainArgs:
    return TrainArgs(**{name: getattr(namespace, name) for name in TrainArgs.__dataclass_fields__})


def sft_parser() -> argparse.ArgumentParser:
    parser, required = job_parser("bon train sft", module_doc("trainers.sft"))
    required.add_argument("--base", type=Path, required=True, help="HF causal-LM directory to start from")
    required.add_argument("--data", type=Path, required=True, help="JSONL of prompt/completion or messages")
    required.add_argument("--output", type=Path, required=True, help="new directory for the checkpoint")
    add_train_args(parser)
    return parser


def rm_parser() -> argparse.ArgumentParser:
    parser, required = job_parser("bon train rm", module_doc("trainers.reward"))
    required.add_argument("--base", type=Path, required=True, help="SFT policy directory to start from")
    required.add_argument("--output", type=Path, required=True, help="new directory for the reward model")
    parser.add_argument("--data", type=Path, nargs="*", default=[], help="JSONL pairs or rankings")
    parser.add_argument(
        "--sample-log", action="append", help=f"also train on the feedback bon serve stored: {READ_HELP}"
    )
    parser.add_argument("--eval-fraction", type=float, default=0.1, help="prompts held out for evaluation")
    parser.add_argument("--centering", type=float, default=0.0, help="coefficient of mean(r^2)")
    parser.add_argument(
        "--shrink",
        type=float,
        default=0.0,
        help="start this fraction of the way from the SFT weights to a fresh init (shrink and perturb); "
        "0.3-0.7 when the policy was fine-tuned long on narrow data",
    )
    add_train_args(parser, learning_rate=5e-6, batch_size=4, max_length=1024)
    return parser


def prm_parser() -> argparse.ArgumentParser:
    parser, required = job_parser("bon train prm", module_doc("trainers.prm"))
    required.add_argument("--base", type=Path, required=True, help="causal-LM directory to start from")
    required.add_argument(
        "--data", type=Path, required=True, help='JSONL of {"prompt", "steps", "labels"} (bon label-steps)'
    )
    required.add_argument("--output", type=Path, required=True, help="new directory for the PRM")
    parser.add_argument("--step-delimiter", default="\n\n", help="what joins the steps (as bon serve's)")
    parser.add_argument(
        "--step-token", default="ки", help="placed after each step; added if the vocabulary lacks it"
    )
    parser.add_argument("--good-token", default="+", help="its logit at the step token reads good")
    parser.add_argument("--bad-token", default="-", help="its logit at the step token reads bad")
    parser.add_argument("--eval-fraction", type=float, default=0.1, help="answers held out for evaluation")
    add_train_args(parser, learning_rate=1e-5, batch_size=8, max_length=1024)
    return parser


def label_steps_parser() -> argparse.ArgumentParser:
    parser, required = job_parser("bon label-steps", module_doc("trainers.label_steps"))
    required.add_argument(
        "--policy", type=Path, required=True, help="the policy that writes and continues answers"
    )
    required.add_argument(
        "--prompts",
        type=Path,
        required=True,
        help='JSONL: a "prompt" and a "reference" (the answer) per line',
    )
    required.add_argument(
        "--checker",
        required=True,
        help="module:callable(prompt, completion, reference) -> bool or float in [0, 1]: is the answer right",
    )
    required.add_argument("-o", "--output", type=Path, required=True, help="steps JSONL for bon train prm")
    parser.add_argument("--rollouts", type=int, default=8, help="completions continued from each step (K)")
    parser.add_argument("--answers", type=int, default=2, help="answers sampled and labelled per prompt")
    parser.add_argument(
        "--labels",
        choices=["hard", "soft"],
        default="soft",
        help="hard: any rollout right; soft: the share right",
    )
    parser.add_argument("--step-delimiter", default="\n\n", help="what ends a step (as bon serve's)")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens of an answer, and of a rollout")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    parser.add_argument("--seed", type=int, default=0, help="seeds every answer and rollout")
    parser.add_argument("--batch-size", type=int, default=64, help="sequences decoded together")
    parser.add_argument("--torch-threads", type=int, default=0, help=THREADS_HELP)
    return parser


def raft_parser() -> argparse.ArgumentParser:
    parser, required = job_parser("bon train raft", module_doc("trainers.raft"))
    required.add_argument("--policy", type=Path, required=True, help="the policy to improve (not modified)")
    required.add_argument(
        "--output", type=Path, required=True, help="new checkpoint directory (must not exist)"
    )
    source = parser.add_argument_group("data: the candidate log, or self-sampling")
    source.add_argument("--sample-log", action="append", help=f"bon serve's candidates: {READ_HELP}")
    source.add_argument(
        "--since", type=float, help="unix time; default: the parent RAFT run's window end, or all"
    )
    source.add_argument("--prompts", type=Path, help="JSONL prompts for self-sampling")
    source.add_argument("--reward-model", type=Path, help="RM for self-sampling")
    source.add_argument(
        "--iterations", type=int, default=1, help="self-sampling rounds (sample, keep, train)"
    )
    source.add_argument(
        "-k", "--samples-per-prompt", type=int, default=8, help="self-sampling: candidates per prompt"
    )
    source.add_argument("--temperature", type=float, default=1.0, help="self-sampling temperature")
    source.add_argument("--max-new-tokens", type=int, default=128, help="self-sampling: tokens per candidate")
    add_selection_args(parser)
    add_train_args(parser)
    return parser


def add_selection_args(parser: argparse.ArgumentParser) -> None:
    """Which logged candidates RAFT trains on (trainers.raft.Selection)."""
    pick = parser.add_argument_group("selection")
    pick.add_argument("--top-k", type=int, default=1, help="keep the best k per prompt (local ranking)")
    pick.add_argument("--top-fraction", type=float, help="keep the best fraction overall (global ranking)")
    pick.add_argument("--min-reward", type=float, help="keep no candidate below this reward")
    pick.add_argument("--min-candidates", type=int, default=1, help="skip prompts with fewer candidates")


def retrain_parser() -> argparse.ArgumentParser:
    parser, required = job_parser("bon retrain", module_doc("trainers.retrain"))
    required.add_argument(
        "--published", type=Path, required=True, help="where checkpoints are published (what --watch reads)"
    )
    required.add_argument("--sample-log", action="append", required=True, help=READ_HELP)
    required.add_argument("--reward-model", type=Path, required=True, help="scores the evaluation's samples")
    required.add_argument(
        "--eval-prompts", type=Path, required=True, help='held-out JSONL, a "prompt" per line'
    )
    gates = parser.add_argument_group("gates: a candidate is published only if it passes all")
    gates.add_argument(
        "--min-win-rate",
        type=float,
        default=0.5,
        help="least reward-model win rate of the candidate's samples over the current checkpoint's",
    )
    gates.add_argument(
        "--max-kl", type=float, help="most KL(candidate || reference) in nats (default: no gate)"
    )
    gates.add_argument(
        "--reference", type=Path, help="KL's reference (default: the first policy the rounds started from)"
    )
    gates.add_argument(
        "--min-samples", type=int, default=16, help="fewer new finished candidates than this: nothing to do"
    )
    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument("-k", type=int, default=8, help="samples per eval prompt and policy")
    evaluation.add_argument("--max-tokens", type=int, default=16, help="tokens per evaluation sample")
    servers = parser.add_argument_group("replicas")
    servers.add_argument(
        "--servers",
        default="",
        help="comma-separated base URLs of the replicas to move to the new checkpoint",
    )
    servers.add_argument(
        "--notify",
        choices=["reload", "watch"],
        default="reload",
        help="reload: POST /admin/reload to each (BON_ADMIN_KEY); watch: the replicas run --watch, only wait",
    )
    servers.add_argument(
        "--wait-seconds", type=float, default=300, help="how long each replica has to report the new version"
    )
    add_selection_args(parser)
    add_train_args(parser)
    return parser


GOLD_SCORERS = ["demo"]  # trainers.evaluation.run.GOLD


def eval_parser() -> argparse.ArgumentParser:
    parser, required = job_parser("bon eval", module_doc("trainers.evaluation.run"))
    required.add_argument(
        "--output", type=Path, required=True, help="directory for eval.json, report.md, plots"
    )
    parser.add_argument(
        "--samples",
        action="append",
        help="scored samples, no models needed: a .jsonl/.parquet file, or candidate logs (a SQLite "
        "file, a directory of shards, a postgresql:// URL; repeatable)",
    )
    parser.add_argument(
        "--policy", type=Path, action="append", default=[], help="a policy to sample; repeatable"
    )
    parser.add_argument("--reference", type=Path, help="the policy KL and win rates are measured against")
    parser.add_argument("--reward-model", type=Path, help="scores the samples drawn from models")
    parser.add_argument("--prompts", type=Path, help='JSONL, a "prompt" (string or messages) per line')
    parser.add_argument("-k", type=int, default=16, help="samples per prompt and policy; N goes up to K")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens per sample")
    parser.add_argument("--seed", type=int, default=0, help="seeds the sampling")
    parser.add_argument("--gold", choices=GOLD_SCORERS, help="a gold scorer: demo = bon demo's suite")
    parser.add_argument(
        "--soft-temperatures", default="0.5,1,2", help="soft selection's temperatures compared (rules_at_n)"
    )
    parser.add_argument(
        "--answer-pattern",
        default=LAST_NUMBER,
        help="vote's answer: a regex with one group (default: the last number)",
    )
    parser.add_argument("--torch-threads", type=int, default=0, help=THREADS_HELP)
    return parser


@dataclass
class DemoConfig:
    output: Path
    suite: str = "chars"  # chars: one-character answers; steps: chains of additions (a PRM's task)
    seed: int = 0
    n: int = 16  # best-of-N measured on held-out prompts
    prompts_per_task: int = 8000
    mistake_rate: float = 0.35  # share of SFT demonstrations that answer wrong
    rm_samples: int = 8  # candidates per prompt ranked by the gold scorer for RM training
    rm_prompts: int = 8000
    rounds: int = 3
    round_prompts: int = 1200  # training-split prompts sent through the server per RAFT round
    serve_best_of: int = 8
    max_new_tokens: int = 8
    arch: str = "llama"  # learned both tasks in 3 epochs, where GPT-2 needed 20 (DEVELOPERS.md)
    hidden: int = 128
    layers: int = 4
    sft_epochs: int = 3
    sft_learning_rate: float = 2e-3
    rm_epochs: int = 3
    rm_learning_rate: float = 1e-3
    rm_shrink: float = 0.5  # start halfway from the SFT weights to a fresh init (DEVELOPERS.md)
    raft_epochs: int = 2
    raft_learning_rate: float = 2e-4
    rollouts: int = 4  # steps suite: rollouts from each step, for its labels
    label_prompts: int = 1500  # steps suite: prompts whose answers' steps are labelled
    prm_epochs: int = 3
    prm_learning_rate: float = 1e-3


DEMO_HELP = {
    "suite": "chars: one-character answers, an outcome RM; steps: chains of additions, a process RM",
    "seed": "seeds the data, every model and every sample",
    "n": "best-of-N measured on the held-out prompts",
    "prompts_per_task": "prompts made for each of the two tasks (training and held-out splits)",
    "mistake_rate": "share of SFT demonstrations that answer wrong, for best-of-N to fix",
    "rm_samples": "candidates per prompt ranked by the gold scorer for reward-model training",
    "rm_prompts": "prompts whose ranked candidates train the reward model",
    "rounds": "RAFT rounds through the server (0: stop after the reward model)",
    "round_prompts": "training-split prompts sent through the HTTP API per RAFT round",
    "serve_best_of": "best_of of the requests the demo sends the server",
    "max_new_tokens": "tokens per sampled answer",
    "arch": "policy and reward-model architecture",
    "hidden": "hidden size of both tiny models",
    "layers": "layers of both tiny models",
    "sft_epochs": "SFT passes over the demonstrations",
    "sft_learning_rate": "SFT peak learning rate",
    "rm_epochs": "reward-model passes over its rankings",
    "rm_learning_rate": "reward-model peak learning rate",
    "rm_shrink": "start the RM this fraction of the way from the SFT weights to a fresh init",
    "raft_epochs": "passes over each RAFT round's kept candidates",
    "raft_learning_rate": "RAFT peak learning rate",
    "rollouts": "steps suite: completions continued from each step to label it (bon label-steps)",
    "label_prompts": "steps suite: prompts whose two sampled answers are step-labelled for the PRM",
    "prm_epochs": "steps suite: PRM passes over the labelled answers",
    "prm_learning_rate": "steps suite: PRM peak learning rate",
}


def demo_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bon demo", description=module_doc("trainers.demo.pipeline"), formatter_class=HelpFormatter
    )
    required = parser.add_argument_group("required")
    required.add_argument("--output", type=Path, required=True, help="directory for the models and demo.json")
    for name, field in DemoConfig.__dataclass_fields__.items():
        if name != "output":
            choices = {"arch": ["llama", "gpt2", "qwen2"], "suite": ["chars", "steps"]}.get(name)
            parser.add_argument(
                "--" + name.replace("_", "-"),
                type=type(field.default),
                default=field.default,
                choices=choices,
                help=DEMO_HELP[name],
            )
    return parser
