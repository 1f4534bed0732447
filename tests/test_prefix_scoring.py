"""Shared-prefix scoring: a prompt's candidates run the prompt once and get the same rewards as
full re-scoring (recomputed independently, one plain transformers forward per input)."""

from __future__ import annotations

import pytest
from reference import reward_of_ids

from bon.tiny_models import build_model, tokenizer_a
from server.engines.hf.models import load_reward_model
from server.engines.hf.prefix import MIN_SHARED_TOKENS, prefix_groups

PROMPT = "the cat runs and the dog sees a bird by the river, " * 4
# The first two start mid-word: their first token can merge with the prompt's last.
COMPLETIONS = ["s and more", "ly", " a bird", " 12 + 3 = 15 and then the cat runs home", " x", "!"]
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": PROMPT}]


@pytest.fixture(scope="module")
def reward_models(models, tmp_path_factory) -> dict[str, object]:
    qwen2 = build_model(
        tmp_path_factory.mktemp("qwen2_rm"), "qwen2", tokenizer_a(), reward_model=True, seed=9
    )
    return {"llama": models["llama_rm"], "gpt2": models["gpt2_rm_plain"], "qwen2": qwen2}


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("rule", ["text", "chat"])
def test_shared_prefix_rewards_equal_full_rescoring(reward_models, arch, side, rule):
    path = reward_models[arch]
    rm = load_reward_model(path, "cpu", "float32")
    rm.info.tokenizer.padding_side = side
    messages = MESSAGES if rule == "chat" else None
    inputs = [rm.info.encode(PROMPT, messages, c) for c in COMPLETIONS]
    # One input that shares nothing with its neighbours, in between two shared runs.
    inputs = inputs[:3] + [rm.info.encode("one", None, " two")] + inputs[3:]
    groups = prefix_groups(inputs)
    assert [g.end - g.start for g in groups] == [3, 1, 3]
    assert all(g.shared >= MIN_SHARED_TOKENS for g in (groups[0], groups[2]))

    got = rm.score(inputs)
    expected = [reward_of_ids(path, ids) for ids in inputs]
    assert got == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_prefix_stops_short_of_an_input_that_is_all_prefix(models):
    rm = load_reward_model(models["llama_rm"], "cpu", "float32")
    prompt = rm.info.tokenizer(PROMPT).input_ids
    # The first input is exactly the others' prefix: its reward is read at its own last token.
    inputs = [prompt, prompt + [5, 6], prompt + [7], prompt]
    groups = prefix_groups(inputs)
    assert len(groups) == 1 and groups[0].shared == len(prompt) - 1
    expected = [reward_of_ids(models["llama_rm"], ids) for ids in inputs]
    assert rm.score(inputs) == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_short_or_unrelated_inputs_are_not_grouped():
    assert [g.shared for g in prefix_groups([[1] * 40, [2] * 40, [2] * 10 + [3]])] == [0, 0, 0]
    a = list(range(1, 50))
    assert [(g.start, g.end) for g in prefix_groups([a + [1], a + [2], a[:20] + [9] * 30])] == [
        (0, 2),
        (2, 3),
    ]
