"""Automatic step labels (Math-Shepherd, Wang et al. 2024): what makes PRMs trainable without
people labelling steps.

    bon label-steps --policy DIR --prompts FILE --checker module:callable --rollouts K -o steps.jsonl

For each prompt the policy writes --answers answers; each is split into steps at
--step-delimiter. From the end of each step but the last, K completions are continued; a step's
label is whether any of them (hard) or what share of them (soft) reaches an answer the checker
accepts. The last step's label is the checker's verdict on the answer itself. Prompt rows are
{"prompt": str | messages, "reference": the known answer}; the checker is called as
(prompt text, completion, reference) and accepts with a true value or a number of at least 0.5
(`server.rules:exact_match` compares the last number). Output rows are what `bon train prm`
reads: {"prompt", "steps", "labels", "reference"}. Sampling is the server's own code, seeded:
the same command writes the same file.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from server.engines.contract import Candidate, SampleRequest, SamplingParams
from server.engines.hf.decoding import generate
from server.engines.hf.models import HFPolicy, load_policy
from server.process_reward import split_steps
from server.prompts import Prompt as ServedPrompt
from server.prompts import make_prompt
from server.rules import Rule, RuleSpecError, load_rule
from server.seeds import expansion_seed, prompt_seed
from server.threads import apply_torch_threads
from trainers.arguments import label_steps_parser
from trainers.data import DataError, Prompt, RecipeError, read_jsonl, read_prompt

log = logging.getLogger(__name__)


@dataclass
class Task:
    prompt: Prompt
    reference: str | None


@dataclass
class Answer:
    """A sampled answer to label: the prompt as served, and the answer's steps."""

    task: Task
    served: ServedPrompt
    steps: list[str]
    text: str
    seed: int


def load_tasks(path: Path) -> list[Task]:
    tasks = []
    for number, record in read_jsonl(path):
        where = f"{path}:{number}"
        reference = record.get("reference")
        if reference is not None and not isinstance(reference, str):
            raise DataError(f"{where}: 'reference' must be a string (the known answer)")
        tasks.append(Task(read_prompt(record, where), reference))
    return tasks


def accepted(checker: Rule, answer: Answer, completion: str) -> bool:
    verdict = checker.function(answer.served.text, completion, answer.task.reference)
    return bool(verdict) if isinstance(verdict, bool) else float(verdict) >= 0.5


def batched(requests: list[SampleRequest], policy: HFPolicy, rows: int) -> list[list[Candidate]]:
    """Every request decoded, about `rows` sequences at a time."""
    out: list[list[Candidate]] = []
    start = 0
    while start < len(requests):
        end, total = start, 0
        while end < len(requests) and (end == start or total + requests[end].n <= rows):
            total += requests[end].n
            end += 1
        out += generate(policy, requests[start:end])
        start = end
    return out


def step_prefixes(answer: Answer, delimiter: str) -> list[str]:
    """The answer up to the end of each step but the last, ready to be continued."""
    return [delimiter.join(answer.steps[: i + 1]) + delimiter for i in range(len(answer.steps) - 1)]


@torch.inference_mode()
def label_answers(
    policy: HFPolicy, answers: list[Answer], checker: Rule, params: SamplingParams, args
) -> list[dict]:
    """Each answer's steps with their labels, from K rollouts off every step but the last."""
    tokenizer = policy.tokenizer
    requests, owners = [], []
    for a, answer in enumerate(answers):
        for i, prefix in enumerate(step_prefixes(answer, args.step_delimiter)):
            ids = answer.served.token_ids + tokenizer(prefix, add_special_tokens=False).input_ids
            left = max(1, args.max_tokens - len(ids) + len(answer.served.token_ids))
            seed = expansion_seed(answer.seed, i, 0)
            requests.append(
                SampleRequest(ids, args.rollouts, replace(params, max_tokens=left, seed=seed), policy)
            )
            owners.append((a, i, prefix))
    rollouts = batched(requests, policy, args.batch_size)
    shares: dict[tuple[int, int], float] = {}
    for (a, i, prefix), candidates in zip(owners, rollouts, strict=True):
        right = [accepted(checker, answers[a], prefix + c.text) for c in candidates]
        shares[(a, i)] = float(any(right)) if args.labels == "hard" else sum(right) / len(right)
    rows = []
    for a, answer in enumerate(answers):
        last = float(accepted(checker, answer, answer.text))
        labels = [shares[(a, i)] for i in range(len(answer.steps) - 1)] + [last]
        rows.append(
            {
                "prompt": answer.task.prompt,
                "steps": answer.steps,
                "labels": labels,
                "reference": answer.task.reference,
            }
        )
    return rows


def sample_answers(
    policy: HFPolicy, tasks: list[Task], params: SamplingParams, args, offset: int
) -> list[Answer]:
    """--answers answers to each task, the one at place `offset + i` of the file seeded by it."""
    served = [make_prompt(policy.tokenizer, t.prompt) for t in tasks]
    seeds = [prompt_seed(params.seed, offset + i) for i in range(len(tasks))]
    requests = [
        SampleRequest(p.token_ids, args.answers, replace(params, seed=seed), policy)
        for p, seed in zip(served, seeds, strict=True)
    ]
    answers = []
    for task, prompt, seed, candidates in zip(
        tasks, served, seeds, batched(requests, policy, args.batch_size), strict=True
    ):
        for j, c in enumerate(candidates):
            steps = split_steps(c.text, args.step_delimiter)
            answers.append(Answer(task, prompt, steps, c.text, (seed or 0) + j))
    return answers


def main(argv: list[str] | None = None) -> dict:
    args = label_steps_parser().parse_args(argv)
    if args.rollouts < 1 or args.answers < 1 or args.max_tokens < 1 or args.batch_size < 1:
        raise RecipeError("--rollouts, --answers, --max-tokens and --batch-size must be at least 1")
    if not args.step_delimiter:
        raise RecipeError("--step-delimiter must not be empty")
    if args.output.exists():
        raise RecipeError(f"-o {args.output} exists; choose a new file")
    try:
        checker = load_rule("checker", args.checker, "--checker")
    except RuleSpecError as error:
        raise RecipeError(str(error)) from None
    tasks = load_tasks(args.prompts)
    if not tasks:
        raise RecipeError(f"{args.prompts}: no prompts")
    apply_torch_threads(args.torch_threads)
    policy = load_policy(args.policy, "cuda" if torch.cuda.is_available() else "cpu", "auto")
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    rows: list[dict] = []
    chunk = max(1, args.batch_size // args.answers)
    for start in tqdm(range(0, len(tasks), chunk), desc="labelling", unit=" chunks", dynamic_ncols=True):
        answers = sample_answers(policy, tasks[start : start + chunk], params, args, start)
        rows += label_answers(policy, answers, checker, params, args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    partial = args.output.with_name(f".{args.output.name}.partial")
    partial.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    partial.rename(args.output)
    labels = [y for row in rows for y in row["labels"]]
    return {
        "output": str(args.output.resolve()),
        "answers": len(rows),
        "steps": len(labels),
        "good_share": round(sum(labels) / len(labels), 4),
        "answers_right": round(sum(row["labels"][-1] for row in rows) / len(rows), 4),
        "rollouts": sum(args.rollouts * (len(row["steps"]) - 1) for row in rows),
    }
