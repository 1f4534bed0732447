"""Process reward models served as reward members, in each layout bon reads, on the real server:
every step score against an independent forward (body, head and softmax at the step tokens, built
in the test), for text and chat prompts; the aggregates; the log; and step-level beam search."""

from __future__ import annotations

import json
import math
import sqlite3
import time

import httpx
import pytest
from conftest import Pair, same_on_every_engine, start_server, stop_server
from reference import step_scores
from transformers import AutoTokenizer

from bon.tiny_models import build_prm, tokenizer_a, tokenizer_b

# layout -> (layout as built, labels, tokenizer, what follows each step)
LAYOUTS = {
    "qwen": ("qwen", 2, tokenizer_b, "<extra_0>"),
    "shepherd": ("shepherd", 2, tokenizer_b, " ки\n"),
    "token": ("token", 2, tokenizer_a, "<step>"),
    "token_one_label": ("token", 1, tokenizer_a, "<step>"),
}
STEP_TOKENS = {"qwen": "<extra_0>", "shepherd": "ки", "token": "<step>"}
MESSAGES = [{"role": "user", "content": "add 12 and 30"}]
RESPONSES = ["2 + 0 = 2\n\n1 + 3 = 4\n\nso 42", "one step", "\n\nthe 42\n\n\n\nand done\n\n"]


def aggregate(steps: list[float], rule: str) -> float:
    return {"last": steps[-1], "min": min(steps), "prod": math.prod(steps), "mean": sum(steps) / len(steps)}[
        rule
    ]


class Prm:
    def __init__(self, directory, name):
        self.dir, self.name = directory, name
        self.layout, _, _, self.suffix = LAYOUTS[name]
        self.tok = AutoTokenizer.from_pretrained(directory)
        self.step_id = self.tok.convert_tokens_to_ids(STEP_TOKENS[self.layout])
        plus_minus = self.tok.convert_tokens_to_ids(["+", "-"])
        self.good_bad = tuple(plus_minus) if self.layout == "shepherd" else None

    def marked(self, completion: str) -> str:
        steps = [s for s in completion.split("\n\n") if s.strip()] or [completion]
        return "".join(step + self.suffix for step in steps)

    def expected(self, prompt: str | list[dict], completion: str) -> list[float]:
        """The step scores by the documented rule, restated: the RM's own input rule on the
        completion with each step followed by the layout's suffix."""
        if isinstance(prompt, str):
            ids = self.tok(prompt + self.marked(completion)).input_ids
        else:
            turn = {"role": "assistant", "content": self.marked(completion)}
            text = self.tok.apply_chat_template([*prompt, turn], tokenize=False)
            ids = self.tok(text, add_special_tokens=False).input_ids
        return step_scores(self.dir, self.layout, ids, self.step_id, self.good_bad)


# One label reads through the token layout's path with a sigmoid in place of a softmax: its
# vLLM run would add a server start to make test-vllm and test no other vLLM call.
@pytest.fixture(
    scope="module",
    params=[pytest.param(n, marks=same_on_every_engine) if n == "token_one_label" else n for n in LAYOUTS],
)
def prm_server(request, models, tmp_path_factory):
    name = request.param
    root = tmp_path_factory.mktemp(f"prm_{name}")
    layout, labels, tokenizer, _ = LAYOUTS[name]
    directory = build_prm(root / name, layout, tokenizer(), labels=labels, seed=5)
    server = start_server(Pair(models["gpt2_policy"], f"prm={directory}"), root, "--max-best-of", "8")
    yield server, Prm(directory, name)
    stop_server(server)


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=120)


def close(got: list[float], want: list[float]) -> bool:
    return len(got) == len(want) and got == pytest.approx(want, rel=1e-4, abs=1e-6)


def test_step_scores_equal_an_independent_forward_for_text_and_chat(prm_server):
    server, prm = prm_server
    assert f"{prm.layout} layout" in server.output()  # bon serve says what it read
    for prompt in ("add 12 and 30:", MESSAGES):
        data = post(server, "/v1/score", {"prompt": prompt, "responses": RESPONSES}).json()["data"]
        for item, response in zip(data, RESPONSES, strict=True):
            want = prm.expected(prompt, response)
            assert close(item["step_rewards"], want), (prompt, response, item, want)
            assert item["reward"] == pytest.approx(min(want), rel=1e-4)  # --step-aggregate min
    assert [len(prm.expected("x", r)) for r in RESPONSES] == [3, 1, 2]


def test_a_request_names_the_aggregate(prm_server):
    server, prm = prm_server
    want = prm.expected("add 12 and 30:", RESPONSES[0])
    for rule in ("last", "min", "prod", "mean"):
        body = {"prompt": "add 12 and 30:", "responses": RESPONSES[:1], "step_aggregate": rule}
        [item] = post(server, "/v1/score", body).json()["data"]
        assert item["reward"] == pytest.approx(aggregate(want, rule), rel=1e-4), rule
    bad = post(server, "/v1/score", {"prompt": "x", "responses": ["y"], "step_aggregate": "max"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "step_aggregate"


def test_best_of_n_returns_and_logs_step_rewards(prm_server):
    server, prm = prm_server
    body = {"model": "gpt2_policy", "messages": MESSAGES, "max_tokens": 8, "best_of": 4, "seed": 2,
            "return_candidates": True, "step_aggregate": "last"}  # fmt: skip
    payload = post(server, "/v1/chat/completions", body).json()
    for candidate in payload["candidates"]:
        want = prm.expected(MESSAGES, candidate["text"])
        assert close(candidate["step_rewards"], want)
        assert candidate["reward"] == pytest.approx(want[-1], rel=1e-4)
    [choice] = payload["choices"]
    best = max(payload["candidates"], key=lambda c: (c["reward"], -c["index"]))
    assert choice["step_rewards"] == best["step_rewards"]
    time.sleep(1.2)  # committed with the next flush
    rows = sqlite3.connect(server.sample_log).execute(
        "SELECT step_rewards, reward, r.params FROM completions JOIN requests r USING (request_id) "
        "WHERE request_id = ? ORDER BY candidate_index",
        (payload["id"],),
    )
    logged = [(json.loads(s), v, json.loads(p)["step_aggregate"]) for s, v, p in rows]
    assert logged == [(c["step_rewards"], c["reward"], "last") for c in payload["candidates"]]


# --- beam search ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def beam_server(models, tmp_path_factory):
    """A Qwen-layout PRM; steps end at a space, which the tiny random policy writes often, so
    searches have partial answers to choose among."""
    root = tmp_path_factory.mktemp("beam")
    directory = build_prm(root / "prm", "qwen", tokenizer_b(), seed=6)
    args = ["--max-best-of", "8", "--step-delimiter", " "]
    server = start_server(Pair(models["gpt2_policy"], f"prm={directory}"), root, *args)
    yield server
    stop_server(server)


def beam(server, seed: int = 4, **search) -> dict:
    body = {"model": "gpt2_policy", "prompt": "the cat", "max_tokens": 12, "n": 2, "best_of": 4,
            "seed": seed, "temperature": 1.2, "return_candidates": True,
            "search": {"type": "beam", "beam_width": 2, "max_steps": 3, **search}}  # fmt: skip
    response = post(server, "/v1/completions", body)
    assert response.status_code == 200, response.text
    return response.json()


def test_beam_search_returns_n_finished_answers_repeats_with_a_seed_and_logs_every_expansion(beam_server):
    payload = beam(beam_server)
    candidates = payload["candidates"]
    finished = [c for c in candidates if not c["pruned"]]
    partial = [c for c in candidates if c["pruned"]]
    assert partial, "no partial answer: the search never expanded a step"
    assert len(payload["choices"]) == 2 and len(finished) >= 4
    best = sorted(finished, key=lambda c: (-c["reward"], c["index"]))[:2]
    assert [c["text"] for c in payload["choices"]] == [c["text"] for c in best]
    # Every partial answer ends at the delimiter; the survivors' children go on from them.
    assert all(c["text"].endswith(" ") for c in partial)
    assert any(f["text"].startswith(p["text"]) for p in partial for f in candidates if f is not p)
    # Round sizes: best_of, then best_of / beam_width survivors x beam_width children each.
    assert len(candidates) <= 4 * 3
    assert payload == {**beam(beam_server), "id": payload["id"], "created": payload["created"]}

    tokens = sum(c["generated_tokens"] for c in candidates)
    assert payload["usage"]["completion_tokens"] == tokens
    time.sleep(1.2)
    rows = sqlite3.connect(beam_server.sample_log).execute(
        "SELECT completion, pruned, generated_tokens FROM completions WHERE request_id = ? "
        "ORDER BY candidate_index",
        (payload["id"],),
    )
    assert [(t, bool(p), g) for t, p, g in rows] == [
        (c["text"], c["pruned"], c["generated_tokens"]) for c in candidates
    ]
    params = json.loads(
        sqlite3.connect(beam_server.sample_log)
        .execute("SELECT params FROM requests WHERE request_id = ?", (payload["id"],))
        .fetchone()[0]
    )
    assert params["search"] == {"type": "beam", "beam_width": 2, "max_steps": 3} and params["best_of"] == 4


@same_on_every_engine
@pytest.mark.parametrize(
    ("search", "says"),
    [
        ({"type": "mcts", "beam_width": 2, "max_steps": 2}, "search.type"),
        ({"type": "beam", "beam_width": 3, "max_steps": 2}, "must divide best_of"),
        ({"type": "beam", "beam_width": 2, "max_steps": 0}, "search.max_steps"),
    ],
)
def test_a_bad_search_is_a_400_naming_it(beam_server, search, says):
    body = {"model": "gpt2_policy", "prompt": "x", "max_tokens": 4, "best_of": 4, "search": search}
    response = post(beam_server, "/v1/completions", body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"].startswith("search") and says in f"{error['param']} {error['message']}"


@same_on_every_engine
def test_an_outcome_only_server_refuses_step_aggregate(server):
    headers = {"Authorization": f"Bearer {server.key}"}
    body = {"prompt": "x", "responses": ["y"], "step_aggregate": "min"}
    response = httpx.post(f"{server.url}/v1/score", json=body, headers=headers, timeout=60)
    assert response.status_code == 400 and response.json()["error"]["param"] == "step_aggregate"
