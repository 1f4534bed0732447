"""/openapi.json tells the truth: checked directly, and by schemathesis against the real server."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import openai
from conftest import API_KEYS


def document(server) -> dict:
    return httpx.get(f"{server.url}/openapi.json").json()


def test_errors_are_the_envelope_and_never_the_422_fastapi_would_claim(server):
    paths = document(server)["paths"]
    completions = paths["/v1/completions"]["post"]["responses"]
    assert "422" not in completions
    for status in ("400", "401", "404", "413", "429", "503"):
        schema = completions[status]["content"]["application/json"]["schema"]
        assert schema == {"$ref": "#/components/schemas/ErrorEnvelope"}, status
    assert "403" in paths["/admin/reload"]["post"]["responses"]
    assert all("422" not in op["responses"] for ops in paths.values() for op in ops.values())


def test_success_bodies_say_what_bon_adds(server):
    schemas = document(server)["components"]["schemas"]
    choice = schemas["CompletionChoice"]["properties"]
    assert "reward" in choice and "reward" in schemas["ChatChoice"]["properties"]
    response = schemas["CompletionResponse"]["properties"]
    assert {"candidates", "system_fingerprint", "usage"} <= set(response)


def test_keys_content_types_and_the_model_name(server):
    spec = document(server)
    assert spec["components"]["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "An API key (--api-key)",
    }
    paths = spec["paths"]
    assert paths["/v1/completions"]["post"]["security"] == [{"bearer": []}]
    assert "security" not in paths["/health"]["get"]
    assert list(paths["/metrics"]["get"]["responses"]["200"]["content"]) == [
        "text/plain; version=1.0.0; charset=utf-8"
    ]
    assert "text/event-stream" in paths["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    model = spec["components"]["schemas"]["CompletionRequest"]["properties"]["model"]
    assert model == {"type": "string", "enum": ["gpt2_policy"]}


def test_docs_pages_are_off_and_models_retrieve_works(server):
    assert httpx.get(f"{server.url}/docs").status_code == 404
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEYS[0], max_retries=0)
    model = client.models.retrieve("gpt2_policy")
    assert model.id == "gpt2_policy" and model.model_dump()["root"]
    try:
        client.models.retrieve("gpt-4")
        raise AssertionError("an unknown model was found")
    except openai.NotFoundError as error:
        assert error.body["param"] == "model"


def test_schemathesis_finds_no_server_error_and_no_nonconformance(server, tmp_path):
    """A bounded property-based run over every operation, with a key, the model name pinned by the
    schema so requests reach sampling and scoring."""
    st = shutil.which("st") or str(Path(sys.executable).parent / "st")
    checks = (
        "not_a_server_error,status_code_conformance,content_type_conformance,"
        "response_headers_conformance,response_schema_conformance"
    )
    command = [
        st, "run", f"{server.url}/openapi.json", "--header", f"Authorization: Bearer {API_KEYS[0]}",
        "--checks", checks, "--max-examples", "25", "--seed", "1", "--request-timeout", "60",
        "--no-color", "--generation-database", "none",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-6000:]
    assert "failures" not in result.stdout.splitlines()[-1], result.stdout[-3000:]
