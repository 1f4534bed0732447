"""BestOfN on the fake engines: selection, logging, pinning across reloads, the greedy rule, failures."""

from __future__ import annotations

import asyncio
import inspect
import json
from pathlib import Path

import pytest
from fakes import FakeSampler, FakeScorer

from bon.tiny_models import tokenizer_a, tokenizer_b
from server import failures
from server.admission import Admission, Limits
from server.api.errors import FAILURES, failure_response
from server.assembly import Service
from server.engines.contract import SamplingParams
from server.log.records import CompletionRecord, RequestRecord
from server.log.sample_log import SampleLog
from server.log.sources import read_records
from server.policy import PolicyInfo
from server.prompts import text_prompt
from server.registry import Checkpoints, Loaded
from server.reward import RewardModelInfo
from server.rules import RuleRunner
from server.selection import Combination
from server.service import BestOfN


@pytest.fixture(scope="module")
def tokenizers():
    return tokenizer_a(), tokenizer_b()


def policy_info(tokenizers, name="policy-v1") -> PolicyInfo:
    return PolicyInfo(Path(name), name, tokenizers[0], 64, frozenset(), "float32", 64 * 16)


def rm_info(tokenizers, name="rm-v1") -> RewardModelInfo:
    return RewardModelInfo(Path(name), name, tokenizers[1], 64, "float32", 64 * 16)


async def make_service(tokenizers, sampler, scorer, sample_log=None) -> Service:
    policy, rm = policy_info(tokenizers), rm_info(tokenizers)
    admission = Admission(
        Limits(max_best_of=8, max_batch_tokens=4096, max_prompts=4, max_score_inputs=8, max_score_tokens=512)
    )
    checkpoints = Checkpoints(
        Loaded(policy, await sampler.load(policy)), {"rm": Loaded(rm, await scorer.load(rm))}, sampler, scorer
    )
    pipeline = BestOfN(sampler, scorer, sample_log, admission, Combination(), RuleRunner([], 5.0))
    return Service(checkpoints, admission, pipeline)


def text(service: Service, prompt: str):
    """The prompt as the serving policy tokenizes it."""
    return text_prompt(service.checkpoints.policy.info.tokenizer, prompt)


async def run(service: Service, *args, **kwargs):
    """One request through the pipeline, on the checkpoints it pins."""
    async with service.checkpoints.pinned() as pinned:
        return await service.best_of_n.run(pinned, *args, **kwargs)


def test_returns_the_top_n_by_reward_and_logs_every_candidate(tokenizers, tmp_path):
    sampler, scorer = FakeSampler(), FakeScorer()
    sample_log = SampleLog(tmp_path / "log.db", 0.1)

    async def scenario():
        service = await make_service(tokenizers, sampler, scorer, sample_log)
        prompt = text(service, "the cat")
        return await run(service, "req-1", [prompt], SamplingParams(max_tokens=4), n=2, best_of=6, log=True)

    [result] = asyncio.run(scenario())
    sample_log.close()
    rm_tok = tokenizers[1]
    texts = [" w" * (i + 1) for i in range(6)]
    expected = [FakeScorer.reward(rm_tok("the cat" + t).input_ids) for t in texts]  # the RM's own input rule
    assert [s.reward for s in result.candidates] == expected
    best_two = sorted(range(6), key=lambda i: (-expected[i], i))[:2]
    assert result.chosen == best_two
    rows = read_records(tmp_path / "log.db")
    assert [r["completion"] for r in rows] == texts
    assert [r["rank"] for r in rows] == [
        sorted(range(6), key=lambda i: (-expected[i], i)).index(i) for i in range(6)
    ]
    assert {r["policy_version"] for r in rows} == {"policy-v1"}


def test_greedy_decodes_one_row_and_repeats_it_for_best_of(tokenizers):
    sampler, scorer = FakeSampler(), FakeScorer()

    async def scenario():
        service = await make_service(tokenizers, sampler, scorer)
        params = SamplingParams(max_tokens=4, temperature=0)
        return await run(service, "r", [text(service, "x")], params, n=1, best_of=5, log=False)

    [result] = asyncio.run(scenario())
    assert [r.n for r in sampler.requests] == [1]
    assert len(result.candidates) == 5 and len({s.candidate.text for s in result.candidates}) == 1
    # Copies, not one shared object: nothing downstream can alias them.
    assert len({id(s.candidate) for s in result.candidates}) == 5


def test_a_pinned_request_keeps_its_checkpoints_and_the_old_ones_are_released_after_it(tokenizers):
    sampler, scorer = FakeSampler(), FakeScorer()

    async def scenario():
        service = await make_service(tokenizers, sampler, scorer)
        old_policy, old_rm = (
            service.checkpoints.policy.weights,
            service.checkpoints.reward_models["rm"].weights,
        )
        async with service.checkpoints.pinned() as pinned:
            new_policy = policy_info(tokenizers, "policy-v2")
            new_rm = rm_info(tokenizers, "rm-v2")
            await service.checkpoints.swap(
                Loaded(new_policy, await sampler.load(new_policy)),
                {"rm": Loaded(new_rm, await scorer.load(new_rm))},
            )
            assert sampler.released == [] and scorer.released == []  # the view still holds them
            prompt = text(service, "x")
            await service.best_of_n.run(pinned, "r", [prompt], SamplingParams(max_tokens=2), 1, 2, log=False)
            assert sampler.requests[-1].weights is old_policy and scorer.calls[-1][1] is old_rm
            assert pinned.fingerprint == "bon-policy-v1-rm-v1"
        assert sampler.released == [old_policy] and scorer.released == [old_rm]
        await run(service, "r", [text(service, "x")], SamplingParams(max_tokens=2), 1, 2, log=False)
        assert sampler.requests[-1].weights.path == Path("policy-v2")
        assert service.checkpoints.current().fingerprint == "bon-policy-v2-rm-v2"

    asyncio.run(scenario())


def test_an_unheld_checkpoint_is_released_at_the_swap(tokenizers):
    sampler, scorer = FakeSampler(), FakeScorer()

    async def scenario():
        service = await make_service(tokenizers, sampler, scorer)
        old = service.checkpoints.policy.weights
        new = policy_info(tokenizers, "policy-v2")
        await service.checkpoints.swap(Loaded(new, await sampler.load(new)))
        assert sampler.released == [old] and scorer.released == []

    asyncio.run(scenario())


def test_engine_failures_reach_the_caller_as_they_were_raised(tokenizers):
    sampler = FakeSampler(fail_with=failures.Overloaded("queue full"))

    async def scenario():
        service = await make_service(tokenizers, sampler, FakeScorer())
        await run(service, "r", [text(service, "x")], SamplingParams(max_tokens=2), 1, 2, log=False)

    with pytest.raises(failures.Overloaded):
        asyncio.run(scenario())


def test_best_of_and_context_limits_are_invalid_input_naming_the_field(tokenizers):
    async def scenario():
        service = await make_service(tokenizers, FakeSampler(), FakeScorer())
        prompt = text(service, "the cat")
        with pytest.raises(failures.InvalidInput) as over:
            service.admission.check_best_of(9, SamplingParams(max_tokens=2), [prompt])
        assert over.value.field == "best_of"
        with pytest.raises(failures.ContextTooLong) as long:
            service.admission.resolve_max_tokens(service.checkpoints.policy.info, [prompt], 100, 16)
        assert long.value.field == "max_tokens" and "maximum context length is 64" in long.value.message

    asyncio.run(scenario())


def test_every_failure_has_a_status_and_retryable_ones_say_when():
    classes = [c for _, c in inspect.getmembers(failures, inspect.isclass) if issubclass(c, failures.Failure)]
    unmapped = [c for c in classes if c is not failures.Failure and c not in FAILURES]
    assert unmapped == []
    overloaded = failure_response(failures.Overloaded("full"))
    assert overloaded.status_code == 429 and overloaded.headers["retry-after"] == "1"
    dead = failure_response(failures.EngineDead("gone"))
    assert dead.status_code == 503 and "retry-after" not in dead.headers
    # The most specific class decides: ContextTooLong is an InvalidInput with its own code.
    body = failure_response(failures.ContextTooLong("too long", "prompt")).body
    assert b"context_length_exceeded" in body and b'"param":"prompt"' in body


def test_each_request_stores_its_parameters_and_prompts_once(tokenizers, tmp_path):
    import sqlite3

    sample_log = SampleLog(tmp_path / "log.db", 0.1)
    stops = tuple("z" * 1000 + str(i) for i in range(16))

    async def scenario():
        service = await make_service(tokenizers, FakeSampler(), FakeScorer(), sample_log)
        prompts = [text(service, "the cat"), text(service, "a dog")]
        await run(
            service, "req-1", prompts, SamplingParams(max_tokens=4, stop=stops), n=1, best_of=8, log=True
        )

    asyncio.run(scenario())
    sample_log.close()
    db = sqlite3.connect(tmp_path / "log.db")
    assert db.execute("SELECT COUNT(*) FROM requests").fetchone() == (1,)
    assert db.execute("SELECT COUNT(*) FROM prompts").fetchone() == (2,)
    assert db.execute("SELECT COUNT(*) FROM completions").fetchone() == (16,)
    [(params,)] = db.execute("SELECT params FROM requests").fetchall()
    assert json.loads(params)["stop"] == list(stops)
    # Readers still see one whole row per candidate.
    rows = read_records(tmp_path / "log.db")
    assert len(rows) == 16 and all(r["params"]["stop"] == list(stops) for r in rows)
    assert [r["prompt"] for r in rows] == ["the cat"] * 8 + ["a dog"] * 8


def test_a_log_that_cannot_keep_up_refuses_instead_of_acknowledging(tmp_path):
    import sqlite3

    from server.log.records import CompletionRecord, RequestRecord

    def record(i: int) -> RequestRecord:
        return RequestRecord(f"r{i}", {}, "p", "v", "rm", "v", float(i), [("x" * 5000, 1)], [
            CompletionRecord(0, 0, "y", 0.0, 0, "stop", 1, False)
        ])  # fmt: skip

    sample_log = SampleLog(tmp_path / "log.db", 0.05, max_pending_bytes=12_000)
    blocker = sqlite3.connect(tmp_path / "log.db", timeout=0)
    blocker.execute("BEGIN EXCLUSIVE")  # the writer cannot commit: its queue stays full

    async def scenario():
        await sample_log.append_when_room(record(0), 0.2)  # an empty queue takes anything
        await sample_log.append_when_room(record(1), 0.2)
        with pytest.raises(failures.LogBehind):
            await sample_log.append_when_room(record(2), 0.3)

    asyncio.run(scenario())
    blocker.rollback()
    blocker.close()
    sample_log.close()
    assert [r["request_id"] for r in read_records(tmp_path / "log.db")] == ["r0", "r1"]


def test_a_log_of_the_first_layout_is_migrated_and_reads_the_same(tmp_path):
    import sqlite3

    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript(
        """CREATE TABLE candidates (id INTEGER PRIMARY KEY, request_id TEXT, prompt_index INTEGER,
        candidate_index INTEGER, prompt TEXT, completion TEXT, reward REAL, rank INTEGER,
        finish_reason TEXT, policy TEXT, policy_version TEXT, reward_model TEXT,
        reward_model_version TEXT, params TEXT, prompt_tokens INTEGER, completion_tokens INTEGER,
        reward_truncated INTEGER, created REAL);
        CREATE TABLE feedback (id INTEGER PRIMARY KEY, request_id TEXT, prompt_index INTEGER,
        ranks TEXT, created REAL);"""
    )
    rows = [
        ("a", 0, i, json.dumps("the cat"), f" c{i}", float(i), 1 - i, "stop", "/p", "v1", "/rm", "v2",
         json.dumps({"best_of": 2}), 3, 2, 0, 10.0)
        for i in range(2)
    ]  # fmt: skip
    columns = "request_id, prompt_index, candidate_index, prompt, completion, reward, rank, finish_reason, "
    columns += "policy, policy_version, reward_model, reward_model_version, params, prompt_tokens, "
    columns += "completion_tokens, reward_truncated, created"
    db.executemany(f"INSERT INTO candidates ({columns}) VALUES ({', '.join('?' * 17)})", rows)
    db.commit()
    db.close()
    records = read_records(path)
    assert [(r["completion"], r["reward"], r["rank"], r["prompt"], r["params"]) for r in records] == [
        (" c0", 0.0, 1, "the cat", {"best_of": 2}),
        (" c1", 1.0, 0, "the cat", {"best_of": 2}),
    ]
    kind = (
        sqlite3.connect(path).execute("SELECT type FROM sqlite_master WHERE name = 'candidates'").fetchone()
    )
    assert kind == ("view",)


def test_a_refused_prompt_cancels_the_request_s_other_prompts(tokenizers):
    class Refuses(FakeSampler):
        """Prompt "first" waits (it was admitted); prompt "second" finds the queue full."""

        def __init__(self):
            super().__init__()
            self.cancelled = asyncio.Event()

        async def sample(self, request):
            if len(request.prompt_ids) == len(tokenizers[0]("first").input_ids) and not self.requests:
                self.requests.append(request)
                try:
                    await asyncio.sleep(60)
                except asyncio.CancelledError:
                    self.cancelled.set()
                    raise
            await asyncio.sleep(0.01)
            raise failures.Overloaded("queue full")

    sampler = Refuses()

    async def scenario():
        service = await make_service(tokenizers, sampler, FakeScorer())
        prompts = [text(service, "first"), text(service, "second one")]
        with pytest.raises(failures.Overloaded):
            await run(service, "r", prompts, SamplingParams(max_tokens=2), 1, 1, log=False)
        await asyncio.wait_for(sampler.cancelled.wait(), 1)

    asyncio.run(scenario())


def test_a_log_without_the_pruned_column_gains_it_and_raft_reads_only_finished_candidates(tmp_path):
    import sqlite3

    from server.log.sqlite import SCHEMA

    path = tmp_path / "before_early_rejection.db"
    # The layout before early rejection: the later columns, and the view's share of them, cut out.
    older = SCHEMA
    for now, before in [
        ("    created REAL NOT NULL,            -- the request's, repeated for the time-window index\n"
         "    pruned INTEGER NOT NULL DEFAULT 0, -- a partial answer (early rejection, beam search)\n"
         "    rewards TEXT,                     -- JSON {member: raw reward}; reward is their combination\n"
         "    step_rewards TEXT,                -- JSON [score per step] from a process reward model\n"
         "    generated_tokens INTEGER          -- beam search: tokens decoded for this expansion alone\n",
         "    created REAL NOT NULL\n"),
        (", c.created, c.pruned,\n       c.rewards, c.step_rewards, c.generated_tokens, r.replica\n",
         ", c.created\n"),
        ("    created REAL NOT NULL,            -- unix time, seconds\n"
         "    replica TEXT NOT NULL DEFAULT ''  -- the server that wrote it (--replica-id)\n",
         "    created REAL NOT NULL             -- unix time, seconds\n"),
    ]:  # fmt: skip
        older = older.replace(now, before)
    assert "pruned" not in older and "rewards TEXT" not in older and "replica" not in older
    db = sqlite3.connect(path)
    db.executescript(older)
    db.execute("INSERT INTO requests VALUES ('a', '{}', '/p', 'v1', '/rm', 'v2', 10.0)")
    db.execute("INSERT INTO prompts VALUES ('a', 0, '\"the cat\"', 3)")
    db.execute(
        "INSERT INTO completions (request_id, prompt_index, candidate_index, completion, reward, rank, "
        "finish_reason, completion_tokens, reward_truncated, created) "
        "VALUES ('a', 0, 0, ' sat', 1.5, 0, 'stop', 2, 0, 10.0)"
    )
    db.commit()
    db.close()
    [old] = read_records(path)
    assert (old["completion"], old["pruned"], old["rewards"], old["replica"]) == (" sat", False, None, "")

    log = SampleLog(path)
    log.append(
        RequestRecord(
            "b", {}, "/p", "v1", "/rm", "v2", 11.0, [("the dog", 3)],
            [CompletionRecord(0, 0, " ran far", 2.0, 0, "length", 4, False),
             CompletionRecord(0, 1, " ra", -1.0, 1, "length", 2, False, pruned=True)],
        )
    )  # fmt: skip
    log.close()
    assert [(r["completion"], r["pruned"]) for r in read_records(path)] == [
        (" sat", False),
        (" ran far", False),
        (" ra", True),
    ]
    assert [r["completion"] for r in read_records(path, finished_only=True)] == [" sat", " ran far"]
