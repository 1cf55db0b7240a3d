"""Chained block hashes of prompt text: equal prefixes give equal leading hashes.

The gateway has no tokenizer, so blocks are fixed-size runs of characters of the
flattened prompt. xxh3 with the previous hash as seed makes each hash depend on
the whole prefix (like vLLM's block hash chain) and is stable across processes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import xxhash

DEFAULT_BLOCK_CHARS = 256  # about 64 tokens at the 4-bytes-per-token estimate
MAX_BLOCKS = 512  # enough for ~128k characters; longer prompts are hashed up to here


def block_hashes(text: str, block_chars: int = DEFAULT_BLOCK_CHARS, max_blocks: int = MAX_BLOCKS) -> tuple[int, ...]:
    """Hashes of each full block of `text`, each seeded by the one before it."""
    data = text.encode("utf-8", "surrogatepass")
    n = min(len(data) // block_chars, max_blocks)
    out: list[int] = []
    h = 0
    digest = xxhash.xxh3_64_intdigest
    for i in range(n):
        h = digest(data[i * block_chars : (i + 1) * block_chars], seed=h)
        out.append(h)
    return tuple(out)


def flatten_messages(messages: Iterable[Mapping[str, Any]], min_chars: int = 0) -> str:
    """One string for a chat prompt, so that a conversation that grows keeps its prefix.

    `min_chars` > 0: stop after the message that makes it at least that long (a prefix of the whole)."""
    parts: list[str] = []
    n = 0
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):  # OpenAI content parts: keep the text ones
            content = "".join(p.get("text", "") for p in content if isinstance(p, Mapping))
        part = f"<|{m.get('role', '')}|>{content or ''}"
        parts.append(part)
        n += len(part)
        if min_chars and n >= min_chars:
            break
    return "".join(parts)


_FP_CACHE: dict[str, str] = {}
_FP_CACHE_MAX = 256  # texts remembered (then the cache starts over): a few system prompts come back call after call
_FP_CACHE_CHARS = 8192  # longer texts are hashed each time (bounded memory)


def text_fingerprint(text: str) -> str:
    """A short stable fingerprint of a text (hex), e.g. of a system prompt."""
    fp = _FP_CACHE.get(text)
    if fp is not None:
        return fp
    fp = xxhash.xxh3_64_hexdigest(text.encode("utf-8", "surrogatepass")) if text else ""
    if len(text) <= _FP_CACHE_CHARS:
        if len(_FP_CACHE) >= _FP_CACHE_MAX:
            _FP_CACHE.clear()
        _FP_CACHE[text] = fp
    return fp


def common_prefix_blocks(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading block hashes two chains share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
