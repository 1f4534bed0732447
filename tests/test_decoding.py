"""The transformers engine against transformers' own generate(), and its sampling rules."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import pytest
import torch

from server.engines.contract import SampleRequest, SamplingParams
from server.engines.hf.decoding import DecodeBatch, generate
from server.engines.hf.logits import choose_tokens, filter_logits, gumbel_noise
from server.engines.hf.models import HFPolicy, load_policy

PROMPTS = ["the cat runs", "one two three four five six seven", "12 + 3 ="]


def load(path, eos_ids=frozenset()) -> HFPolicy:
    """The engine's policy with the given end-of-sequence ids (none: every candidate runs to length)."""
    policy = load_policy(path, "cpu", "float32")
    return HFPolicy(replace(policy.info, eos_ids=frozenset(eos_ids)), policy.model)


@pytest.mark.parametrize("name", ["gpt2_policy", "llama_policy", "qwen2_policy"])
def test_greedy_matches_generate_for_every_row_of_a_mixed_batch(models, name):
    policy = load(models[name])
    model, tok = policy.model, policy.tokenizer
    # Prompts of different lengths (left padding) and different n (uneven KV-cache expansion).
    requests = [
        SampleRequest(tok(p).input_ids, n, SamplingParams(max_tokens=10, temperature=0), policy)
        for p, n in zip(PROMPTS, (1, 3, 2), strict=True)
    ]
    results = generate(policy, requests)
    for request, candidates in zip(requests, results, strict=True):
        ids = torch.tensor([request.prompt_ids])
        expected = model.generate(
            ids, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=tok.pad_token_id
        )
        assert len(candidates) == request.n
        for c in candidates:
            assert c.token_ids == expected[0, ids.shape[1] :].tolist()
            assert c.finish_reason == "length"


def run_with_joins(policy, arrivals: dict[int, list[SampleRequest]], check=None) -> dict[int, list]:
    """Decode with requests joining the running batch at the given steps, calling `check(batch)`
    after every change; candidates by request id."""
    batch, done, step = DecodeBatch(policy), {}, 0
    while len(batch) or any(s >= step for s in arrivals):
        batch.admit(arrivals.get(step, []))
        if len(batch):
            check and check(batch)
            done.update((id(r), c) for r, c in batch.step())
        step += 1
    return done


@pytest.mark.parametrize("name", ["gpt2_policy", "llama_policy", "qwen2_policy"])
def test_every_row_of_a_batch_others_join_and_leave_sees_only_its_own_sequence(models, name):
    policy = load(models[name])
    model, tok = policy.model, policy.tokenizer
    params = SamplingParams(max_tokens=10, seed=3)
    # A long prompt joins short ones mid-decode (its cache is the wider), then a short prompt joins
    # after the first rows left (the running cache is the wider).
    first = SampleRequest(tok(PROMPTS[0]).input_ids, 2, replace(params, max_tokens=4), policy)
    second = SampleRequest(tok(PROMPTS[1] + " " + PROMPTS[1]).input_ids, 3, params, policy)
    third = SampleRequest(tok(PROMPTS[2]).input_ids, 1, params, policy)
    checked = []

    def next_token_logits_are_a_plain_forward_s(batch):
        for slot, (running, index) in enumerate(batch.slots):
            sequence = running.request.prompt_ids + running.rows[index].tokens
            with torch.no_grad():
                expected = model(torch.tensor([sequence])).logits[0, -1]
            torch.testing.assert_close(batch.logits[slot], expected, rtol=1e-4, atol=1e-4)
            checked.append(len(batch))

    done = run_with_joins(
        policy, {0: [first], 2: [second], 6: [third]}, next_token_logits_are_a_plain_forward_s
    )
    assert all(len(done[id(r)]) == r.n for r in (first, second, third))
    assert max(checked) == 5 and 4 in checked  # rows of two requests at once, in both joins


def test_seeded_candidates_do_not_depend_on_when_they_joined(models):
    policy = load(models["qwen2_policy"])
    tok = policy.tokenizer
    mine = SampleRequest(tok(PROMPTS[2]).input_ids, 4, SamplingParams(max_tokens=8, seed=7), policy)
    alone = generate(policy, [mine])[0]
    other = SampleRequest(tok(PROMPTS[1]).input_ids, 3, SamplingParams(max_tokens=12, seed=1), policy)
    joined = run_with_joins(policy, {0: [other], 5: [mine]})[id(mine)]
    assert [c.token_ids for c in joined] == [c.token_ids for c in alone]


def test_top_k_one_is_greedy(models):
    policy = load(models["gpt2_policy"])
    tok = policy.tokenizer
    ids = tok(PROMPTS[0]).input_ids
    greedy = generate(policy, [SampleRequest(ids, 1, SamplingParams(max_tokens=8, temperature=0), policy)])
    top1 = generate(
        policy,
        [SampleRequest(ids, 3, SamplingParams(max_tokens=8, temperature=1.5, top_k=1, seed=3), policy)],
    )
    assert all(c.token_ids == greedy[0][0].token_ids for c in top1[0])


def test_seeded_candidates_do_not_depend_on_batch_neighbours(models):
    policy = load(models["llama_policy"])
    tok = policy.tokenizer
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=42)
    mine = SampleRequest(tok(PROMPTS[1]).input_ids, 4, params, policy)
    alone = generate(policy, [mine])[0]
    neighbours = [
        SampleRequest(tok(p).input_ids, 3, SamplingParams(max_tokens=5, seed=i), policy)
        for i, p in enumerate(PROMPTS)
    ]
    crowded = generate(policy, [neighbours[0], mine, neighbours[2]])[1]
    assert [c.token_ids for c in alone] == [c.token_ids for c in crowded]
    assert len({tuple(c.token_ids) for c in alone}) > 1  # the four candidates differ from each other


def test_eos_ends_a_candidate_and_is_counted_not_shown(models):
    policy = load(models["gpt2_policy"])
    tok = policy.tokenizer
    request = SampleRequest(tok(PROMPTS[0]).input_ids, 1, SamplingParams(max_tokens=12, seed=0), policy)
    [[first]] = generate(policy, [request])
    # Declare a token that first appears midway an end-of-sequence token; the same seed replays.
    k = next(i for i, t in enumerate(first.token_ids) if i > 0 and t not in first.token_ids[:i])
    stopping = load(models["gpt2_policy"], {first.token_ids[k]})
    [[stopped]] = generate(stopping, [replace(request, weights=stopping)])
    assert stopped.token_ids == first.token_ids[: k + 1] and stopped.finish_reason == "stop"
    assert stopped.text == tok.decode(first.token_ids[:k], skip_special_tokens=True)


def test_filter_logits_matches_a_direct_computation():
    torch.manual_seed(0)
    logits = torch.randn(3, 20)
    temperature = torch.tensor([0.5, 1.0, 2.0])
    top_k = torch.tensor([0, 5, 0])
    top_p = torch.tensor([1.0, 1.0, 0.6])
    out = filter_logits(logits, temperature, top_k, top_p)
    assert torch.allclose(out[0], logits[0] / 0.5)
    kept = torch.isfinite(out[1])
    assert set(kept.nonzero().flatten().tolist()) == set(logits[1].topk(5).indices.tolist())
    # Nucleus: the smallest set of most likely tokens whose mass reaches 0.6.
    probs = (logits[2] / 2.0).softmax(-1)
    order = probs.argsort(descending=True)
    size = int((probs[order].cumsum(0) < 0.6).sum()) + 1
    assert set(torch.isfinite(out[2]).nonzero().flatten().tolist()) == set(order[:size].tolist())


def test_gumbel_max_samples_from_the_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    generator = torch.Generator().manual_seed(0)
    draws = 20000
    counts = Counter(
        choose_tokens(
            logits.expand(draws, 4),
            gumbel_noise(torch.rand(draws, 4, generator=generator)),
            torch.zeros(draws, dtype=torch.bool),
        ).tolist()
    )
    expected = logits.softmax(-1)[0]
    for token in range(4):
        assert counts[token] / draws == pytest.approx(expected[token].item(), abs=0.015)
