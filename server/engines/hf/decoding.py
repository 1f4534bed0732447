"""The running decode batch: prompts join between steps, finished rows leave, nothing waits.

This is the transformers engine's core. Each prompt is prefilled once and its KV cache repeated
for its n candidates (`generate(num_return_sequences=N)` would copy the prompt N times before the
prefill; this is the sharing vLLM's prefix cache gives). Requests that arrive while others decode
are prefilled on their own and their rows appended to the running batch (continuous batching), so a
short request never waits for a long one to finish. Rows that finish, or whose client went away,
leave the batch so later steps cost only what is still running.

Rows are left-aligned in the cache: every row's real tokens end at the right edge, pads (masked
out) fill the left, and positions are explicit per row, so rows of different lengths and ages
share one cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from server.engines.contract import Candidate, FinishReason, SampleRequest, stop_cut
from server.engines.hf.logits import choose_tokens, filter_logits, gumbel_noise
from server.engines.hf.models import HFPolicy
from server.engines.hf.prefix import cache_argument


@dataclass
class _Row:
    """One candidate being decoded."""

    tokens: list[int] = field(default_factory=list)
    text: str | None = None  # set when eos or a stop string ended it
    finish: FinishReason | None = None


@dataclass
class _Running:
    """One request in the batch: its generator and its n rows, finished or not."""

    request: SampleRequest
    generator: torch.Generator
    rows: list[_Row]
    live: int  # rows still decoding


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


def _pad_left(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """Zeros prepended along `dim` up to `width`."""
    missing = width - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


class DecodeBatch:
    """Rows of many requests decoding together on one policy.

    `admit` prefills new requests and appends their rows; `step` samples one token for every row,
    retires what finished and runs the model one token further. Not thread-safe: one engine
    thread drives it.
    """

    def __init__(self, policy: HFPolicy):
        self.policy = policy
        self.model = policy.model
        self.device = policy.model.device
        tokenizer = policy.tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._cache_name = cache_argument(self.model)
        self.running: list[_Running] = []
        # One entry per row still in the cache, in cache order.
        self.slots: list[tuple[_Running, int]] = []  # (its request, its index among the request's rows)
        # The KV cache of every slot: a transformers Cache (typed as a union of layer kinds that
        # only attention layers' keys and values make sense of, so left untyped here).
        self.cache: Any = None
        self.mask = torch.zeros((0, 0), dtype=torch.long, device=self.device)  # (A, T)
        self.last_pos = torch.zeros(0, dtype=torch.long, device=self.device)  # (A,)
        self.logits: torch.Tensor | None = None  # (A, V) next-token logits of every slot

    def __len__(self) -> int:
        return len(self.slots)

    @torch.inference_mode()
    def admit(self, requests: list[SampleRequest]) -> None:
        """Prefill `requests` (each prompt once) and append their n rows each to the batch."""
        if not requests:
            return
        ids, mask, positions = _left_pad([r.prompt_ids for r in requests], self.pad_id, self.device)
        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1
        )
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        counts = torch.tensor([r.n for r in requests], device=self.device)
        row_request = torch.repeat_interleave(torch.arange(len(requests), device=self.device), counts)  # (R,)
        cache.batch_select_indices(row_request)
        mask, last_pos = mask[row_request], positions[row_request, -1]  # (R, P), (R,)
        logits = out.logits[row_request, -1]  # (R, V)

        for request in requests:
            generator = torch.Generator(device=self.device)
            if request.params.seed is not None:
                generator.manual_seed(request.params.seed)
            else:
                generator.seed()
            running = _Running(request, generator, [_Row() for _ in range(request.n)], request.n)
            self.running.append(running)
            self.slots += [(running, i) for i in range(request.n)]
        if self.cache is None or self.logits is None:  # an empty batch: set together, cleared together
            self.cache, self.mask, self.last_pos, self.logits = cache, mask, last_pos, logits
            return
        # Join the caches: the shorter one is padded on the left, where its mask is 0.
        width = max(self.mask.shape[1], mask.shape[1])
        for old, new in zip(self.cache.layers, cache.layers, strict=True):
            old.keys = torch.cat([_pad_left(old.keys, width, 2), _pad_left(new.keys, width, 2)])
            old.values = torch.cat([_pad_left(old.values, width, 2), _pad_left(new.values, width, 2)])
        self.mask = torch.cat([_pad_left(self.mask, width, 1), _pad_left(mask, width, 1)])
        self.last_pos = torch.cat([self.last_pos, last_pos])
        self.logits = torch.cat([self.logits, logits])

    @torch.inference_mode()
    def step(self) -> list[tuple[SampleRequest, list[Candidate]]]:
        """Sample one token per row, then run the model on the rows still going. Returns the
        requests whose rows have all finished, or were dropped because their client went away."""
        tokenizer, eos_ids = self.policy.tokenizer, self.policy.eos_ids
        logits = self.logits
        if logits is None:  # nothing admitted: nothing to step
            return []
        # Every request draws noise for all its n rows each step, finished or not, so a candidate's
        # draws depend only on its seed and step, never on which rows share the batch.
        offsets, noise, drawn = {}, [], 0
        for running in self.running:
            offsets[id(running)], drawn = drawn, drawn + running.request.n
            shape = (running.request.n, logits.shape[-1])
            noise.append(torch.rand(shape, generator=running.generator, device=self.device))
        pick = torch.tensor([offsets[id(running)] + i for running, i in self.slots], device=self.device)
        slot_params = [running.request.params for running, _ in self.slots]
        temperature = torch.tensor([p.temperature for p in slot_params], device=self.device)
        top_k = torch.tensor([p.top_k for p in slot_params], device=self.device)
        top_p = torch.tensor([p.top_p for p in slot_params], device=self.device)
        filtered = filter_logits(logits, temperature, top_k, top_p)
        chosen = choose_tokens(filtered, gumbel_noise(torch.cat(noise)[pick]), temperature == 0).tolist()

        keep = []
        for slot, ((running, index), token) in enumerate(zip(self.slots, chosen, strict=True)):
            row, params = running.rows[index], running.request.params
            row.tokens.append(token)
            if token in eos_ids:
                # Not every eos id is a registered special token, so leave it out of the text here.
                row.finish, row.text = "stop", tokenizer.decode(row.tokens[:-1], skip_special_tokens=True)
            elif (
                params.stop
                and (cut := stop_cut(tokenizer.decode(row.tokens, skip_special_tokens=True), params.stop))
                is not None
            ):
                row.finish, row.text = "stop", cut
            elif len(row.tokens) >= params.max_tokens:
                row.finish = "length"
            if row.finish is None and not running.request.cancelled():
                keep.append(slot)
            else:
                running.live -= 1

        finished = [r for r in self.running if r.live == 0]
        self.running = [r for r in self.running if r.live > 0]
        if len(keep) < len(self.slots):
            self._keep(keep)
        if self.slots:
            self._forward([chosen[i] for i in keep])
        return [(r.request, [self._candidate(row) for row in r.rows]) for r in finished]

    def _keep(self, slots: list[int]) -> None:
        """Retire every row but `slots`; drop cache columns no remaining row uses."""
        self.slots = [self.slots[i] for i in slots]
        if not slots:
            self.cache, self.logits = None, None
            self.mask, self.last_pos = self.mask[:0, :0], self.last_pos[:0]
            return
        kept = torch.tensor(slots, device=self.device)
        self.cache.batch_select_indices(kept)
        self.mask, self.last_pos = self.mask[kept], self.last_pos[kept]
        # A long prompt that left may leave columns that are padding in every remaining row.
        first = int(self.mask.any(dim=0).int().argmax())
        if first > 0:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
            self.mask = self.mask[:, first:]

    def _forward(self, tokens: list[int]) -> None:
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.slots), 1))], dim=-1)  # (A, T + 1)
        self.last_pos = self.last_pos + 1
        out = self.model(
            input_ids=torch.tensor(tokens, device=self.device)[:, None],
            attention_mask=self.mask,
            position_ids=self.last_pos[:, None],
            use_cache=True,
            **{self._cache_name: self.cache},
        )
        self.logits = out.logits[:, -1]  # (A, V)

    def _candidate(self, row: _Row) -> Candidate:
        tokenizer = self.policy.tokenizer
        text = row.text if row.text is not None else tokenizer.decode(row.tokens, skip_special_tokens=True)
        return Candidate(text=text, token_ids=row.tokens, finish_reason=row.finish or "length")


def generate(policy: HFPolicy, requests: list[SampleRequest]) -> list[list[Candidate]]:
    """Sample every request's `n` candidates in one batch, start to end; results in request and
    sampling order (a request whose client went away gets what it had when it left)."""
    batch = DecodeBatch(policy)
    batch.admit(requests)
    done: dict[int, list[Candidate]] = {}
    while len(batch):
        done.update((id(request), candidates) for request, candidates in batch.step())
    return [done[id(r)] for r in requests]
