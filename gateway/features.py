"""Optional predictor inputs the gateway fills beyond `extract_features` (see predictor/README.md).

`messages` is free (a reference). The linking inputs cost hashing, and only untagged calls need
them (a tagged call already names its workflow), so they are computed for those alone. The
response-side fingerprint is taken from the first bytes of the answer after it was relayed, so
it never delays a byte to the client.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from pools.prefix_hash import DEFAULT_BLOCK_CHARS, block_hashes, flatten_messages
from predictor.fingerprint import FINGERPRINT_CHARS, message_fingerprints, output_fingerprint
from predictor.live import CONTENT_BLOCKS
from predictor.types import RequestFeatures, Tags

KEEP_STREAM_BYTES = 16384  # enough SSE events to hold FINGERPRINT_CHARS characters of output
_USAGE_RE = re.compile(rb'"usage"\s*:\s*(\{(?:[^{}]|\{[^{}]*\})*\})')


def wants_linking(tags: Tags) -> bool:
    """True when the predictor must link this call to a workflow itself (no workflow or session tag)."""
    return not (tags.workflow or tags.session)


def add_predictor_inputs(features: RequestFeatures, body: dict[str, Any], link: bool) -> None:
    """Fill `messages` always, and `content_hashes` / `message_fingerprints` when the call is untagged."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        return
    features.messages = tuple(messages)
    if link:
        content = [m for m in messages if m.get("role") not in ("system", "developer")]
        # the predictor links by the first CONTENT_BLOCKS blocks only: hash no more of a long prompt
        # (a character is at least a byte, so that many characters hold that many blocks)
        text = flatten_messages(content, CONTENT_BLOCKS * DEFAULT_BLOCK_CHARS)
        features.content_hashes = block_hashes(text, DEFAULT_BLOCK_CHARS, CONTENT_BLOCKS)
        features.message_fingerprints = message_fingerprints(messages)


def _choice_text(obj: Any, chat: bool) -> str:
    if not isinstance(obj, dict):
        return ""
    choices = obj.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return ""
    c = choices[0]
    part = (c.get("message") or c.get("delta") or {}) if chat else c
    text = part.get("content") if chat and isinstance(part, dict) else part.get("text")
    return text if isinstance(text, str) else ""


def answer_usage_and_fingerprint(data: bytes, chat: bool) -> tuple[dict[str, Any] | None, str]:
    """A non-streamed answer's `usage` object (None when absent or not an object) and its text's fingerprint.

    One parse for both: untagged calls need the fingerprint, and then the usage comes for free.
    """
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None, ""
    usage = obj.get("usage") if isinstance(obj, dict) else None
    return (usage if isinstance(usage, dict) else None), output_fingerprint(_choice_text(obj, chat))


def answer_fingerprint(data: bytes, chat: bool) -> str:
    """Fingerprint of the first characters of a non-streamed answer's text ("" when unreadable)."""
    try:
        return output_fingerprint(_choice_text(orjson.loads(data), chat))
    except orjson.JSONDecodeError:
        return ""


def stream_fingerprint(head: bytes, chat: bool) -> str:
    """Fingerprint of the text the first SSE events of a stream carry (`head` = its first bytes)."""
    parts: list[str] = []
    n = 0
    for event in head.split(b"\n\n"):
        if not event.startswith(b"data: {"):
            continue
        try:
            text = _choice_text(orjson.loads(event[6:]), chat)
        except orjson.JSONDecodeError:
            break  # cut at the end of `head`
        parts.append(text)
        n += len(text)
        if n >= FINGERPRINT_CHARS:
            break
    return output_fingerprint("".join(parts))


def find_usage(data: bytes) -> dict[str, Any] | None:
    """The last non-null `usage` object in a JSON body or SSE tail, parsed; None when absent."""
    i = data.rfind(b'"usage"')
    while i >= 0:
        m = _USAGE_RE.match(data, i)
        if m is not None:
            try:
                u = orjson.loads(m.group(1))
            except orjson.JSONDecodeError:
                return None
            return u if isinstance(u, dict) else None
        i = data.rfind(b'"usage"', 0, i)
    return None
