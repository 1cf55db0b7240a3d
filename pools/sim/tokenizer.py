"""The engine's deterministic tokenizer: 4 UTF-8 bytes per token, and seeded generated text.

The rule is the gateway's estimate (pools/request_features.estimate_tokens), so token counts agree
and equal prompt prefixes give equal token prefixes. Token ids are the little-endian integer of
each 4-byte chunk; the last chunk may be shorter.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from typing import Any

BYTES_PER_TOKEN = 4

# Generated text is made of 4-byte ASCII tokens so that its token count is exact.
_WORDS = (
    "the ", "and ", "of  ", "to  ", "in  ", "is  ", "for ", "on  ", "with", " it ",
    "data", "mode", "plan", "code", "test", "step", "next", "call", "tool", "node",
    "path", "case", "file", "line", "item", "list", "task", "goal", "fact", "note",
    "then", "when", "from", "into", "each", "more", "less", "best", "fast", "safe",
    "run ", "fix ", "use ", "set ", "add ", "get ", "map ", "key ", "log ", "api ",
    ", ok", ". So", ". It", "; we", "\nThe", ": a ", " - x", "(1) ", "yes.", "done",
)  # fmt: skip
_WORD_IDS = tuple(int.from_bytes(w.encode("ascii"), "little") for w in _WORDS)


def flatten_messages(messages: Iterable[Mapping[str, Any]]) -> str:
    """One string for a chat prompt (same rule as pools/prefix_hash.flatten_messages)."""
    parts: list[str] = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):  # OpenAI content parts: keep the text ones
            content = "".join(p.get("text", "") for p in content if isinstance(p, Mapping))
        parts.append(f"<|{m.get('role', '')}|>{content or ''}")
    return "".join(parts)


def count_tokens(text: str) -> int:
    """Tokens of a text: its UTF-8 length over 4, rounded up."""
    return -(-len(text.encode("utf-8", "surrogatepass")) // BYTES_PER_TOKEN)


def tokenize(text: str) -> list[int]:
    """Token ids of a text: one id per 4-byte chunk of its UTF-8 encoding."""
    data = text.encode("utf-8", "surrogatepass")
    return [
        int.from_bytes(data[i : i + BYTES_PER_TOKEN], "little") for i in range(0, len(data), BYTES_PER_TOKEN)
    ]


def generated_token_ids(seed: int, n: int) -> list[int]:
    """The first n generated token ids of a request whose generation seed is `seed`."""
    rng = random.Random(seed)
    k = len(_WORD_IDS)
    return [_WORD_IDS[rng.randrange(k)] for _ in range(n)]


def detokenize(token_ids: Iterable[int]) -> str:
    """Text of generated token ids (each is 4 ASCII bytes)."""
    return b"".join(t.to_bytes(BYTES_PER_TOKEN, "little") for t in token_ids).decode("ascii", "replace")


class TextStream:
    """Generated text of one request, token by token, from its seed (cheap to extend)."""

    __slots__ = ("_rng",)

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed)

    def next_tokens(self, n: int) -> str:
        """The text of the next n generated tokens."""
        r = self._rng.randrange
        k = len(_WORDS)
        return "".join(_WORDS[r(k)] for _ in range(n))
