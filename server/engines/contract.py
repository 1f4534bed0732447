"""The engine contract: what the service needs of whatever draws candidates and reads rewards.

An engine owns model weights; the service owns tokenizers, prompts, selection and the log.
`load` turns a checkpoint (as the service read it: `PolicyInfo`, `RewardModelInfo`) into an opaque
handle. Every request carries the handles it was admitted with, so it finishes on those weights
whatever reloads land meanwhile; `release` is called once no request holds a handle any more.

Samplers: the transformers engine (`server.engines.hf.sampler`) and vLLM (`server.engines.vllm`).
Scorers: `server.engines.hf.scorer` and `server.engines.vllm`. The tests' fakes meet it too.
Failures are `server.failures` classes: `Overloaded` when a queue is full, `EngineStopped` after
`close`, `EngineDead` when the engine can serve nothing more, `CheckpointError` from `load`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

from server.policy import PolicyInfo
from server.reward import Reward, RewardModelInfo

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
    # The handle from `Sampler.load` this request samples with.
    weights: object
    # Polled by engines that decode step by step: a client that went away has its rows dropped.
    # (Engines that await their work are cancelled instead.)
    cancelled: Callable[[], bool] = field(default=lambda: False)


def stop_cut(text: str, stops: tuple[str, ...]) -> str | None:
    """The text before the earliest stop string, or None when none occurs."""
    hits = [text.find(s) for s in stops if s in text]
    return text[: min(hits)] if hits else None


def sampling_cost(prompt_tokens: int, n: int, max_tokens: int) -> int:
    """Token budget one prompt takes: its prefill once, and room for each of n rows to grow."""
    return prompt_tokens + n * max_tokens


@runtime_checkable
class Sampler(Protocol):
    """What the server needs from a generation engine."""

    async def load(self, policy: PolicyInfo) -> object:
        """Load the policy's weights and run one token through them; return the handle.

        Raises CheckpointError when the weights cannot be loaded or run."""
        ...

    async def sample(self, request: SampleRequest) -> list[Candidate]:
        """Return `request.n` candidates in sampling order."""
        ...

    async def release(self, weights: object) -> None:
        """No request holds `weights` any more and none will: free them."""
        ...

    async def check(self) -> None:
        """Raise EngineDead if the engine can no longer serve."""
        ...

    async def close(self) -> None:
        """Stop the engine; queued work fails with EngineStopped, not silently."""
        ...


@runtime_checkable
class RewardScorer(Protocol):
    """What the server needs from a reward-model engine: a `Reward` per input (for a Bradley-Terry
    model, its value is the raw logit)."""

    async def load(self, reward_model: RewardModelInfo) -> object:
        """Load the reward model's weights and score one input with them; return the handle.

        Raises CheckpointError when the weights cannot be loaded or run."""
        ...

    async def score(self, inputs: list[list[int]], weights: object) -> list[Reward]:
        """The reward of each input (RM token ids, already fitted to its context), in order."""
        ...

    async def release(self, weights: object) -> None:
        """No request holds `weights` any more and none will: free them."""
        ...

    async def check(self) -> None:
        """Raise EngineDead if the engine can no longer serve."""
        ...

    async def close(self) -> None:
        """Stop the engine; queued work fails with EngineStopped, not silently."""
        ...
