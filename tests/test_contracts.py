"""Every engine, and each fake, meets the engine contract (server/engines/contract.py).

The type checker holds the signatures: `.ci/run` runs mypy over this file and server/ (where
`build_sampler` and `build_scorer` return each engine as its protocol). This test checks at run
time that each class has every method, vLLM's where it is installed.
"""

from __future__ import annotations

import importlib.util

import pytest
from fakes import FakeSampler, FakeScorer

from server.engines.contract import RewardScorer, Sampler
from server.engines.hf.sampler import TransformersSampler
from server.engines.hf.scorer import TransformersScorer

SAMPLERS: list[type[Sampler]] = [TransformersSampler, FakeSampler]
SCORERS: list[type[RewardScorer]] = [TransformersScorer, FakeScorer]


@pytest.mark.parametrize("engine", [*SAMPLERS, *SCORERS], ids=lambda c: c.__name__)
def test_each_engine_and_fake_meets_its_protocol(engine):
    protocol = Sampler if engine in SAMPLERS else RewardScorer
    assert issubclass(engine, protocol)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed here")
def test_the_vllm_engines_meet_their_protocols():
    from server.engines.vllm import VLLMSampler, VLLMScorer

    assert issubclass(VLLMSampler, Sampler) and issubclass(VLLMScorer, RewardScorer)


def test_a_class_missing_a_method_does_not():
    """The check can fail: a sampler without `release` is not one."""

    class NoRelease:
        async def load(self, policy): ...
        async def sample(self, request): ...
        async def check(self): ...
        async def close(self): ...

    assert not issubclass(NoRelease, Sampler)
