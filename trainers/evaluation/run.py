"""`bon eval`: reward vs N, KL, win rate and diversity, as eval.json, report.md and plots.

From samples already scored (what `bon export-samples` writes works as is):

    bon eval --samples FILE --output DIR [--gold demo]

FILE (.jsonl or .parquet) has {"prompt", "completion", "reward"} rows, optionally "gold"; rows are
grouped by prompt, and by "policy" when rows carry one (an exported log spanning RAFT reloads
gives one report entry per policy version).

From models, sampling K per prompt from each policy and from the reference:

    bon eval --policy DIR [--policy DIR ...] --reference DIR --reward-model DIR --prompts FILE \\
             -k 16 --output DIR [--gold demo]

adds what needs the models: KL(policy || reference) from each policy's own samples, and win rates
against the reference. Samples are drawn at temperature 1 with nothing cut from the distribution,
so they are the policy's own and the KL estimate is unbiased. `--gold demo` scores `bon demo`'s
suite with its programmatic gold scorer, next to the reward model.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from server.batch.tables import BadInput, read_rows, table_format
from server.engines.contract import SamplingParams
from server.engines.hf.models import HFPolicy, load_policy, load_reward_model, pad_right
from server.log.export import export_record
from server.log.sources import is_log, read_records, shown
from server.prompts import reward_input
from server.seeds import prompt_seed
from server.threads import apply_torch_threads
from trainers.arguments import eval_parser
from trainers.data import Prompt, RecipeError, load_prompts
from trainers.demo.tasks import gold_score, item_of
from trainers.evaluation.measures import Pool, RuleSettings, measure
from trainers.evaluation.report import write_report
from trainers.raft import prompt_key, sample_candidates

log = logging.getLogger(__name__)


def demo_gold(prompt: Prompt, completion: str) -> float:
    item = item_of(prompt) if isinstance(prompt, str) else None
    if item is None:
        raise BadInput(f"--gold demo scores bon demo's suite only; {prompt!r} is not one of its prompts")
    return gold_score(item, completion)


GOLD = {"demo": demo_gold}


# --- from samples ---------------------------------------------------------------------------------


def _policy_name(policy: Any) -> str:
    """A report entry's name; the whole version, so two RAFT checkpoints in same-named
    directories whose versions share their first characters stay two entries."""
    if isinstance(policy, dict):  # export-samples: {"path", "version"}
        return f"{Path(str(policy.get('path'))).name}@{policy.get('version')}"
    return str(policy)


def sample_rows(sources: list[str]) -> Iterator[tuple[dict, str]]:
    """(record, where) of every scored sample: candidate logs read as one (as export-samples
    writes them), or one .jsonl/.parquet table."""
    if all(is_log(source) for source in sources):
        for number, record in enumerate(read_records(sources), 1):
            yield export_record(record), f"log record {number}"
        return
    if len(sources) != 1:
        raise BadInput("--samples takes one .jsonl/.parquet file, or candidate logs (repeatable)")
    path = Path(sources[0])
    table_format(path)
    for row in read_rows(path, window=4096):
        if isinstance(row, BadInput):
            raise row
        yield row.record, row.place


def pools_from_samples(sources: list[str], gold) -> dict[str, list[Pool]]:
    """Pools per policy, per prompt, in first-seen order."""
    policies: dict[str, dict[str, Pool]] = {}
    pruned = 0
    default_policy = Path(sources[0]).stem if len(sources) == 1 else "samples"
    for record, place in sample_rows(sources):
        if record.get("pruned"):  # early rejection stopped it: a partial text, not a sample
            pruned += 1
            continue
        missing = [k for k in ("prompt", "completion", "reward") if k not in record]
        if missing:
            raise BadInput(
                f'{place}: missing {", ".join(missing)}; rows need "prompt", "completion" and "reward"'
            )
        if not isinstance(record["reward"], int | float) or not isinstance(record["completion"], str):
            raise BadInput(f'{place}: "reward" must be a number and "completion" a string')
        prompt = record["prompt"]
        pools = policies.setdefault(_policy_name(record.get("policy", default_policy)), {})
        pool = pools.setdefault(
            prompt_key(prompt), Pool(prompt, [], [], [] if gold or "gold" in record else None)
        )
        members = record.get("rewards") or {}
        if not pool.completions:  # the log's per-member rewards, when every row of the prompt has them
            pool.members = {name: [] for name in members} or None
        if pool.members is not None and set(members) != set(pool.members):
            pool.members = None
        for name, values in (pool.members or {}).items():
            values.append(float(members[name]))
        pool.completions.append(record["completion"])
        pool.rewards.append(float(record["reward"]))
        if pool.gold is not None:
            if gold is None and "gold" not in record:
                raise BadInput(f'{place}: "gold" is missing here but given on other rows of this prompt')
            pool.gold.append(gold(prompt, record["completion"]) if gold else float(record["gold"]))
    if pruned:
        log.info("left out %d candidates that early rejection pruned (partial texts)", pruned)
    if not policies:
        where = ", ".join(shown(source) for source in sources)
        raise BadInput(f"{where}: no rows" + (f" but {pruned} pruned candidates" if pruned else ""))
    return {name: list(pools.values()) for name, pools in policies.items()}


# --- from models ------------------------------------------------------------------------------------


@torch.inference_mode()
def sequence_logprobs(
    policy: HFPolicy, sequences: list[tuple[list[int], list[int]]], batch: int = 32
) -> list[float]:
    """log p(completion | prompt) under the policy: the sum over the completion's tokens, for each
    (prompt ids, completion ids)."""
    out = []
    for start in range(0, len(sequences), batch):
        chunk = sequences[start : start + batch]
        input_ids, mask = pad_right([p + c for p, c in chunk], policy.tokenizer.pad_token_id)
        input_ids, mask = input_ids.to(policy.model.device), mask.to(policy.model.device)
        logits = policy.model(input_ids=input_ids, attention_mask=mask).logits  # (B, T, V)
        # Position t predicts token t + 1.
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
        token_logp = logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
        for row, (prompt, completion) in enumerate(chunk):
            out.append(token_logp[row, len(prompt) - 1 : len(prompt) - 1 + len(completion)].sum().item())
    return out


def same_tokens(a: dict[str, int], b: dict[str, int]) -> bool:
    """Whether one vocabulary extends the other with every shared token at the same id (a
    tokenizer class may add a special token or two to the same trained vocabulary)."""
    small, large = sorted((a, b), key=len)
    return all(large.get(token) == index for token, index in small.items())


def pools_from_models(
    reward_model: Path,
    reference: Path,
    policies: list[Path],
    prompts: list[Prompt],
    sampling: tuple[int, int, int],
    gold=None,
    sample_reference: bool = True,
) -> dict[str, list[Pool]]:
    """Pools of K samples per prompt from each policy (and from the reference first, unless
    `sample_reference` is off), each sample's log ratio to the reference, each scored by the
    reward model. `sampling` is (K, max_tokens, seed)."""
    k, max_tokens, seed = sampling
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rm = load_reward_model(reward_model, device, "auto")
    reference_policy = load_policy(reference, device, "auto")
    out: dict[str, list[Pool]] = {}
    for position, directory in enumerate([reference, *policies]):
        if position == 0 and not sample_reference:
            continue
        policy = reference_policy if position == 0 else load_policy(directory, device, "auto")
        if not same_tokens(policy.tokenizer.get_vocab(), reference_policy.tokenizer.get_vocab()):
            raise BadInput(
                f"{directory} and --reference {reference} have different vocabularies: KL needs one"
            )
        name = f"{Path(directory).name} (reference)" if position == 0 else Path(directory).name
        name += f" #{position}" if name in out else ""
        # Each policy its own seeds: a policy given twice (or as its own reference) draws a pool
        # independent of the other's, as the win rates assume.
        params = SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=prompt_seed(seed, position))
        log.info("sampling %d per prompt from %s", k, name)
        drawn = sample_candidates(policy, prompts, k, params, batch=16)
        sequences = [(p.token_ids, c.token_ids) for p, cands in drawn for c in cands]
        log_ratio = [
            a - b
            for a, b in zip(
                sequence_logprobs(policy, sequences),
                sequence_logprobs(reference_policy, sequences),
                strict=True,
            )
        ]
        pools = []
        for index, (raw, (prompt, cands)) in enumerate(zip(prompts, drawn, strict=True)):
            texts = [c.text for c in cands]
            rewards = rm.score([reward_input(rm.info, prompt, t).token_ids for t in texts])
            ratios = log_ratio[index * k : (index + 1) * k]
            pools.append(Pool(raw, texts, rewards, [gold(raw, t) for t in texts] if gold else None, ratios))
        out[name] = pools
    return out


# --- the job ------------------------------------------------------------------------------------------


def rule_settings(args) -> RuleSettings:
    """--soft-temperatures and --answer-pattern, checked."""
    try:
        temperatures = tuple(float(t) for t in args.soft_temperatures.split(",") if t.strip())
    except ValueError:
        raise BadInput(
            f"--soft-temperatures {args.soft_temperatures!r}: expected numbers, comma-separated"
        ) from None
    if not temperatures or any(t <= 0 for t in temperatures):
        raise BadInput("--soft-temperatures must be numbers above 0")
    try:
        groups = re.compile(args.answer_pattern).groups
    except re.error as error:
        raise BadInput(f"--answer-pattern is not a regular expression: {error}") from None
    if groups != 1:
        raise BadInput("--answer-pattern must have exactly one group (the answer)")
    return RuleSettings(temperatures, args.answer_pattern)


def main(argv: list[str] | None = None) -> dict:
    args = eval_parser().parse_args(argv)
    apply_torch_threads(args.torch_threads)
    gold = GOLD[args.gold] if args.gold else None
    if (args.samples is None) == (args.reference is None):
        raise BadInput("give --samples FILE, or --reference with --policy, --reward-model and --prompts")
    if args.samples is not None:
        pools = pools_from_samples(args.samples, gold)
        references = None
    else:
        needed = {"--reward-model": args.reward_model, "--prompts": args.prompts}
        if missing := [flag for flag, value in needed.items() if value is None]:
            raise BadInput(f"sampling from models needs {', '.join(missing)}")
        if args.k < 1:
            raise BadInput("-k must be at least 1")
        try:
            prompts = load_prompts(args.prompts)
        except RecipeError as error:
            raise BadInput(str(error)) from None
        pools = pools_from_models(
            args.reward_model,
            args.reference,
            args.policy,
            prompts,
            (args.k, args.max_tokens, args.seed),
            gold,
        )
        references = next(iter(pools.values()))
    report = {
        "source": [shown(source) for source in args.samples]
        if args.samples
        else {"reference": str(args.reference), "k": args.k},
        "policies": {name: measure(p, references, rule_settings(args)) for name, p in pools.items()},
    }
    for name, result in report["policies"].items():
        if result["left_out"]["prompts"]:
            log.warning(
                "%s: %d prompt(s) left out with %s (%s...), so the others are measured up to N = %d",
                name, result["left_out"]["prompts"], result["left_out"]["why"],
                result["left_out"]["examples"][0], result["samples_per_prompt"],
            )  # fmt: skip
    write_report(report, args.output)
    for name, result in report["policies"].items():
        largest = list(result["reward_at_n"])[-1]
        log.info(
            "%s: reward@1 %.4f, reward@%s %.4f", name, result["reward_at_n"]["1"]["mean"], largest,
            result["reward_at_n"][largest]["mean"],
        )  # fmt: skip
    return {"output": str(args.output.resolve()), "files": ["eval.json", "report.md", *report["plots"]]}
