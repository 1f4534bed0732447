"""The candidate log in a real PostgreSQL (bon/local_postgres.py): what a fleet relies on.

The server suites also run whole against PostgreSQL (`make test-postgres`); these are the promises
only a shared database has: replica ids, a database restarting under a serving replica, every
character kept, an ordinary owner role, replicas migrating together, and readers that take many
logs and read them as one.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from conftest import serve_command, start_server, stop_server, wait_ready
from safetensors.torch import load_file

from bon.local_postgres import PASSWORD, SUPERUSER_PASSWORD
from server.log.records import CompletionRecord, RequestRecord
from server.log.sample_log import SampleLog
from server.log.sources import open_store, read_feedback, read_records
from trainers import raft


def test_a_served_request_is_logged_whole_with_its_replica(pair_gpt2_llama, postgres, tmp_path):
    url = postgres.database()
    server = start_server(pair_gpt2_llama, tmp_path, "--replica-id", "replica-a", sample_log=url)
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
        text = client.completions.create(
            model="gpt2_policy", prompt=["the cat", "a dog"], max_tokens=5, n=1,
            extra_body={"best_of": 3, "return_candidates": True, "seed": 4},
        )  # fmt: skip
        chat = client.chat.completions.create(
            model="gpt2_policy", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
            extra_body={"best_of": 2, "return_candidates": True},
        )  # fmt: skip
        feedback = httpx.post(
            f"{server.url}/v1/feedback", json={"request_id": text.id, "chosen": 2, "rejected": 0}, timeout=30
        )
        assert feedback.status_code == 200, feedback.text
    finally:
        assert stop_server(server) in (0, -15)
    records = read_records(url)
    assert {r["replica"] for r in records} == {"replica-a"}
    served = {(c["prompt_index"], c["index"]): c for c in text.model_extra["candidates"]}
    mine = [r for r in records if r["request_id"] == text.id]
    assert len(mine) == len(served) == 6
    for record in mine:
        candidate = served[record["prompt_index"], record["candidate_index"]]
        assert record["prompt"] == ("the cat", "a dog")[record["prompt_index"]]
        assert record["completion"] == candidate["text"]
        assert record["reward"] == pytest.approx(candidate["reward"], rel=1e-6)
    assert [r["prompt"] for r in records if r["request_id"] == chat.id] == [
        [{"role": "user", "content": "hi"}]
    ] * 2
    [stored] = read_feedback(url)
    assert stored["request_id"] == text.id and stored["ranks"][2] == 0 and stored["ranks"][0] == 1
    # The password is in the URL bon was given; it is in none of what bon wrote.
    assert PASSWORD not in server.output()


def record(
    request_id: str, created: float, completions: list[tuple[str, float]], prompt="the cat"
) -> RequestRecord:
    """A logged request of one prompt whose candidates are ranked by reward."""
    order = sorted(range(len(completions)), key=lambda i: -completions[i][1])
    return RequestRecord(
        request_id, {"best_of": len(completions)}, "policy", "v1", "rm", "v1", created, [(prompt, 3)],
        [CompletionRecord(0, i, text, reward, order.index(i), "stop", 2, False)
         for i, (text, reward) in enumerate(completions)],
    )  # fmt: skip


def write(location, records: list[RequestRecord], replica: str = "") -> None:
    log = SampleLog(location, 0.05, replica=replica)
    for one in records:
        log.append(one)
    log.close()


# NUL: SQLite stores it, PostgreSQL's text refuses it, JSON escapes it. And beyond the BMP.
ODD_TEXTS = ["a\x00b", "\x00", "tail \U0001f642 e\u0301", "plain"]


def test_every_character_survives_both_stores(postgres, tmp_path):
    url = postgres.database()
    records = [
        record(f"r{i}", 100.0 + i, [(text, float(i))], prompt=f"p\x00{i}") for i, text in enumerate(ODD_TEXTS)
    ]
    write(url, records)
    write(
        tmp_path / "log.db",
        [record(f"r{i}", 100.0 + i, [(t, float(i))], f"p\x00{i}") for i, t in enumerate(ODD_TEXTS)],
    )
    from_postgres, from_sqlite = read_records(url), read_records(tmp_path / "log.db")
    assert [r["completion"] for r in from_postgres] == ODD_TEXTS
    assert [r["prompt"] for r in from_postgres] == [f"p\x00{i}" for i in range(4)]
    assert [{k: v for k, v in r.items() if k != "replica"} for r in from_postgres] == [
        {k: v for k, v in r.items() if k != "replica"} for r in from_sqlite
    ]


def bon_serve_exits(pair, sample_log: str, tmp_path) -> subprocess.CompletedProcess:
    """`bon serve` with this log, which must refuse before it serves."""
    command = serve_command(pair, "--port", "1", "--sample-log", sample_log)
    return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path)


def test_bon_refuses_a_superuser_and_a_role_that_does_not_own_its_database(
    pair_gpt2_llama, postgres, tmp_path
):
    superuser = postgres.url("postgres", role="postgres", password=SUPERUSER_PASSWORD)
    refused = bon_serve_exits(pair_gpt2_llama, superuser, tmp_path)
    assert refused.returncode == 2
    assert "role postgres is a superuser" in refused.stderr and SUPERUSER_PASSWORD not in refused.stderr
    not_owned = postgres.database(owner="postgres")
    refused = bon_serve_exits(pair_gpt2_llama, not_owned, tmp_path)
    assert refused.returncode == 2 and "does not own database" in refused.stderr
    assert PASSWORD not in refused.stderr + refused.stdout
    wrong_password = postgres.database().replace(PASSWORD, "wrong")
    refused = bon_serve_exits(pair_gpt2_llama, wrong_password, tmp_path)
    assert refused.returncode == 2 and "cannot connect" in refused.stderr and "wrong" not in refused.stderr


def test_replicas_starting_together_make_the_tables_once(postgres):
    url = postgres.database()
    errors: list[BaseException] = []

    def start():
        try:
            open_store(url).close()
        except BaseException as error:  # noqa: BLE001 - collected and asserted below
            errors.append(error)

    threads = [threading.Thread(target=start) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    database = url.rsplit("/", 1)[1]
    tables = postgres.sql(
        "SELECT count(*) FROM pg_tables WHERE schemaname = 'public' AND tableowner = 'bon'", database
    )
    assert tables == "4"  # requests, prompts, completions, feedback, owned by bon


def test_a_database_restart_loses_nothing_acknowledged(pair_gpt2_llama, postgres, tmp_path):
    url = postgres.database()
    server = start_server(pair_gpt2_llama, tmp_path, "--replica-id", "r", sample_log=url)
    body = {"model": "gpt2_policy", "prompt": "the cat", "max_tokens": 3, "best_of": 2}
    acknowledged, refused, statuses = [], 0, set()

    def send(count: int) -> None:
        nonlocal refused
        for _ in range(count):
            response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
            statuses.add(response.status_code)
            if response.status_code == 200:
                acknowledged.append(response.json()["id"])
            else:
                assert response.status_code == 503 and response.json()["error"]["code"] == "log_behind"
                refused += 1

    try:
        send(3)
        postgres.stop()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and httpx.get(f"{server.url}/ready").status_code == 200:
            send(1)  # until a failed commit turns the replica away
        assert httpx.get(f"{server.url}/ready").json()["error"]["code"] == "log_behind"
        send(3)
        assert refused >= 3  # while the database is down nothing new is acknowledged
        postgres.start()
        wait_ready(server, timeout=60)  # it reconnects by itself
        send(3)
    finally:
        stop_server(server)
    assert statuses <= {200, 503}
    logged = [r["request_id"] for r in read_records(url)]
    assert all(logged.count(request_id) == 2 for request_id in acknowledged)
    assert len(set(logged)) == len(acknowledged)  # and nothing refused was logged


def raft_weights(sample_log: list[str], policy: Path, output: Path) -> dict:
    sources = [arg for source in sample_log for arg in ("--sample-log", source)]
    raft.main(["--policy", str(policy), *sources, "--output", str(output), "--since", "0", "--epochs", "2",
               "--batch-size", "2", "--seed", "3", "--top-k", "2"])  # fmt: skip
    return load_file(output / "model.safetensors")


def test_one_file_shards_and_postgres_train_raft_to_one_checkpoint(models, postgres, tmp_path):
    # Two replicas' requests, interleaved in time, some with equal created times across replicas.
    def candidates(name: str, i: int) -> list[tuple[str, float]]:
        return [(f" {name}{i}{j}", float((i * 7 + j * 3) % 5)) for j in range(3)]

    by_replica = {
        name: [
            record(f"{name}-{i}", 1000.0 + i // 2, candidates(name, i), f"prompt {i % 6}")
            for i in range(first, 24, 2)
        ]
        for first, name in enumerate(("a", "b"))
    }
    one_file = tmp_path / "one.db"
    # Written newest first: the file's own order is not the order readers return.
    write(one_file, sorted(by_replica["a"] + by_replica["b"], key=lambda r: (-r.created, r.request_id)))
    shards = tmp_path / "shards"
    url = postgres.database()
    for replica, records in by_replica.items():
        write(shards / f"{replica}.db", records, replica)
        write(url, records, replica)
    policy = models["gpt2_policy"]
    reference = raft_weights([str(one_file)], policy, tmp_path / "from-file")
    for name, sources in (("from-shards", [str(shards)]), ("from-postgres", [url]),
                          ("from-both-shards", [str(shards / "a.db"), str(shards / "b.db")])):  # fmt: skip
        weights = raft_weights(sources, policy, tmp_path / name)
        assert weights.keys() == reference.keys()
        assert all((weights[k] == reference[k]).all() for k in reference), name
    manifest = json.loads((tmp_path / "from-postgres" / raft.MANIFEST).read_text())
    assert manifest["samples_seen"] == 72 and PASSWORD not in json.dumps(manifest)


def bon(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bon", *args], capture_output=True, text=True, timeout=300)


def test_export_and_eval_read_postgres_and_shards_alike(postgres, tmp_path):
    records = [
        record(f"q{i}", 50.0 + i, [(f" x{i}{j}", float(j)) for j in range(4)], prompt=f"p{i % 3}")
        for i in range(6)
    ]
    url = postgres.database()
    write(url, records, "a")
    write(tmp_path / "shards" / "a.db", records, "a")
    outputs = []
    for name, source in (("pg", url), ("shards", str(tmp_path / "shards"))):
        exported = tmp_path / f"{name}.jsonl"
        done = bon("export-samples", "--sample-log", source, "-o", str(exported))
        assert done.returncode == 0, done.stderr
        evaluated = bon("eval", "--samples", source, "--output", str(tmp_path / f"eval-{name}"))
        assert evaluated.returncode == 0, evaluated.stderr
        report = json.loads((tmp_path / f"eval-{name}" / "eval.json").read_text())
        outputs.append((exported.read_text(), report["policies"]))
    assert outputs[0] == outputs[1]
    assert len(outputs[0][0].splitlines()) == 24


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://bon:p%40ss@db:5432/bon", "postgresql://bon:***@db:5432/bon"),
        (
            "postgresql://db/bon?sslmode=require&password=pw&x=1",
            "postgresql://db/bon?sslmode=require&password=***&x=1",
        ),
        ("postgres:///bon?password=pw", "postgres:///bon?password=***"),
        ("postgresql://bon@db/bon", "postgresql://bon@db/bon"),
    ],
)
def test_a_database_url_is_shown_without_its_password(url, shown):
    from server.log.sources import shown as shown_location

    assert shown_location(url) == shown
