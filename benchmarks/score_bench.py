"""Batch scoring benchmark: `bon score` vs a per-row pipeline, on the same reward model, rows and
thread count, side by side in one run.

- per-row: what a script does without a batch job: for each row, tokenize prompt + response and
  run the reward model on that one sequence (transformers, batch of 1);
- bon score: the real command (windows sorted by length, token-budget batches), its own timing of
  the scoring (model loading excluded on both sides).
Also reports the reward model's achieved FLOP/s in `bon score` against this machine's fp32
matmul peak (a 2048 x 2048 matmul, same threads), and the padding `bon score`'s batches carried.

    python benchmarks/score_bench.py [--rows 3000] [--threads 2] [--hidden 512 --layers 6]
        [--prompt-words 10 150 --response-words 5 100]

Two regimes show: short rows (a chat turn, a preference pair: `--prompt-words 5 20
--response-words 2 10`), where a one-row forward is mostly overhead, and long rows, where on a
CPU even one row is a matmul big enough to run near the peak.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from bon.tiny_models import build_model, tokenizer_b

WORDS = "the a cat dog runs sees river house light green blue one two three why how where red".split()


def rows(count: int, seed: int, prompt_words: tuple[int, int], response_words: tuple[int, int]) -> list[dict]:
    """Prompts and responses of lengths drawn uniformly from the ranges: as varied as real logs."""
    rng = random.Random(seed)
    text = lambda lo, hi: " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))  # noqa: E731
    return [{"prompt": text(*prompt_words), "response": " " + text(*response_words)} for _ in range(count)]


def matmul_peak(threads: int, size: int = 2048, repeats: int = 20) -> float:
    """Best fp32 FLOP/s of a size x size matmul."""
    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * size**3 / best


def _timed(work) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def forward_flops(model, lengths: list[int]) -> float:
    """Matmul FLOPs of a forward over sequences of these lengths: 2 x (non-embedding parameters)
    per token, plus attention's QK^T and AV (4 x T^2 x hidden per layer and sequence)."""
    config = model.config
    embedding = model.get_input_embeddings().weight.numel()
    weights = sum(p.numel() for p in model.parameters()) - embedding
    attention = 4 * config.num_hidden_layers * config.hidden_size * sum(t * t for t in lengths)
    return 2 * weights * sum(lengths) + attention


@torch.inference_mode()
def per_row(rm_dir: Path, data: list[dict], threads: int) -> tuple[float, list[int]]:
    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(rm_dir)
    model = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    lengths = []
    start = time.perf_counter()
    for row in data:
        ids = tokenizer(row["prompt"] + row["response"], return_tensors="pt").input_ids
        model(ids).logits[0, 0].item()
        lengths.append(ids.shape[1])
    return time.perf_counter() - start, lengths


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--prompt-words", type=int, nargs=2, default=(10, 150), metavar=("MIN", "MAX"))
    parser.add_argument("--response-words", type=int, nargs=2, default=(5, 100), metavar=("MIN", "MAX"))
    parser.add_argument("--output", type=Path, default=Path("bench-results/score_bench.json"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bon-score-bench-"))
    rm_dir = build_model(
        work / "rm",
        "llama",
        tokenizer_b(),
        reward_model=True,
        hidden=args.hidden,
        layers=args.layers,
        ctx=1024,
    )
    data = rows(args.rows, 0, tuple(args.prompt_words), tuple(args.response_words))
    source = work / "rows.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in data))

    command = [sys.executable, "-m", "bon", "score", str(source), "-o", str(work / "scored.jsonl"),
               "--reward-model", str(rm_dir), "--torch-threads", str(args.threads)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    bon = json.loads(done.stdout)
    baseline_seconds, lengths = per_row(rm_dir, data, args.threads)

    model = AutoModelForSequenceClassification.from_pretrained(rm_dir)
    flops = forward_flops(model, lengths)
    peak = matmul_peak(args.threads)
    params = sum(p.numel() for p in model.parameters())
    result = {
        "machine": f"{torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "reward_model": {"arch": "llama", "hidden": args.hidden, "layers": args.layers, "parameters": params},
        "rows": args.rows,
        "prompt_words": args.prompt_words,
        "response_words": args.response_words,
        "tokens": sum(lengths),
        "per_row": {"seconds": baseline_seconds, "rows_per_second": args.rows / baseline_seconds},
        "bon_score": {"seconds": bon["seconds"], "rows_per_second": bon["rows_per_second"]},
        "speedup": baseline_seconds / bon["seconds"],
        "matmul_peak_flops": peak,
        "bon_score_flops": flops / bon["seconds"],
        "per_row_flops": flops / baseline_seconds,
        "bon_score_share_of_peak": flops / bon["seconds"] / peak,
        "padding_waste": bon["padding_waste"],
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    print(f"reward model: llama, {params / 1e6:.1f}M parameters; {args.rows} rows, {sum(lengths)} tokens, "
          f"{args.threads} threads")  # fmt: skip
    print(f"{'per-row pipeline':18} {result['per_row']['rows_per_second']:8.1f} rows/s")
    print(f"{'bon score':18} {bon['rows_per_second']:8.1f} rows/s   {result['speedup']:.1f}x")
    peak_g, bon_g, row_g = (
        result[k] / 1e9 for k in ("matmul_peak_flops", "bon_score_flops", "per_row_flops")
    )
    share, waste = 100 * result["bon_score_share_of_peak"], 100 * (bon["padding_waste"] or 0)
    print(f"fp32 matmul peak {peak_g:.1f} GFLOP/s; bon score {bon_g:.1f} GFLOP/s ({share:.0f} % of peak); "
          f"per-row {row_g:.1f} GFLOP/s; padding {waste:.1f} %")  # fmt: skip
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
