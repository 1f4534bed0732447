"""The reward model: read-out at the last real token on either padding side, checks, length rule."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from reference import reward_of_ids
from transformers import AutoTokenizer

from bon.tiny_models import build_model, tokenizer_b
from server.engines.hf.models import load_reward_model
from server.selection import rank_by_reward, ranks_of

TEXTS = ["the cat runs fast", "one", "12 + 3 = 15 and then more words here", "a dog"]


@pytest.fixture(scope="module")
def rm(models):
    return load_reward_model(models["llama_rm"], "cpu", "float32")


def padded(ids: list[list[int]], side: str, pad: int):
    width = max(map(len, ids))
    input_ids = torch.full((len(ids), width), pad)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, seq in enumerate(ids):
        span = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
        input_ids[row, span], mask[row, span] = torch.tensor(seq), 1
    return input_ids, mask


@pytest.mark.parametrize("side", ["left", "right"])
def test_score_is_the_raw_logit_at_the_last_real_token(rm, models, side):
    ids = [rm.tokenizer(t).input_ids for t in TEXTS]
    expected = [reward_of_ids(models["llama_rm"], seq) for seq in ids]
    with torch.no_grad():
        got = rm.read_out(*padded(ids, side, rm.tokenizer.pad_token_id)).tolist()
    assert got == pytest.approx(expected, abs=1e-4)
    assert rm.score(ids) == pytest.approx(expected, abs=1e-4)


def test_pad_equal_to_eos_inside_the_text_does_not_move_the_read_out(rm, models):
    # Pad with eos, and end one text with eos: HF's pad-id pooling would read the wrong token.
    eos = rm.tokenizer.eos_token_id
    ids = [rm.tokenizer(TEXTS[0]).input_ids + [eos], rm.tokenizer(TEXTS[2]).input_ids]
    with torch.no_grad():
        got = rm.read_out(*padded(ids, "right", eos)).tolist()
    assert got[0] == pytest.approx(reward_of_ids(models["llama_rm"], ids[0]), abs=1e-4)


def test_missing_pad_token_is_set_with_a_warning(tmp_path, caplog):
    tok = tokenizer_b()
    path = build_model(tmp_path / "rm", "llama", tok, reward_model=True, seed=9)
    for name in ("config.json", "tokenizer_config.json"):
        config = json.loads((path / name).read_text())
        config.pop("pad_token_id", None)
        config.pop("pad_token", None)
        (path / name).write_text(json.dumps(config))
    assert AutoTokenizer.from_pretrained(path).pad_token is None
    with caplog.at_level(logging.WARNING):
        rm = load_reward_model(path, "cpu", "float32")
    assert "no pad token" in caplog.text and "pad_token_id" in caplog.text
    assert rm.model.config.pad_token_id == rm.tokenizer.pad_token_id == tok.eos_token_id
    ids = [rm.tokenizer(t).input_ids for t in TEXTS]
    assert rm.score(ids) == pytest.approx([reward_of_ids(path, seq) for seq in ids], abs=1e-4)


def test_inputs_over_the_rm_context_keep_their_tail_and_are_flagged(rm):
    long = list(range(3, 3 + rm.info.max_length + 10))
    fitted = rm.info.fit(long)
    assert fitted.truncated and fitted.token_ids == long[-rm.info.max_length :]
    short = rm.info.fit(long[:10])
    assert not short.truncated and short.token_ids == long[:10]


def test_chat_input_uses_the_rm_template_without_a_second_bos(rm):
    messages = [{"role": "user", "content": "hi"}]
    ids = rm.info.encode("unused", messages, "hello")
    assert ids.count(rm.tokenizer.bos_token_id) == 1
    assert rm.tokenizer.decode(ids) == "<s>user: hi\nassistant: hello\n"


def test_ranking_breaks_ties_by_sampling_order():
    rewards = [0.5, 2.0, 0.5, 2.0, -1.0]
    assert rank_by_reward(rewards) == [1, 3, 0, 2, 4]
    assert ranks_of(rank_by_reward(rewards)) == [2, 0, 3, 1, 4]
