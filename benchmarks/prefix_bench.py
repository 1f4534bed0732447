"""Shared-prefix reward scoring against a plain batched forward, side by side in one run.

One best-of-N scoring job: a prompt of about 512 reward-model tokens and 16 completions of about
64 tokens, on a Llama reward model of about 28M parameters, same thread count on both sides:

- plain: one right-padded forward of the 16 full inputs (what the scorer did before, and what
  reward-model servers do);
- shared: `HFRewardModel.score`, which runs the common prefix once and the 16 tails on its cache.

Also reports each side's achieved FLOP/s against this machine's fp32 matmul peak (a 2048 x 2048
matmul, same threads), counting the FLOPs each side actually runs.

    python benchmarks/prefix_bench.py [--threads 1] [--repeats 7] [--prompt-tokens 512]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
from pathlib import Path

import torch
from score_bench import _timed, matmul_peak
from transformers import LlamaConfig, LlamaForSequenceClassification

from bon.tiny_models import tokenizer_b
from server.engines.hf.models import load_reward_model, pad_right
from server.threads import apply_torch_threads


def build_reward_model(out: Path, hidden: int, layers: int) -> Path:
    tokenizer = tokenizer_b()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 8 // 3,
        num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
        max_position_embeddings=2048, pad_token_id=tokenizer.pad_token_id, num_labels=1,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def matmul_flops(model, lengths: list[int], context: list[int]) -> float:
    """2 x non-embedding parameters per token run, plus QK^T and AV: 4 x hidden x (tokens run x
    tokens attended to) per layer."""
    embedding = model.get_input_embeddings().weight.numel()
    weights = sum(p.numel() for p in model.parameters()) - embedding
    config = model.config
    attention = (
        4
        * config.num_hidden_layers
        * config.hidden_size
        * sum(t * c for t, c in zip(lengths, context, strict=True))
    )
    return 2 * weights * sum(lengths) + attention


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=0, help="0: the server's default (half the cores)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--completion-tokens", type=int, default=64)
    parser.add_argument("--candidates", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--output", type=Path, default=Path("bench-results/prefix_bench.json"))
    args = parser.parse_args()
    threads = apply_torch_threads(args.threads)

    rm = load_reward_model(
        build_reward_model(Path(tempfile.mkdtemp()) / "rm", args.hidden, args.layers), "cpu", "float32"
    )
    rng = random.Random(0)
    vocab = len(rm.tokenizer)
    prompt = [rng.randrange(4, vocab) for _ in range(args.prompt_tokens)]
    # Completions of 56-72 tokens: as varied as sampled ones.
    inputs = [
        prompt + [rng.randrange(4, vocab) for _ in range(args.completion_tokens + rng.randint(-8, 8))]
        for _ in range(args.candidates)
    ]
    input_ids, mask = pad_right(inputs, rm.tokenizer.pad_token_id)

    def plain() -> list[float]:
        with torch.inference_mode():
            return rm.read_out(input_ids, mask).tolist()

    plain_rewards, shared_rewards = plain(), rm.score(inputs)  # warm-up, and the equality check
    worst = max(abs(a - b) / max(abs(a), 1e-6) for a, b in zip(plain_rewards, shared_rewards, strict=True))
    times = {"plain": [], "shared": []}
    for _ in range(args.repeats):  # interleaved, so both sides see the same machine
        times["plain"].append(_timed(plain))
        times["shared"].append(_timed(lambda: rm.score(inputs)))
    seconds = {side: statistics.median(t) for side, t in times.items()}

    width = input_ids.shape[1]
    tails = [len(ids) - args.prompt_tokens + 1 for ids in inputs]  # the prefix stops one short
    flops = {
        # The padded batch runs every row to the longest input.
        "plain": matmul_flops(rm.model, [width] * len(inputs), [width] * len(inputs)),
        "shared": matmul_flops(
            rm.model,
            [args.prompt_tokens - 1, *[max(tails)] * len(tails)],
            [args.prompt_tokens - 1, *[args.prompt_tokens - 1 + max(tails)] * len(tails)],
        ),
    }
    peak = matmul_peak(threads)
    params = sum(p.numel() for p in rm.model.parameters())
    result = {
        "machine": f"{threads} torch threads, torch {torch.__version__}",
        "reward_model": {"arch": "llama", "hidden": args.hidden, "layers": args.layers, "parameters": params},
        "prompt_tokens": args.prompt_tokens,
        "completion_tokens": [len(ids) - args.prompt_tokens for ids in inputs],
        "seconds": seconds,
        "all_seconds": times,
        "speedup": seconds["plain"] / seconds["shared"],
        "max_relative_reward_difference": worst,
        "matmul_peak_flops": peak,
        "flops_per_second": {side: flops[side] / seconds[side] for side in seconds},
        "share_of_peak": {side: flops[side] / seconds[side] / peak for side in seconds},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    print(
        f"reward model: llama, {params / 1e6:.1f}M parameters; {args.candidates} completions of "
        f"~{args.completion_tokens} tokens on a {args.prompt_tokens}-token prompt; {threads} threads"
    )
    for side in ("plain", "shared"):
        rate, share = result["flops_per_second"][side] / 1e9, 100 * result["share_of_peak"][side]
        print(
            f"{side:7} {1000 * seconds[side]:8.1f} ms  {rate:6.1f} GFLOP/s "
            f"({share:.0f} % of the {peak / 1e9:.1f} GFLOP/s matmul peak)"
        )
    print(f"shared prefix: {result['speedup']:.1f}x faster; rewards differ by at most {worst:.1e} (relative)")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
