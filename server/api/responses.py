"""OpenAI response bodies (plus bon's `reward` and `candidates`) from best-of-N results."""

from __future__ import annotations

import json
from collections.abc import Iterator

from server.service import BestOfNResult


def _usage(results: list[BestOfNResult]) -> dict[str, int]:
    """Each prompt counted once; every candidate's tokens counted, returned or not."""
    prompt = sum(len(r.prompt.token_ids) for r in results)
    completion = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _candidates(results: list[BestOfNResult]) -> list[dict]:
    return [
        {
            "prompt_index": p,
            "index": i,
            "text": s.candidate.text,
            "reward": s.reward,
            "finish_reason": s.candidate.finish_reason,
        }
        for p, result in enumerate(results)
        for i, s in enumerate(result.candidates)
    ]


def _envelope(kind: str, request_id: str, created: int, model: str, fingerprint: str) -> dict:
    return {
        "id": request_id,
        "object": kind,
        "created": created,
        "model": model,
        "system_fingerprint": fingerprint,
    }


def completion_body(
    request_id: str,
    created: int,
    model: str,
    fingerprint: str,
    results: list[BestOfNResult],
    n: int,
    with_candidates: bool,
) -> dict:
    choices = [
        {
            "index": p * n + j,
            "text": result.candidates[c].candidate.text,
            "logprobs": None,
            "finish_reason": result.candidates[c].candidate.finish_reason,
            "reward": result.candidates[c].reward,
        }
        for p, result in enumerate(results)
        for j, c in enumerate(result.chosen)
    ]
    body = _envelope("text_completion", request_id, created, model, fingerprint)
    body.update(choices=choices, usage=_usage(results))
    if with_candidates:
        body["candidates"] = _candidates(results)
    return body


def chat_body(
    request_id: str, created: int, model: str, fingerprint: str, result: BestOfNResult, with_candidates: bool
) -> dict:
    choices = [
        {
            "index": j,
            "message": {"role": "assistant", "content": result.candidates[c].candidate.text},
            "logprobs": None,
            "finish_reason": result.candidates[c].candidate.finish_reason,
            "reward": result.candidates[c].reward,
        }
        for j, c in enumerate(result.chosen)
    ]
    body = _envelope("chat.completion", request_id, created, model, fingerprint)
    body.update(choices=choices, usage=_usage([result]))
    if with_candidates:
        body["candidates"] = _candidates([result])
    return body


def as_stream(body: dict) -> Iterator[str]:
    """A finished single-candidate response as server-sent events: one chunk, then [DONE].

    Streaming is allowed only with best_of == 1, and the transformers engine decodes a whole batch
    before answering, so the text arrives in one chunk; clients that stream still work unchanged.
    """
    chunk = dict(body)
    chunk.pop("usage", None)
    if body["object"] == "chat.completion":
        chunk["object"] = "chat.completion.chunk"
        chunk["choices"] = [
            {
                "index": c["index"],
                "delta": c["message"],
                "finish_reason": c["finish_reason"],
                "reward": c["reward"],
            }
            for c in body["choices"]
        ]
    yield f"data: {json.dumps(chunk)}\n\n"
    yield "data: [DONE]\n\n"
