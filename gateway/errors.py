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
