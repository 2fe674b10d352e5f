"""The fake model behind the emulator's batch jobs: one request line in, one result out.

A batch input is JSONL, one request a line: ``{"custom_id": "0", "body": {...}}``. Each
well-formed line gets a deterministic answer (the same request always gets the same
one), shaped as the endpoint's answer is, in an output line::

    {"id": "batch-<job>-<n>", "custom_id": "0", "response": {"status_code": 200,
     "body": {...}}, "error": null}

A line that is not a JSON object with an object ``body`` gets an error line instead
(``"response": null, "error": {"message": ..., "code": ...}``), for the error file.
Nothing here is the real service's model; only the envelope follows its batch docs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

EMBEDDING_SIZE = 8
INVALID_REQUEST = "invalid_request"


@dataclass(frozen=True)
class Result:
    """One request's outcome: the line for the output file, or for the error file."""

    ok: bool
    line: dict[str, Any]


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _last_user_text(body: dict[str, Any]) -> str:
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in reversed(messages):
            if isinstance(message, dict) and isinstance(message.get("content"), str):
                return message["content"]
    prompt = body.get("prompt")
    return prompt if isinstance(prompt, str) else ""


def _answer(endpoint: str, model: str | None, body: dict[str, Any], created: int) -> Any:
    """What the endpoint would answer: a chat completion, embeddings, or a plain echo."""
    digest = _digest(body)
    model_name = body.get("model") if isinstance(body.get("model"), str) else model
    if endpoint.endswith("/embeddings"):
        inputs = body.get("input")
        count = len(inputs) if isinstance(inputs, list) else 1
        return {
            "id": f"embd-{digest[:24]}",
            "object": "list",
            "model": model_name,
            "data": [
                {
                    "object": "embedding",
                    "index": i,
                    "embedding": [
                        int(digest[(i + k) % 56 : (i + k) % 56 + 8], 16) / 2**32 - 0.5
                        for k in range(EMBEDDING_SIZE)
                    ],
                }
                for i in range(count)
            ],
            "usage": {"prompt_tokens": count, "total_tokens": count},
        }
    question = _last_user_text(body)
    content = f"Emulated answer {digest[:12]} to: {question[:200]}"
    prompt_tokens, completion_tokens = len(question.split()), len(content.split())
    return {
        "id": f"cmpl-{digest[:24]}",
        "object": "chat.completion",
        "created": created,
        "model": model_name,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def answer_line(
    raw: bytes, *, job_id: str, number: int, endpoint: str, model: str | None, created: int
) -> Result:
    """The result of request line ``number`` (1-based, across the job's inputs)."""
    line_id = f"batch-{job_id}-{number}"
    custom_id: Any = None
    try:
        request = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        return _error(line_id, None, f"line {number}: not valid JSON: {exc}")
    if not isinstance(request, dict):
        return _error(line_id, None, f"line {number}: a request must be a JSON object")
    custom_id = request.get("custom_id")
    if custom_id is not None and not isinstance(custom_id, str | int):
        return _error(line_id, None, f"line {number}: custom_id must be a string")
    custom_id = None if custom_id is None else str(custom_id)
    body = request.get("body")
    if not isinstance(body, dict):
        return _error(line_id, custom_id, f"line {number}: 'body' must be a JSON object")
    response = {"status_code": 200, "body": _answer(endpoint, model, body, created)}
    return Result(True, {"id": line_id, "custom_id": custom_id, "response": response,
                         "error": None})  # fmt: skip


def _error(line_id: str, custom_id: str | None, message: str) -> Result:
    return Result(
        False,
        {
            "id": line_id,
            "custom_id": custom_id,
            "response": None,
            "error": {"message": message, "code": INVALID_REQUEST},
        },
    )
