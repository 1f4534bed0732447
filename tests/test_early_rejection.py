"""Early rejection over HTTP (both engines): the best share of candidates is decoded to the end,
the rest stop at the decision point and are logged as pruned with their partial reward."""

from __future__ import annotations

import time

import pytest
from conftest import API_KEYS
from openai import OpenAI
from reference import completion_reward

from bon.tiny_models import tokenizer_b
from server.engines.contract import Candidate
from server.log.sources import read_records
from server.rejection import EarlyRejection, joined

BODY = {
    "return_candidates": True,
    "early_rejection": {"after_tokens": 4, "keep": 0.25},
}


def client(server) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key=API_KEYS[0], max_retries=0)


def logged(server, request_id: str) -> list[dict]:
    deadline = time.monotonic() + 10
    while not (records := [r for r in read_records(server.sample_log) if r["request_id"] == request_id]):
        assert time.monotonic() < deadline, "the request was never logged"
        time.sleep(0.2)
    return sorted(records, key=lambda r: r["candidate_index"])


def test_the_best_quarter_is_finished_and_the_rest_pruned_with_partial_rewards(server, pair_gpt2_llama):
    pruned_before = server.metric("bon_pruned_candidates_total")
    response = client(server).completions.create(
        model="gpt2_policy", prompt="the cat", max_tokens=12, best_of=8, seed=5, extra_body=BODY
    )
    candidates = response.model_extra["candidates"]
    records = logged(server, response.id)
    assert [r["pruned"] for r in records] == [c["pruned"] for c in candidates]
    assert records[0]["params"]["early_rejection"] == {"after_tokens": 4, "keep": 0.25}

    pruned = [(c, r) for c, r in zip(candidates, records, strict=True) if r["pruned"]]
    finished = [(c, r) for c, r in zip(candidates, records, strict=True) if not r["pruned"]]
    # Of the candidates still going at the decision point, two (a quarter of 8) go on; those that
    # ended by themselves before it (eos) are complete and kept.
    ended_early = [(c, r) for c, r in finished if r["completion_tokens"] <= 4]
    survivors = [(c, r) for c, r in finished if r["completion_tokens"] > 4]
    assert len(survivors) == 2 and len(pruned) == 8 - 2 - len(ended_early) >= 4
    assert all(r["completion_tokens"] == 4 for _, r in pruned)
    assert all(r["completion_tokens"] == 12 or r["finish_reason"] == "stop" for _, r in survivors)
    # Every reward is the reward model's reading of the text as logged: whole or partial.
    for c, r in zip(candidates, records, strict=True):
        assert c["reward"] == pytest.approx(
            completion_reward(pair_gpt2_llama.reward_model, "the cat", c["text"]), abs=1e-4
        )
        assert c["text"] == r["completion"]
    # The answer is the best finished candidate; pruned ones rank after every finished one.
    best = max(finished, key=lambda f: f[0]["reward"])
    assert response.choices[0].text == best[0]["text"]
    assert min(r["rank"] for _, r in pruned) > max(r["rank"] for _, r in finished)
    assert response.usage.completion_tokens == sum(r["completion_tokens"] for r in records) < 8 * 12
    assert server.metric("bon_pruned_candidates_total") - pruned_before == len(pruned)

    again = client(server).completions.create(
        model="gpt2_policy", prompt="the cat", max_tokens=12, best_of=8, seed=5, extra_body=BODY
    )
    assert again.model_extra["candidates"] == candidates  # seeded survivors continue the same way


def test_early_rejection_on_chat(server):
    response = client(server).chat.completions.create(
        model="gpt2_policy",
        messages=[{"role": "user", "content": "the cat"}],
        max_tokens=10,
        n=2,
        extra_body={"best_of": 6, **BODY, "early_rejection": {"after_tokens": 3, "keep": 0.5}},
    )
    candidates = response.model_extra["candidates"]
    assert len(response.choices) == 2 and sum(c["pruned"] for c in candidates) >= 1
    returned = {choice.message.content for choice in response.choices}
    assert returned <= {c["text"] for c in candidates if not c["pruned"]}


@pytest.mark.parametrize(
    "rejection, param",
    [
        ({"after_tokens": 4, "keep": 0.1}, "early_rejection"),  # 1 of 8 finishes, but n is 2
        ({"after_tokens": 0, "keep": 0.5}, "early_rejection.after_tokens"),
        ({"after_tokens": 4, "keep": 1.5}, "early_rejection.keep"),
        ({"after_tokens": 4}, "early_rejection.keep"),
        ({"after_tokens": 4, "keep": 0.5, "rounds": 2}, "early_rejection.rounds"),
    ],
)
def test_bad_early_rejection_is_a_400_naming_the_field(server, rejection, param):
    import openai

    with pytest.raises(openai.BadRequestError) as refused:
        client(server).completions.create(
            model="gpt2_policy", prompt="the cat", max_tokens=8, best_of=8, n=2,
            extra_body={"early_rejection": rejection},
        )  # fmt: skip
    assert refused.value.body["param"] == param


def test_nothing_is_pruned_when_the_decision_point_is_past_the_end():
    from server.engines.contract import SamplingParams

    rule = EarlyRejection(after_tokens=8, keep=0.5)
    assert not rule.prunes(SamplingParams(max_tokens=8), best_of=8)
    assert not rule.prunes(SamplingParams(max_tokens=16, temperature=0), best_of=8)  # greedy: one candidate
    assert rule.prunes(SamplingParams(max_tokens=16), best_of=8)
    assert not EarlyRejection(after_tokens=4, keep=0.9).prunes(SamplingParams(max_tokens=16), best_of=2)


def split_candidate(tokenizer, text: str, at: int) -> tuple[Candidate, Candidate]:
    """`text`'s tokens cut after `at`: the partial candidate and its continuation, each with the
    text an engine would give it alone."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    first, second = ids[:at], ids[at:]
    return (
        Candidate(tokenizer.decode(first), first, "length"),
        Candidate(tokenizer.decode(second), second, "length"),
    )


def test_a_survivor_is_decoded_whole_so_a_character_split_at_the_decision_point_survives():
    tokenizer = tokenizer_b()
    ids = tokenizer(" café ok", add_special_tokens=False).input_ids
    # byte-level BPE: é is two byte tokens; cut between them
    at = next(k for k in range(1, len(ids)) if "\ufffd" in tokenizer.decode(ids[:k]))
    partial, rest = split_candidate(tokenizer, " café ok", at)
    assert "\ufffd" in partial.text + rest.text  # what joining the two texts gave
    whole = joined(partial, rest, (), tokenizer, frozenset())
    assert (whole.text, whole.token_ids) == (" café ok", ids)


def test_a_stop_string_across_the_decision_point_ends_the_survivor_and_its_tokens_there():
    tokenizer = tokenizer_b()
    text = " the cat sat. and more words"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    at = next(k for k in range(1, len(ids)) if tokenizer.decode(ids[:k]).endswith(" ca"))
    partial, rest = split_candidate(tokenizer, text, at)
    whole = joined(partial, rest, ("cat sat",), tokenizer, frozenset())
    # The tokens end at the one that completed the stop string: usage counts nothing after it.
    end = next(k for k in range(1, len(ids) + 1) if "cat sat" in tokenizer.decode(ids[:k]))
    assert (whole.text, whole.finish_reason, whole.token_ids) == (" the ", "stop", ids[:end])
    assert end < len(ids)
    assert joined(partial, rest, (), tokenizer, frozenset()).text == text
    eos = tokenizer.eos_token_id
    ended = Candidate(rest.text, [*rest.token_ids, eos], "stop")
    assert joined(partial, ended, (), tokenizer, frozenset({eos})).token_ids == [*ids, eos]
