"""OpenAI-shaped answers for requests aiohttp rejects before any handler runs.

Malformed HTTP (a header flood, an over-long line, a bad method) never reaches the app's handlers or
middlewares: aiohttp's protocol answers it itself, as plain text. Clients of an OpenAI-compatible API
parse `{"error": {...}}`, so the protocol's error answer is replaced by one.
"""

from __future__ import annotations

from http import HTTPStatus

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from gateway.errors import error_response


class OpenAIErrorRequestHandler(RequestHandler):
    """aiohttp's connection protocol, answering its own errors (400 parse errors, 500, 504) as OpenAI errors."""

    def handle_error(
        self, request: BaseRequest, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        if status >= 500:
            super().handle_error(request, status, exc, message)  # logs it, raises if an answer was already sent
            # never echo an exception's text (or a traceback in debug mode) to a client
            text, code = HTTPStatus(status).phrase, "internal_error" if status == 500 else "timeout"
        else:
            # a client's malformed request is not the gateway's error: no traceback in the log for it
            if request.writer.output_size > 0:
                raise ConnectionError("Response is sent already, cannot send another response with the error message")
            self.logger.debug("Bad HTTP request from %s: %s", request.remote, message)
            text, code = message or HTTPStatus(status).phrase, "invalid_http_request"
        resp = error_response(status, code, text)
        resp.force_close()  # the stream may be out of sync after a parse error: as aiohttp does, close it
        return resp


class OpenAIErrorServer(web.Server):
    """aiohttp's low-level server, making connections with `OpenAIErrorRequestHandler`."""

    def __call__(self) -> RequestHandler:
        return OpenAIErrorRequestHandler(self, loop=self._loop, **self._kwargs)


def use_openai_errors(server: web.Server) -> None:
    """Make an `AppRunner`'s server answer protocol-level errors as OpenAI errors (after `runner.setup()`)."""
    # web.Server has no hook for its protocol class; the subclass adds no state, only the factory
    server.__class__ = OpenAIErrorServer
