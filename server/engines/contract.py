"""The sampler interface: N candidates for one prompt, whatever engine draws them.

The transformers engine (`server.engines.hf`) implements it on CPU or GPU; a vLLM engine
(`AsyncLLM` with `SamplingParams(n=N)`) implements the same protocol unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingParams:
    """How to draw each candidate; the request schema fills it (user -> server default -> API default)."""

    max_tokens: int
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0  # 1 keeps the whole distribution
    top_k: int = 0  # 0 disables top-k
    stop: tuple[str, ...] = ()  # the first stop string found ends a candidate and is cut off
    seed: int | None = None  # same seed, same candidates


@dataclass
class Candidate:
    """One sampled completion. `token_ids` counts every generated token, EOS included."""

    text: str
    token_ids: list[int]
    finish_reason: FinishReason


@dataclass
class SampleRequest:
    """One prompt to sample `n` candidates for, sharing a single prefill of `prompt_ids`."""

    prompt_ids: list[int]
    n: int
    params: SamplingParams
    # Which loaded weights to sample with (engine-specific; None = the engine's current ones), so a
    # request admitted before a reload finishes on the weights it started with.
    weights: object | None = None
    # Polled by the engine between steps: a client that went away has its rows dropped.
    cancelled: Callable[[], bool] = field(default=lambda: False)


class Sampler(Protocol):
    """What the server needs from a generation engine."""

    async def sample(self, request: SampleRequest) -> list[Candidate]:
        """Return `request.n` candidates in sampling order. Raises `QueueFull` when overloaded."""
        ...

    async def close(self) -> None:
        """Stop the engine; queued work is failed, not silently dropped."""
        ...
