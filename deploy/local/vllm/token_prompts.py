"""Prompts as token ids, so a real engine sees exactly the lengths and shared blocks a trace asks for.

Same rule as the simulated engine's `SimRequest.synthetic`: token p of a prompt belongs to hash
block p // block_tokens; inside the trace's hash ids its id depends only on (hash id, offset), so
equal hash ids give equal token blocks; past them the tokens are unique to the request.
"""

from __future__ import annotations

import xxhash

# Ordinary vocabulary ids of SmolLM2 (49152 ids; the first few hundred are special/byte tokens).
_LOW, _SPAN = 1000, 40000


def _token(key: bytes) -> int:
    return _LOW + xxhash.xxh3_64_intdigest(key) % _SPAN


def block_token(hash_id: int, offset: int, salt: str = "") -> int:
    """The token at `offset` inside the block of `hash_id` (the same in every prompt of one salt)."""
    return _token(b"b%s:%d:%d" % (salt.encode(), hash_id, offset))


def prompt_token_ids(
    request_id: str, prompt_tokens: int, hash_ids: list[int], block_tokens: int, salt: str = ""
) -> list[int]:
    """Token ids of a prompt of `prompt_tokens` tokens whose leading blocks are `hash_ids`.

    A new `salt` gives new blocks, so a second run finds nothing cached by the first.
    """
    out: list[int] = []
    nonce = (salt + request_id).encode()
    for p in range(prompt_tokens):
        b = p // block_tokens
        if b < len(hash_ids):
            out.append(block_token(hash_ids[b], p % block_tokens, salt))
        else:
            out.append(_token(b"u" + nonce + b":%d" % p))
    return out


def unique_token_ids(nonce: str, n: int) -> list[int]:
    """n tokens no other prompt shares (a cold prefill)."""
    return [_token(b"n" + nonce.encode() + b":%d" % i) for i in range(n)]
