"""OpenAI-shaped error responses: {"error": {"message", "type", "code", "param"}} with the right status."""

from __future__ import annotations

import orjson
from aiohttp import web


def error_type(status: int) -> str:
    """OpenAI's error `type` for a status: client errors are invalid requests, the rest server errors."""
    if status == 429:
        return "rate_limit_error"
    return "invalid_request_error" if status < 500 else "server_error"


def error_body(status: int, code: str, message: str, param: str | None = None) -> bytes:
    """The JSON bytes of an OpenAI error object."""
    return orjson.dumps({"error": {"message": message, "type": error_type(status), "code": code, "param": param}})


def error_response(
    status: int, code: str, message: str, param: str | None = None, retry_after_s: float | None = None
) -> web.Response:
    """An OpenAI-shaped JSON error response; `Retry-After` (whole seconds) when given."""
    headers = None
    if retry_after_s is not None:
        headers = {"Retry-After": str(max(1, round(retry_after_s)))}
    return web.Response(
        status=status, body=error_body(status, code, message, param), content_type="application/json", headers=headers
    )


def sse_error_event(code: str, message: str) -> bytes:
    """An SSE event carrying an OpenAI error, then `[DONE]`: how a stream that broke mid-way ends."""
    return b"data: " + error_body(502, code, message) + b"\n\ndata: [DONE]\n\n"


def sse_error_after(tail: bytes, code: str, message: str) -> bytes:
    """`sse_error_event`, first ending the event that `tail` (the stream's last bytes) may have left open."""
    sep = b"" if not tail or tail.endswith(b"\n\n") else (b"\n" if tail.endswith(b"\n") else b"\n\n")
    return sep + sse_error_event(code, message)


def upstream_failure_response(err: Exception, timed_out: bool) -> web.Response:
    """The answer when the upstream failed before any byte reached the client: 504 after a timeout, else 502."""
    code, status = ("upstream_timeout", 504) if timed_out else ("upstream_error", 502)
    return error_response(status, code, f"upstream failed: {err}")
