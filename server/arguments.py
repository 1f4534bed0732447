"""Command-line parsers of the server's jobs (`bon score`, `bon generate`), and the look every
job's parser shares (the trainers' are in `trainers/arguments.py`).

One look: the job's docstring as written, the default of every flag that has one, and required
flags listed apart (argparse lists them as optional). This module imports nothing heavy: `bon`
parses a command's flags (and answers --help or a usage error) before it imports torch.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
from pathlib import Path


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The job's docstring as written, and the default of every flag that has one."""

    def _get_help_string(self, action):
        if action.default is None or action.required:
            return action.help
        return super()._get_help_string(action)


def job_parser(prog: str, description: str | None):
    """A job's parser, and its group of required flags."""
    parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter)
    return parser, parser.add_argument_group("required")


def module_doc(module: str) -> str | None:
    """A module's docstring, read from its source without importing it: a job's --help must not
    wait for torch (it took 12-17 s when the job's module was imported to build its parser)."""
    spec = importlib.util.find_spec(module)
    source = Path(spec.origin).read_text() if spec and spec.origin else ""
    return ast.get_docstring(ast.parse(source)) if source else None


ENGINES = ["transformers", "vllm"]
DTYPES = ["auto", "float32", "float16", "bfloat16"]
# What every reader's --sample-log takes (server/log/sources.py).
READ_HELP = (
    "a candidate log: a SQLite file, a directory of SQLite shards (*.db), or a postgresql:// URL; "
    "repeat it to read several as one"
)
THREADS_HELP = "intra-op CPU threads for torch; 0: half the cores"


def score_parser() -> argparse.ArgumentParser:
    parser, required = job_parser("bon score", module_doc("server.batch.score"))
    parser.add_argument("input", type=Path, help="rows to score (.jsonl or .parquet)")
    required.add_argument(
        "-o", "--output", type=Path, required=True, help="where the scored rows go (.jsonl or .parquet)"
    )
    required.add_argument(
        "--reward-model",
        action="append",
        required=True,
        help="HF sequence-classification directory, as NAME=DIR or DIR; repeatable: several are "
        "combined as bon serve combines them, each one's raw reward in reward_members (rewards_members)",
    )
    parser.add_argument(
        "--reward-combine", choices=["mean", "min", "uwo"], default="mean", help="as bon serve's"
    )
    parser.add_argument("--reward-weights", help="NAME=W,... as bon serve's (default 1 each)")
    parser.add_argument("--reward-uncertainty-penalty", type=float, default=1.0, help="uwo's lambda")
    parser.add_argument(
        "--step-delimiter",
        default="\n\n",
        help="what ends a step, for process reward models (as bon serve's)",
    )
    parser.add_argument(
        "--step-aggregate",
        choices=["last", "min", "prod", "mean"],
        default="min",
        help="how a process reward model's step scores make one reward; each row also gets its "
        "step_rewards (rewards_steps)",
    )
    parser.add_argument(
        "--policy",
        type=Path,
        help="render chat prompts with this policy's template when the RM has none (as the server does)",
    )
    parser.add_argument("--resume", action="store_true", help="finish a job that was stopped or killed")
    parser.add_argument(
        "--skip-bad-rows", action="store_true", help="skip and count rows that cannot be scored"
    )
    parser.add_argument("--engine", choices=ENGINES, help="default: BON_REWARD_ENGINE, else transformers")
    parser.add_argument("--device", default="cpu", help="cpu, cuda (each process takes cuda:LOCAL_RANK)")
    parser.add_argument(
        "--dtype", default="auto", choices=DTYPES, help="weights dtype; auto keeps the checkpoint's"
    )
    parser.add_argument(
        "--window-rows", type=int, default=4096, help="rows read, sorted and written together"
    )
    parser.add_argument(
        "--batch-tokens", type=int, default=8192, help="padded reward-model tokens per forward pass"
    )
    parser.add_argument("--torch-threads", type=int, default=0, help=THREADS_HELP)
    return parser


def generate_parser() -> argparse.ArgumentParser:
    parser, required = job_parser("bon generate", module_doc("server.batch.generate"))
    required.add_argument("--policy", type=Path, required=True, help="HF causal-LM directory")
    required.add_argument(
        "--reward-model", type=Path, required=True, help="HF sequence-classification directory"
    )
    required.add_argument(
        "--prompts", type=Path, required=True, help='.jsonl or .parquet rows with a "prompt"'
    )
    required.add_argument(
        "--best-of", type=int, required=True, help="candidates sampled and scored per prompt"
    )
    required.add_argument(
        "--sample-log", type=Path, required=True, help="SQLite candidate log (created or appended)"
    )
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens per candidate")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature; 0 is greedy")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling; 1 keeps every token")
    parser.add_argument("--seed", type=int, default=0, help="prompt i samples with seed S + i")
    parser.add_argument("--resume", action="store_true", help="finish a job that was stopped or killed")
    parser.add_argument(
        "--skip-bad-rows", action="store_true", help="skip and count prompts that cannot be used"
    )
    parser.add_argument(
        "--engine", choices=ENGINES, help="what samples; default: BON_ENGINE, else transformers"
    )
    parser.add_argument(
        "--reward-engine", choices=ENGINES, help="what scores; default: BON_REWARD_ENGINE, else transformers"
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (transformers engine)")
    parser.add_argument(
        "--dtype", default="auto", choices=DTYPES, help="weights dtype; auto keeps the checkpoint's"
    )
    parser.add_argument("--window", type=int, default=64, help="prompts in flight together")
    parser.add_argument(
        "--max-batch-tokens", type=int, default=16384, help="token budget of one sampling batch"
    )
    parser.add_argument("--torch-threads", type=int, default=0, help=THREADS_HELP)
    return parser
