"""Turn one parsed OpenAI request body into `RequestFeatures` (pure; shared by gateway and simulator)."""

from __future__ import annotations

from typing import Any

from pools.prefix_hash import DEFAULT_BLOCK_CHARS, block_hashes, flatten_messages, text_fingerprint
from predictor.types import RequestFeatures

BYTES_PER_TOKEN = 4  # the simulated engine's tokenizer rule; a fair estimate for English with BPE


class InvalidRequest(ValueError):
    """The body is not a valid completion request; the message is safe to show the client."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def estimate_tokens(text: str) -> int:
    """Tokens of a text under the 4-bytes-per-token rule (rounded up)."""
    n = len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))  # ASCII: no copy
    return -(-n // BYTES_PER_TOKEN)


def prompt_text(body: dict[str, Any], chat: bool) -> tuple[str, str]:
    """The flattened prompt and the system prompt of a request body; raises InvalidRequest."""
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise InvalidRequest("'messages' must be a non-empty array", "messages")
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise InvalidRequest("each message must be an object with a string 'role'", "messages")
            c = m.get("content")
            if c is not None and not isinstance(c, str | list):
                raise InvalidRequest("message 'content' must be a string or an array", "messages")
        system = ""
        first = messages[0]
        if first.get("role") in ("system", "developer") and isinstance(first.get("content"), str):
            system = first["content"]
        return flatten_messages(messages), system
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        if not all(isinstance(p, str) for p in prompt):
            raise InvalidRequest("'prompt' must be a string or an array of strings", "prompt")
        prompt = "".join(prompt)
    if not isinstance(prompt, str):
        raise InvalidRequest("'prompt' must be a string or an array of strings", "prompt")
    return prompt, ""


def extract_features(
    body: dict[str, Any], chat: bool, now: float = 0.0, block_chars: int = DEFAULT_BLOCK_CHARS
) -> RequestFeatures:
    """Validate the fields routing needs and compute the request's features."""
    model = body.get("model", "")
    if not isinstance(model, str):
        raise InvalidRequest("'model' must be a string", "model")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1):
        raise InvalidRequest("'max_tokens' must be a positive integer", "max_tokens")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise InvalidRequest("'stream' must be a boolean", "stream")
    priority = body.get("priority")
    if priority is not None and (not isinstance(priority, int) or isinstance(priority, bool)):
        raise InvalidRequest("'priority' must be an integer", "priority")
    text, system = prompt_text(body, chat)
    prompt_tokens = estimate_tokens(text)
    return RequestFeatures(
        model=model,
        prompt_tokens=prompt_tokens,
        max_tokens=max_tokens,
        stream=stream,
        system_fingerprint=text_fingerprint(system),
        prefix_hashes=block_hashes(text, block_chars),
        system_prompt=system,
        priority=priority,
        arrival_s=now,
        reply_end_tokens=reply_end_tokens(body["messages"], prompt_tokens) if chat else 0,
    )


def reply_end_tokens(messages: list[dict[str, Any]], prompt_tokens: int) -> int:
    """Where the last assistant message ends in the flattened prompt, in tokens (0 when there is none)."""
    tail = 0  # characters after it (as `flatten_messages` writes them)
    for m in messages[::-1]:  # (mypyc 2.4 cannot compile reversed() over this list)
        if m.get("role") == "assistant":
            return max(0, prompt_tokens - -(-tail // BYTES_PER_TOKEN))
        content = m.get("content")
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        tail += len(m.get("role", "")) + 4 + len(content or "")
    return 0
