"""The benchmark's request bodies: a 2,205-byte chat completion, streamed or not, and the wrk Lua script."""

from __future__ import annotations

import orjson

BODY_BYTES = 2205
MODEL = "mock-model"


def chat_body(stream: bool, size: int = BODY_BYTES, model: str = MODEL) -> bytes:
    """A chat request of exactly `size` bytes (the user message is padded to fit)."""
    def build(pad: int) -> bytes:
        return orjson.dumps(
            {
                "model": model,
                "messages": [
                    {"role": "system", "content": "You are a research planner. Break the question into search queries."},
                    {"role": "user", "content": "Question: " + "x" * pad},
                ],
                "max_tokens": 64,
                "temperature": 0,
                "stream": stream,
            }
        )

    base = len(build(0))
    body = build(size - base)
    assert len(body) == size, (len(body), size)
    return body


def lua_script(body: bytes, headers: dict[str, str] | None = None) -> str:
    """A wrk script that POSTs `body` as JSON on every request."""
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    lines = ['wrk.method = "POST"', f"wrk.body = {_lua_string(body.decode())}"]
    lines += [f'wrk.headers["{k}"] = {_lua_string(v)}' for k, v in hdrs.items()]
    return "\n".join(lines) + "\n"


def _lua_string(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
