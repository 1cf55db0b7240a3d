"""Fingerprints of message texts, shared by whoever builds RequestFeatures/Outcome and the predictor.

An agent passes a response on to the next role as (the start of) a message; fingerprinting the first
characters of every message and of every response lets the predictor link an untagged call to the
workflow whose response it quotes, behind any system prompt and at any position in the prompt.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import xxhash

FINGERPRINT_CHARS = 256  # characters fingerprinted from the start of a text
MIN_CHARS = 64  # shorter texts ("Continue.") are too common to say which workflow they belong to


def output_fingerprint(text: str) -> str:
    """Fingerprint of a message or response text ("" when too short to be evidence)."""
    if len(text) < MIN_CHARS:
        return ""
    return xxhash.xxh3_64_hexdigest(text[:FINGERPRINT_CHARS].encode("utf-8", "surrogatepass"))


def message_fingerprints(messages: Iterable[Mapping[str, Any]]) -> tuple[str, ...]:
    """One fingerprint per non-system chat message (text parts joined), in order."""
    out: list[str] = []
    for m in messages:
        if m.get("role") in ("system", "developer"):
            continue
        content = m.get("content")
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, Mapping))
        out.append(output_fingerprint(content if isinstance(content, str) else ""))
    return tuple(out)
