"""Deterministic prompt text of an exact token length, keyed by a string.

Every token is one 4-byte ASCII word ("abc "), so `n` tokens are exactly `4 * n`
bytes and the gateway's and the simulated engine's 4-bytes-per-token rule counts
them exactly (pools/request_features.py). Equal keys give equal text, so content
shared between calls (a role's system prompt, a predecessor's output, a trace's
hash block) becomes a shared prompt prefix that engines can cache.

Text is built from a fixed pool of 64-token chunks chosen by hashing (key, index):
fast enough to synthesise millions of tokens a second, and identical on every machine.
"""

from __future__ import annotations

import functools
import random

import xxhash

TOKEN_BYTES = 4
CHUNK_TOKENS = 64
_POOL_SIZE = 4096
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _build_pool() -> tuple[str, ...]:
    rng = random.Random(0x5EED)  # fixed: the pool is part of the on-the-wire format
    words = ["".join(rng.choice(_LETTERS) for _ in range(3)) + " " for _ in range(2048)]
    return tuple("".join(rng.choice(words) for _ in range(CHUNK_TOKENS)) for _ in range(_POOL_SIZE))


_POOL = _build_pool()


@functools.lru_cache(maxsize=8192)
def synth_text(key: str, tokens: int) -> str:
    """`tokens` tokens (4 bytes each) of deterministic text for `key`."""
    if tokens <= 0:
        return ""
    full, rest = divmod(tokens, CHUNK_TOKENS)
    seed = xxhash.xxh3_64_intdigest(key.encode())
    digest = xxhash.xxh3_64_intdigest
    parts = [_POOL[digest(i.to_bytes(4, "little"), seed=seed) % _POOL_SIZE] for i in range(full + (rest > 0))]
    if rest:
        parts[-1] = parts[-1][: rest * TOKEN_BYTES]
    return "".join(parts)


def labelled_text(label: str, key: str, tokens: int) -> str:
    """`label` followed by filler up to `tokens` tokens in total (the label is padded to whole tokens)."""
    head = label.rstrip() + " "
    pad = (-len(head.encode())) % TOKEN_BYTES
    head += " " * pad
    head_tokens = len(head.encode()) // TOKEN_BYTES
    if head_tokens >= tokens:
        return head
    return head + synth_text(key, tokens - head_tokens)


def count_tokens(text: str) -> int:
    """Tokens of `text` under the 4-bytes-per-token rule (rounded up)."""
    return -(-len(text.encode("utf-8", "surrogatepass")) // TOKEN_BYTES)

