"""One batched decode for many prompts, each prompt prefilled once and expanded to its N rows.

This is the transformers engine's core. `generate(num_return_sequences=N)` would copy each prompt N
times before the prefill; here the prompt is run once and its KV cache is repeated per candidate
(the same sharing that vLLM's prefix cache gives). Rows that finish, or whose client went away,
leave the batch so later steps cost only what is still running.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from server.engines.contract import Candidate, FinishReason, SampleRequest
from server.engines.hf.logits import choose_tokens, filter_logits, gumbel_noise
from server.engines.hf.models import HFPolicy
from server.engines.hf.prefix import cache_argument


@dataclass
class _Row:
    """One candidate being decoded."""

    request: int  # index into the batch's requests
    tokens: list[int] = field(default_factory=list)
    text: str | None = None  # set when eos or a stop string ended it
    finish: FinishReason | None = None


def _left_pad(prompts: list[list[int]], pad_id: int, device: torch.device):
    """Returns input_ids, attention_mask and position_ids, each (B, P), prompts right-aligned."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    return ids.to(device), mask.to(device), positions.to(device)


def _stop_cut(text: str, stops: tuple[str, ...]) -> str | None:
    """The text before the earliest stop string, or None when none occurs."""
    hits = [text.find(s) for s in stops if s in text]
    return text[: min(hits)] if hits else None


@torch.inference_mode()
def generate(policy: HFPolicy, requests: list[SampleRequest]) -> list[list[Candidate]]:
    """Sample every request's `n` candidates in one batch; results in request and sampling order."""
    model, tokenizer, eos_ids = policy.model, policy.tokenizer, policy.eos_ids
    device = model.device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids, mask, positions = _left_pad([r.prompt_ids for r in requests], pad_id, device)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values

    counts = torch.tensor([r.n for r in requests], device=device)
    row_request = torch.repeat_interleave(torch.arange(len(requests), device=device), counts)  # (R,)
    cache.batch_select_indices(row_request)
    mask, last_pos = mask[row_request], positions[row_request, -1]  # (R, P), (R,)
    logits = out.logits[row_request, -1]  # (R, V)

    rows = [_Row(request=int(i)) for i in row_request.tolist()]
    params = [requests[row.request].params for row in rows]
    temperature = torch.tensor([p.temperature for p in params], device=device)
    top_k = torch.tensor([p.top_k for p in params], device=device)
    top_p = torch.tensor([p.top_p for p in params], device=device)
    generators = []
    for r in requests:
        g = torch.Generator(device=device)
        g.manual_seed(r.params.seed) if r.params.seed is not None else g.seed()
        generators.append(g)

    active = torch.arange(len(rows), device=device)  # rows still in the cache, in cache order
    vocab = logits.shape[-1]
    while True:
        # Every request draws noise for all its n rows each step, finished or not, so a candidate's
        # draws depend only on its seed and step, never on which rows have left the batch.
        noise = torch.cat(
            [
                torch.rand((r.n, vocab), generator=g, device=device)
                for r, g in zip(requests, generators, strict=True)
            ]
        )[active]
        filtered = filter_logits(logits, temperature[active], top_k[active], top_p[active])
        chosen = choose_tokens(filtered, gumbel_noise(noise), temperature[active] == 0).tolist()

        keep = []
        for slot, (row_index, token) in enumerate(zip(active.tolist(), chosen, strict=True)):
            row = rows[row_index]
            request = requests[row.request]
            row.tokens.append(token)
            if token in eos_ids:
                # Not every eos id is a registered special token, so leave it out of the text here.
                row.finish, row.text = "stop", tokenizer.decode(row.tokens[:-1], skip_special_tokens=True)
            elif (
                request.params.stop
                and (
                    cut := _stop_cut(
                        tokenizer.decode(row.tokens, skip_special_tokens=True), request.params.stop
                    )
                )
                is not None
            ):
                row.finish, row.text = "stop", cut
            elif len(row.tokens) >= request.params.max_tokens:
                row.finish = "length"
            if row.finish is None and not request.cancelled():
                keep.append(slot)
        if not keep:
            break
        if len(keep) < len(active):
            kept = torch.tensor(keep, device=device)
            cache.batch_select_indices(kept)
            active, mask, last_pos = active[kept], mask[kept], last_pos[kept]
            chosen = [chosen[i] for i in keep]
        mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=-1)  # (A, P + t)
        last_pos = last_pos + 1
        out = model(
            input_ids=torch.tensor(chosen, device=device)[:, None],
            attention_mask=mask,
            position_ids=last_pos[:, None],
            use_cache=True,
            **{cache_argument(model): cache},
        )
        logits = out.logits[:, -1]  # (A, V)

    results: list[list[Candidate]] = [[] for _ in requests]
    for row in rows:
        text = row.text if row.text is not None else tokenizer.decode(row.tokens, skip_special_tokens=True)
        results[row.request].append(
            Candidate(text=text, token_ids=row.tokens, finish_reason=row.finish or "length")
        )
    return results
