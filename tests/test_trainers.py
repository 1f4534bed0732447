"""Trainer components against hand computations, and small real trainings."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from server.engines.hf.models import load_reward_model
from server.log.records import CompletionRecord, RequestRecord
from server.log.sample_log import SampleLog
from trainers.data import (
    DataError,
    PreferenceGroup,
    RecipeError,
    SFTExample,
    load_preferences,
    preference_group,
)
from trainers.engine import TrainArgs, make_accelerator, publish
from trainers.losses import IGNORE, bradley_terry_loss, completion_loss, reward_centering
from trainers.raft import Sample, Selection, raft_from_log, samples_from_log, select
from trainers.reward import encode_response, shrink_toward_fresh, train_reward_model
from trainers.sft import encode, finetune


def test_bradley_terry_loss_matches_a_hand_computation():
    rewards = torch.tensor([2.0, 0.5, -1.0])
    winners, losers = torch.tensor([0, 0, 1]), torch.tensor([1, 2, 2])
    margins = torch.tensor([0.0, 1.0, 0.0])
    expected = (
        -(
            math.log(1 / (1 + math.exp(-1.5)))
            + math.log(1 / (1 + math.exp(-2.0)))
            + math.log(1 / (1 + math.exp(-1.5)))
        )
        / 3
    )
    assert bradley_terry_loss(rewards, winners, losers, margins).item() == pytest.approx(expected, rel=1e-6)
    assert reward_centering(rewards, 0.1).item() == pytest.approx(0.1 * (4 + 0.25 + 1) / 3)


def test_ties_give_no_pairs():
    # The lecture's example D > C > A = B, responses listed A, B, C, D.
    group = preference_group({"prompt": "p", "responses": ["A", "B", "C", "D"], "ranks": [3, 3, 2, 1]}, "x")
    named = {(group.responses[w], group.responses[lo]) for w, lo in group.pairs()}
    assert named == {("D", "C"), ("D", "A"), ("D", "B"), ("C", "A"), ("C", "B")}
    scores = preference_group({"prompt": "p", "responses": ["A", "B", "C"], "scores": [0.1, 0.9, 0.1]}, "x")
    assert {(scores.responses[w], scores.responses[lo]) for w, lo in scores.pairs()} == {
        ("B", "A"),
        ("B", "C"),
    }


def test_preference_files_pairs_rankings_and_clear_errors(tmp_path):
    data = tmp_path / "prefs.jsonl"
    data.write_text(
        json.dumps({"prompt": "q", "chosen": "good", "rejected": "bad", "margin": 0.5})
        + "\n"
        + json.dumps({"prompt": [{"role": "user", "content": "q"}], "responses": ["a", "b"], "ranks": [2, 1]})
        + "\n"
    )
    pair, ranking = load_preferences([data])
    assert pair.pairs() == [(0, 1)] and pair.margin == 0.5
    assert ranking.pairs() == [(1, 0)]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "q", "responses": ["a", "b"], "ranks": [1]}) + "\n")
    with pytest.raises(DataError, match="bad.jsonl:1"):
        load_preferences([bad])


def test_sft_labels_cover_the_completion_only(models):
    tok = AutoTokenizer.from_pretrained(models["gpt2_policy"])
    text = encode(tok, SFTExample("the cat", " runs"), 64)
    prompt_len = len(tok("the cat").input_ids)
    assert text["labels"][:prompt_len] == [IGNORE] * prompt_len
    assert text["labels"][prompt_len:] == tok(" runs", add_special_tokens=False).input_ids + [
        tok.eos_token_id
    ]
    chat = encode(tok, SFTExample([{"role": "user", "content": "hi"}], "yo"), 64)
    completion = [t for t in chat["labels"] if t != IGNORE]
    assert tok.decode(completion) == "yo<|end|><|endoftext|>"
    # The loss ignores prompt tokens: changing the logits there does not change it.
    logits = torch.randn(1, len(text["input_ids"]), len(tok))
    labels = torch.tensor([text["labels"]])
    changed = logits.clone()
    changed[0, : prompt_len - 1] += 5.0
    assert completion_loss(logits, labels).item() == pytest.approx(completion_loss(changed, labels).item())


def test_reward_training_forwards_all_k_responses_once_per_step(models, tmp_path):
    groups = [
        PreferenceGroup(f"prompt {i}", [f"answer {j} of {i}" for j in range(4)], [1, 2, 2, 3])
        for i in range(8)
    ]
    calls: list[int] = []
    original = torch.nn.Module.__call__

    def counting(module, *args, **kwargs):
        if type(module).__name__ == "LastTokenReward":
            calls.append(args[0].shape[0])
        return original(module, *args, **kwargs)

    torch.nn.Module.__call__ = counting
    try:
        args = TrainArgs(epochs=1, learning_rate=1e-3, batch_size=2, max_length=64)
        history = train_reward_model(models["gpt2_policy"], groups, args, tmp_path / "rm", eval_fraction=0.0)
    finally:
        torch.nn.Module.__call__ = original
    training_calls = calls[: len(history)]
    assert len(history) == 4  # 8 groups, 2 per step
    assert training_calls == [8] * 4  # one forward per step holding 2 prompts x 4 responses
    rm = load_reward_model(tmp_path / "rm", "cpu", "float32")  # bon serve loads it unchanged
    assert rm.model.config.num_labels == 1 and rm.model.config.pad_token_id is not None
    assert (tmp_path / "rm" / "training_curves.png").stat().st_size > 0
    # reward_stats.json: the published model's reward distribution over its training responses,
    # recomputed here with the loaded model on the server's input rule.
    stats = json.loads((tmp_path / "rm" / "reward_stats.json").read_text())
    inputs = [encode_response(rm.tokenizer, g.prompt, r, 64) for g in groups for r in g.responses]
    rewards = torch.tensor(rm.score(inputs))
    assert stats["mean"] == pytest.approx(rewards.mean().item(), abs=1e-4)
    assert stats["std"] == pytest.approx(rewards.std(unbiased=False).item(), rel=1e-3)


@pytest.mark.parametrize("arch", ["gpt2_policy", "llama_policy"])
def test_shrink_moves_weights_toward_a_fresh_init_and_keeps_norms(models, arch):
    def load():
        torch.manual_seed(0)  # the score head is new: the same in both copies
        return AutoModelForSequenceClassification.from_pretrained(models[arch], num_labels=1)

    trained, shrunk = dict(load().named_parameters()), load()
    shrink_toward_fresh(shrunk, 0.3, seed=7)
    torch.manual_seed(7)
    fresh = dict(type(shrunk)(shrunk.config).named_parameters())
    moved = kept = 0
    for name, weight in shrunk.named_parameters():
        if "norm" in name or ".ln_" in name or name.startswith("transformer.ln_f"):
            assert torch.equal(weight, trained[name]), name
            kept += 1
        else:
            expected = 0.7 * trained[name] + 0.3 * fresh[name]
            torch.testing.assert_close(weight, expected, rtol=1e-5, atol=1e-6)
            moved += not torch.allclose(weight, trained[name])
    assert kept >= 3 and moved > 10


def _log(path, rows):
    log = SampleLog(path)
    for request_id, prompt, completions, rewards, created in rows:
        candidates = [
            CompletionRecord(0, i, c, r, 0, "stop", 2, False)
            for i, (c, r) in enumerate(zip(completions, rewards, strict=True))
        ]
        log.append(RequestRecord(request_id, {}, "p", "v", "rm", "v", created, [(prompt, 3)], candidates))
    log.close()


def test_raft_selection_local_and_global(tmp_path):
    _log(
        tmp_path / "log.db",
        [
            ("a", "p1", ["x", "y", "z"], [0.1, 0.9, 0.5], 10.0),
            ("b", "p1", ["y", "w"], [0.8, 0.2], 11.0),  # "y" again: a duplicate, the better reward counts
            ("c", "p2", ["u", "v"], [-1.0, -0.5], 12.0),
            ("d", "p3", ["solo"], [5.0], 13.0),
        ],
    )
    samples = samples_from_log(tmp_path / "log.db", 0, 100)
    local = select(samples, Selection(top_k=2, min_candidates=2))
    assert [(s.prompt, s.completion) for s in local] == [("p1", "y"), ("p1", "z"), ("p2", "v"), ("p2", "u")]
    assert select(samples, Selection(top_k=1, min_reward=0.0, min_candidates=2)) == [Sample("p1", "y", 0.9)]
    top = select(samples, Selection(top_fraction=0.5))
    assert [s.completion for s in top] == ["solo", "y", "z", "w"]  # best half of 7 unique, rounded up
    assert [s.completion for s in samples_from_log(tmp_path / "log.db", 11.0, 12.0)] == ["u", "v"]


def test_raft_from_log_publishes_a_manifest_and_the_next_window_starts_after(models, tmp_path):
    _log(tmp_path / "log.db", [("a", "the cat", [" runs", " sits"], [1.0, 0.0], 10.0)])
    args = TrainArgs(epochs=1, learning_rate=1e-3, batch_size=2, max_length=32)
    manifest = raft_from_log(models["gpt2_policy"], tmp_path / "log.db", tmp_path / "r1", args, Selection())
    on_disk = json.loads((tmp_path / "r1" / "raft_manifest.json").read_text())
    assert on_disk == manifest and manifest["samples_kept"] == 1 and manifest["samples_seen"] == 2
    assert manifest["reward"]["kept"]["mean"] == 1.0 and manifest["reward"]["all"]["mean"] == 0.5
    assert manifest["parent"]["path"] == str(models["gpt2_policy"])
    AutoModelForCausalLM.from_pretrained(tmp_path / "r1")  # a plain HF directory
    with pytest.raises(RecipeError, match="nothing to train on"):  # the window starts where r1's ended
        raft_from_log(tmp_path / "r1", tmp_path / "log.db", tmp_path / "r2", args, Selection())
    with pytest.raises(RecipeError, match="already exists"):
        raft_from_log(models["gpt2_policy"], tmp_path / "log.db", tmp_path / "r1", args, Selection())


def test_an_interrupted_publish_leaves_nothing_half_written(tmp_path):
    accelerator = make_accelerator(TrainArgs())
    served = tmp_path / "policies" / "v1"
    served.mkdir(parents=True)
    (served / "config.json").write_text("{}")

    def dies_midway(directory):
        (directory / "config.json").write_text('{"half": true}')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        publish(accelerator, tmp_path / "policies" / "v2", dies_midway)
    assert sorted(p.name for p in (tmp_path / "policies").iterdir()) == ["v1"]
    assert (served / "config.json").read_text() == "{}"


def test_sft_learns_and_saves_curves(models, tmp_path):
    examples = [SFTExample(f"{i} plus one is", f" {i + 1}") for i in range(20)]
    args = TrainArgs(epochs=8, learning_rate=3e-3, batch_size=4, max_length=32)
    history = finetune(models["llama_policy"], examples, args, tmp_path / "sft", "sft")
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    assert (tmp_path / "sft" / "training_curves.png").stat().st_size > 0
    assert len(json.loads((tmp_path / "sft" / "training_history.json").read_text())) == len(history)


def test_lora_training_saves_a_merged_plain_checkpoint(models, tmp_path):
    examples = [SFTExample(f"{i} plus one is", f" {i + 1}") for i in range(8)]
    args = TrainArgs(epochs=2, learning_rate=1e-2, batch_size=4, max_length=32, lora_rank=4)
    finetune(models["gpt2_policy"], examples, args, tmp_path / "lora", "sft")
    assert not (tmp_path / "lora" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "lora")
    base = AutoModelForCausalLM.from_pretrained(models["gpt2_policy"])
    changed = [n for n, p in merged.named_parameters() if not torch.equal(p, base.get_parameter(n))]
    assert changed  # the adapters were trained and merged into the weights


def test_raft_self_sampling_runs_its_iterations_and_leaves_no_intermediates(models, tmp_path):
    from server.engines.contract import SamplingParams
    from trainers.raft import raft_self_sampling

    prompts = ["the cat", "one two", [{"role": "user", "content": "hi"}]]
    args = TrainArgs(epochs=1, learning_rate=1e-3, batch_size=2, max_length=64)
    params = SamplingParams(max_tokens=4, seed=0)
    manifest = raft_self_sampling(
        models["gpt2_policy"], prompts, models["llama_rm"], tmp_path / "out", args, Selection(), 2, 3, params
    )
    assert manifest["mode"] == "self-sampling" and len(manifest["iterations"]) == 2
    assert manifest["samples_seen"] == 3 * 3 and manifest["samples_kept"] == 3
    assert json.loads((tmp_path / "out" / "raft_manifest.json").read_text()) == manifest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
