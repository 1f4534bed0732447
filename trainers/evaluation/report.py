"""`bon eval`'s output: eval.json for scripts, report.md for people, PNG plots for both."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on a server
import matplotlib.pyplot as plt  # noqa: E402

EXPLAINED = """\
- **reward@N**: the expected reward-model score of the best of N samples, estimated from all K
  samples of each prompt without bias (trainers/evaluation/estimators.py), averaged over prompts;
  [low, high] is a 95 % bootstrap interval over prompts.
- **gold@N**: the gold scorer's score of that same chosen sample. Where reward@N keeps rising and
  gold@N stalls or falls, best-of-N is over-optimising the reward model.
- **KL bound**: KL(best-of-N || policy) = log N - (N-1)/N, what choosing costs in divergence.
- **KL to reference**: a Monte-Carlo estimate of KL(policy || reference) from the policy's own
  samples (mean of log p - log p_ref), with its standard error; 0 for the reference itself.
- **win@N vs reference**: the chance that the best of N beats one reference sample, judged by the
  reward model (ties half). Against the policy itself the ceiling is N/(N+1).
- **selection rules**: what each rule (server/selection.py) would have returned at N from the same
  pool, by gold (or the proxy without one): max, each reward member alone, soft at each
  temperature and vote (trainers/evaluation/rules.py).
- **distinct-n**: distinct word n-grams over all of them, across all completions (does the policy
  say different things to different inputs?) and per input (does it say different things to the
  same input? what best-of-N needs to have a choice).
"""


def _interval(cell: dict | None) -> str:
    return "" if cell is None else f"{cell['mean']:.4f} [{cell['low']:.4f}, {cell['high']:.4f}]"


def markdown(report: dict) -> str:
    lines = ["# bon eval", ""]
    for name, result in report["policies"].items():
        lines += [
            f"## {name}",
            "",
            f"{result['prompts']} prompts, {result['samples_per_prompt']} samples each.",
        ]
        if "kl_to_reference" in result:
            kl = result["kl_to_reference"]
            lines.append(f"KL to reference: {kl['mean']:.4f} ± {kl['stderr']:.4f} nats.")
        if "win_rate_vs_reference" in result:
            lines.append(
                f"Win rate vs reference (one sample each): {_interval(result['win_rate_vs_reference'])}."
            )
        lines += [
            "",
            "| N | reward@N | gold@N | KL bound | win@N vs reference | ceiling N/(N+1) |",
            "|---|---|---|---|---|---|",
        ]
        for n in result["reward_at_n"]:
            gold = result.get("gold_at_n", {}).get(n)
            lines.append(
                f"| {n} | {_interval(result['reward_at_n'][n])} | {_interval(gold)} "
                f"| {result['kl_bound_at_n'][n]:.3f} "
                f"| {_interval(result.get('win_rate_at_n_vs_reference', {}).get(n))} "
                f"| {result['win_rate_ceiling_at_n'][n]:.3f} |"
            )
        lines += [
            "",
            "| n | distinct-n across inputs | distinct-n per input | n-grams |",
            "|---|---|---|---|",
        ]
        for key, cell in result["diversity"].items():
            lines.append(
                f"| {key[-1]} | {cell['across_inputs']:.3f} | {cell['per_input']:.3f} | {cell['ngrams']} |"
            )
        if "rules_at_n" in result:
            rules = result["rules_at_n"]
            ns = list(next(iter(rules.values())))
            lines += [
                "",
                f"Selection rules on this pool, by {result['rules_measured_by']} of the chosen sample:",
                "",
                "| rule | " + " | ".join(f"N = {n}" for n in ns) + " |",
                "|---|" + "---|" * len(ns),
            ]
            for rule, cells in rules.items():
                lines.append(f"| {rule} | " + " | ".join(f"{cells[n]['mean']:.4f}" for n in ns) + " |")
        chars = result["completion_chars"]
        lines += [
            "",
            f"Completion length: mean {chars['mean']:.1f}, median {chars['median']:.1f} characters.",
            "",
        ]
    lines += [
        "## What the figures mean",
        "",
        EXPLAINED,
        "Plots: " + ", ".join(f"`{p}`" for p in report["plots"]),
    ]
    return "\n".join(lines) + "\n"


def _series(result: dict, key: str) -> tuple[list[int], list[float], list[list[float]]]:
    """N, the means, and each 95 % interval as matplotlib's error-bar lengths below and above."""
    cells = result[key]
    ns = [int(n) for n in cells]
    mean = [cells[str(n)]["mean"] for n in ns]
    below = [cells[str(n)]["mean"] - cells[str(n)]["low"] for n in ns]
    above = [cells[str(n)]["high"] - cells[str(n)]["mean"] for n in ns]
    return ns, mean, [below, above]


def _panels(report: dict, path: Path, draw, xlabel: str, title: str, ns: list[int] | None = None) -> None:
    """One panel for the proxy reward and, where a gold scorer was given, one for gold;
    `draw(ax, key)` plots every policy's series of `key` (reward_at_n or gold_at_n). With `ns`
    the x axis is N on a log scale, labelled 1, 2, 4... The legend goes under the panels: policy
    names carry whole versions."""
    panels = [("reward_at_n", "proxy reward")]
    if any("gold_at_n" in r for r in report["policies"].values()):
        panels.append(("gold_at_n", "gold score"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.6), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels, strict=True):
        draw(ax, key)
        if ns is not None:
            ax.set_xscale("log", base=2)
            ax.set_xticks(ns, [str(n) for n in ns])
            ax.minorticks_off()
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{label} of the chosen sample")
        ax.set_title(f"{label} {title}")
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=1, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06 * len(labels), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _offsets(count: int, spread: float) -> list[float]:
    """Multiplicative x offsets that set `count` policies' error bars side by side, not on top."""
    return [spread ** (j - (count - 1) / 2) for j in range(count)]


def plot_reward_vs_n(report: dict, path: Path) -> None:
    """Each policy's mean with its 95 % interval as an error bar (overlapping bands hid each other)."""
    names = list(report["policies"])
    shift = dict(zip(names, _offsets(len(names), 1.06), strict=True))

    def draw(ax, key: str) -> None:
        for name, result in report["policies"].items():
            if key in result:
                ns, mean, errors = _series(result, key)
                ax.errorbar(
                    [n * shift[name] for n in ns], mean, yerr=errors, marker="o", capsize=3, label=name
                )

    every_n = sorted({int(n) for r in report["policies"].values() for n in r["reward_at_n"]})
    _panels(report, path, draw, "N (best of N)", "vs N (95 % intervals)", ns=every_n)


def plot_reward_vs_kl(report: dict, path: Path) -> None:
    """Each policy's best-of-N curve at KL(policy||reference) + the best-of-N bound: the first
    term is measured, the second exact for continuous rewards; their sum approximates the KL of
    best-of-N on that policy to the reference."""

    def draw(ax, key: str) -> None:
        labelled = False  # N once, on the first curve: on every curve the labels overlap
        for name, result in report["policies"].items():
            if key not in result:
                continue
            base = result.get("kl_to_reference", {}).get("mean", 0.0)
            stderr = result.get("kl_to_reference", {}).get("stderr", 0.0)
            ns, mean, errors = _series(result, key)
            kl = [base + result["kl_bound_at_n"][str(n)] for n in ns]
            # x: 1.96 standard errors of the measured KL (the bound term is exact)
            ax.errorbar(kl, mean, xerr=1.96 * stderr, yerr=errors, marker="o", capsize=3, label=name)
            for n, x, y in zip(ns, kl, mean, strict=True):
                if not labelled:
                    ax.annotate(f"N={n}", (x, y), fontsize=7, textcoords="offset points", xytext=(4, -10))
            labelled = True

    _panels(report, path, draw, "KL to the reference (nats): policy's own + best-of-N bound", "vs KL (95 %)")


# Fewer n-grams than this (one-word answers have no bigrams) make a distinct-n ratio meaningless.
MIN_NGRAMS = 20


def plot_diversity(report: dict, path: Path) -> None:
    """Bars only for the n with enough n-grams for some policy (one-word answers have no bigrams:
    empty distinct-2..4 slots said nothing); the title names what was left out."""
    names = list(report["policies"])
    counts = {
        n: [report["policies"][name]["diversity"][f"distinct_{n}"]["ngrams"] for name in names]
        for n in range(1, 5)
    }
    shown = [n for n, per_policy in counts.items() if max(per_policy) >= MIN_NGRAMS]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4 + 0.25 * len(names)), sharey=True)
    width = 0.8 / len(names)
    for ax, scope in zip(axes, ("across_inputs", "per_input"), strict=True):
        for j, name in enumerate(names):
            cells = [report["policies"][name]["diversity"][f"distinct_{n}"] for n in shown]
            values = [c[scope] if c["ngrams"] >= MIN_NGRAMS else 0.0 for c in cells]
            ax.bar(
                [x + (j - (len(names) - 1) / 2) * width for x in range(len(shown))], values, width, label=name
            )
        ax.set_xticks(range(len(shown)), [f"distinct-{n}" for n in shown])
        left_out = [f"distinct-{n}" for n in range(1, 5) if n not in shown]
        note = f"\n({', '.join(left_out)}: under {MIN_NGRAMS} n-grams, not shown)" if left_out else ""
        ax.set_title(f"diversity {scope.replace('_', ' ')}{note}", fontsize=10)
        ax.set_ylim(0, 1.05)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=1, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06 * len(labels), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_rules_vs_n(report: dict, path: Path) -> None:
    """One panel per policy: each selection rule's value of the chosen sample against N."""
    policies = {name: r for name, r in report["policies"].items() if "rules_at_n" in r}
    fig, axes = plt.subplots(1, len(policies), figsize=(6 * len(policies), 4.6), squeeze=False)
    for ax, (name, result) in zip(axes[0], policies.items(), strict=True):
        for rule, cells in result["rules_at_n"].items():
            ns = [int(n) for n in cells]
            ax.plot(ns, [cells[str(n)]["mean"] for n in ns], marker="o", label=rule)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.minorticks_off()
        ax.set_xlabel("N (candidates chosen from)")
        ax.set_ylabel(f"{result['rules_measured_by']} of the chosen sample")
        ax.set_title(name[:60])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report: dict, output: Path) -> dict:
    output.mkdir(parents=True, exist_ok=True)
    report["plots"] = ["reward_vs_n.png", "reward_vs_kl.png", "diversity.png"]
    if any("rules_at_n" in r for r in report["policies"].values()):
        report["plots"].append("rules_vs_n.png")
        plot_rules_vs_n(report, output / "rules_vs_n.png")
    plot_reward_vs_n(report, output / "reward_vs_n.png")
    plot_reward_vs_kl(report, output / "reward_vs_kl.png")
    plot_diversity(report, output / "diversity.png")
    (output / "eval.json").write_text(json.dumps(report, indent=2))
    (output / "report.md").write_text(markdown(report))
    return report
