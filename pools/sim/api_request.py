"""Validate an OpenAI completion request body the way vLLM's server does, into a SimRequest.

Unknown fields are ignored (vLLM logs a warning); known fields of the wrong type give a 400.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from pools.sim.request import ASSISTANT_PREFIX, SimRequest
from pools.sim.tokenizer import flatten_messages

log = logging.getLogger("pythia.sim")


class ApiError(Exception):
    """An error for the client, OpenAI-shaped."""

    def __init__(
        self, status: int, message: str, type_: str = "BadRequestError", param: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param

    def body(self) -> dict[str, Any]:
        return {
            "error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}
        }


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


# field -> (check, what it must be); None values are always accepted (OpenAI clients send nulls)
_COMMON: dict[str, tuple[Any, str]] = {
    "model": (lambda v: isinstance(v, str), "a string"),
    "max_tokens": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "min_tokens": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "stream": (lambda v: isinstance(v, bool), "a boolean"),
    "stream_options": (lambda v: isinstance(v, dict), "an object"),
    "ignore_eos": (lambda v: isinstance(v, bool), "a boolean"),
    "priority": (_is_int, "an integer"),
    "seed": (_is_int, "an integer"),
    "n": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "temperature": (lambda v: _is_num(v) and v >= 0, "a number >= 0"),
    "top_p": (lambda v: _is_num(v) and 0 < v <= 1, "a number in (0, 1]"),
    "top_k": (_is_int, "an integer"),
    "min_p": (_is_num, "a number"),
    "presence_penalty": (_is_num, "a number"),
    "frequency_penalty": (_is_num, "a number"),
    "repetition_penalty": (_is_num, "a number"),
    "stop": (
        lambda v: isinstance(v, str) or (isinstance(v, list) and all(isinstance(s, str) for s in v)),
        "a string or an array of strings",
    ),
    "user": (lambda v: isinstance(v, str), "a string"),
    "logit_bias": (lambda v: isinstance(v, dict), "an object"),
    "metadata": (lambda v: isinstance(v, dict), "an object"),
    "request_id": (lambda v: isinstance(v, str), "a string"),
}
_CHAT = {
    **_COMMON,
    "messages": (lambda v: isinstance(v, list) and len(v) > 0, "a non-empty array"),
    "max_completion_tokens": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "logprobs": (lambda v: isinstance(v, bool), "a boolean"),
    "top_logprobs": (_is_int, "an integer"),
    "tools": (lambda v: isinstance(v, list), "an array"),
    "tool_choice": (lambda v: isinstance(v, str | dict), "a string or an object"),
    "response_format": (lambda v: isinstance(v, dict), "an object"),
    "parallel_tool_calls": (lambda v: isinstance(v, bool), "a boolean"),
    "chat_template_kwargs": (lambda v: isinstance(v, dict), "an object"),
    "add_generation_prompt": (lambda v: isinstance(v, bool), "a boolean"),
}
_COMPLETION = {
    **_COMMON,
    "prompt": (
        lambda v: isinstance(v, str) or (isinstance(v, list) and all(isinstance(s, str) for s in v)),
        "a string or an array of strings",
    ),
    "logprobs": (lambda v: _is_int(v), "an integer"),
    "echo": (lambda v: isinstance(v, bool), "a boolean"),
    "suffix": (lambda v: isinstance(v, str), "a string"),
    "best_of": (lambda v: _is_int(v), "an integer"),
}


@dataclass(slots=True)
class ParsedRequest:
    """A validated request: what the engine runs plus how to answer."""

    sim: SimRequest
    model: str
    stream: bool
    include_usage: bool


def parse_request(
    body: Any, chat: bool, request_id: str, served_model: str, priority_enabled: bool
) -> ParsedRequest:
    """Validate `body` like vLLM's OpenAI server; raises ApiError (400/404)."""
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object")
    spec = _CHAT if chat else _COMPLETION
    unknown = [k for k in body if k not in spec]
    if unknown:
        log.warning("The following fields were present in the request but ignored: %s", set(unknown))
    for key, (check, what) in spec.items():
        v = body.get(key)
        if v is not None and not check(v):
            raise ApiError(400, f"'{key}' must be {what}", param=key)
    model = body.get("model") or served_model
    if model != served_model:
        raise ApiError(404, f"The model `{model}` does not exist.", "NotFoundError", "model")
    if body.get("n") not in (None, 1):
        raise ApiError(400, "n > 1 is not supported by the simulated engine", param="n")
    if chat:
        for m in body.get("messages") or []:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise ApiError(400, "each message must be an object with a string 'role'", param="messages")
            c = m.get("content")
            if c is not None and not isinstance(c, str | list):
                raise ApiError(400, "message 'content' must be a string or an array", param="messages")
        if body.get("messages") is None:
            raise ApiError(400, "'messages' is required", param="messages")
        text = flatten_messages(body["messages"])
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    else:
        prompt = body.get("prompt")
        if prompt is None:
            raise ApiError(400, "'prompt' is required", param="prompt")
        if isinstance(prompt, list):  # vLLM treats a list as a batch of prompts: support a batch of one
            if len(prompt) != 1:
                raise ApiError(
                    400, "batched prompts are not supported by the simulated engine", param="prompt"
                )
            prompt = prompt[0]
        text = prompt
        max_tokens = body.get("max_tokens")
        if max_tokens is None:
            max_tokens = 16  # OpenAI's and vLLM's default for /v1/completions
    if not text:
        raise ApiError(400, "The prompt is empty", param="messages" if chat else "prompt")
    priority = body.get("priority") or 0
    if priority != 0 and not priority_enabled:
        raise ApiError(
            400, f"Got priority {priority} but Priority scheduling is not enabled.", param="priority"
        )
    if body.get("stream_options") is not None and not body.get("stream"):
        raise ApiError(400, "Stream options can only be defined when `stream=True`.", param="stream_options")
    min_tokens = body.get("min_tokens") or 0
    if max_tokens is not None and min_tokens > max_tokens:
        raise ApiError(400, f"min_tokens must be less than or equal to max_tokens={max_tokens}, got {min_tokens}.",
                       param="min_tokens")  # fmt: skip
    stream_options = body.get("stream_options") or {}
    include_usage = stream_options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise ApiError(400, "'stream_options.include_usage' must be a boolean", param="stream_options")
    sim = SimRequest.from_text(
        request_id,
        text,
        max_tokens=max_tokens,
        min_tokens=min_tokens,
        ignore_eos=bool(body.get("ignore_eos", False)),
        priority=priority,
        seed=body.get("seed"),
        generation_prefix=ASSISTANT_PREFIX if chat else b"",
    )
    return ParsedRequest(sim, model, bool(body.get("stream", False)), include_usage)
