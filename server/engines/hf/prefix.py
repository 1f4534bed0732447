"""Shared-prefix reward scoring: candidates of one prompt run the prompt once.

Best-of-N scores N inputs that start with the same prompt; a plain batched forward runs that prompt
N times (86 % of the work with a 512-token prompt and 16 completions of 64 tokens). Here the
longest common token prefix of neighbouring inputs runs once, its keys and values are repeated
per input, and only each input's own tail runs on top of them. The prefix is found on the actual
reward-model token ids, never by splitting text at the prompt, so tokens that merge across the
boundary and chat templates cannot change a reward.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

# Below this a shared prefix saves less than one extra model call costs.
MIN_SHARED_TOKENS = 32


@dataclass
class PrefixGroup:
    """Consecutive inputs `start:end`; the first `shared` tokens are the same in all of them (0 when
    the group is a single input, or its inputs share too little to be worth a second call)."""

    start: int
    end: int
    shared: int


def common_prefix_length(a: list[int], b: list[int], limit: int) -> int:
    n = min(len(a), len(b), limit)
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def prefix_groups(inputs: list[list[int]], min_shared: int = MIN_SHARED_TOKENS) -> list[PrefixGroup]:
    """Split `inputs` into runs of neighbours sharing at least `min_shared` leading tokens.

    The shared part stops one token short of the shortest input of its group, so every input keeps
    at least one token of its own: the reward is read at an input's last token, which must run in
    that input's row.
    """
    groups: list[PrefixGroup] = []
    for index, ids in enumerate(inputs):
        if groups:
            group = groups[-1]
            first = inputs[group.start]
            limit = group.shared if group.end - group.start > 1 else len(first)
            shared = common_prefix_length(first, ids, min(limit, len(ids) - 1, len(first) - 1))
            if shared >= min_shared:
                group.end, group.shared = index + 1, shared
                continue
        groups.append(PrefixGroup(index, index + 1, 0))
    return groups


def cache_argument(model: torch.nn.Module) -> str:
    """What this transformers calls the KV-cache argument: `cache` from 5.20 on, `past_key_values`
    before (the vLLM venv pins an older release)."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def hidden_with_shared_prefix(
    base_model: torch.nn.Module, inputs: list[list[int]], shared: int
) -> list[torch.Tensor]:
    """Last hidden states of `inputs`, whose first `shared` tokens are equal, running those once.

    Args:
        base_model: the reward model's transformer (no head).
        inputs: K token-id lists, each longer than `shared`.
    Returns:
        K tensors, input k's (len(inputs[k]), H): the shared part's states, then its own tail's.
    """
    device = next(base_model.parameters()).device
    prefix = torch.tensor(inputs[0][:shared], device=device)[None]  # (1, P)
    cache_name = cache_argument(base_model)
    out = base_model(input_ids=prefix, use_cache=True)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    cache.batch_repeat_interleave(len(inputs))  # (K, heads, P, head_dim) per layer

    tails = [ids[shared:] for ids in inputs]
    width = max(len(t) for t in tails)
    tail_ids = torch.zeros((len(tails), width), dtype=torch.long)  # pads are masked out
    mask = torch.zeros((len(tails), shared + width), dtype=torch.long)
    mask[:, :shared] = 1
    for i, tail in enumerate(tails):
        tail_ids[i, : len(tail)] = torch.tensor(tail)
        mask[i, shared : shared + len(tail)] = 1
    positions = shared + torch.arange(width)[None].expand(len(tails), width)  # (K, S)
    hidden = base_model(
        input_ids=tail_ids.to(device),
        attention_mask=mask.to(device),
        position_ids=positions.to(device),
        **{cache_name: cache},
    ).last_hidden_state  # (K, S, H)
    prefix_hidden = out.last_hidden_state[0]  # (P, H)
    return [torch.cat([prefix_hidden, hidden[k, : len(tail)]]) for k, tail in enumerate(tails)]
