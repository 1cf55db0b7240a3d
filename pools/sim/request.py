"""Requests as the engine sees them, and the events and results it reports about them."""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import xxhash

from pools.sim.tokenizer import BYTES_PER_TOKEN, flatten_messages

_digest = xxhash.xxh3_64_intdigest
ASSISTANT_PREFIX = b"<|assistant|>"  # how flatten_messages renders the answer in the next turn
_pack3 = struct.Struct("<BQQ").pack
_MASK = (1 << 64) - 1


class EventKind(enum.Enum):
    """What happened to a request at an event's time."""

    FIRST_TOKEN = "first_token"
    TOKEN = "token"
    FINISHED = "finished"
    PREEMPTED = "preempted"


@dataclass(slots=True)
class RequestEvent:
    """One thing that happened to one request at virtual time `time`."""

    kind: EventKind
    request_id: str
    time: float
    cached_tokens: int = 0
    output_tokens: int = 0
    finish_reason: str | None = None


@dataclass(slots=True)
class RequestResult:
    """The life of one request in the engine (times in virtual seconds)."""

    request_id: str
    arrival_time: float
    prompt_tokens: int
    first_token_time: float | None = None
    finish_time: float | None = None
    cached_tokens: int = 0
    output_tokens: int = 0
    num_preemptions: int = 0
    finish_reason: str | None = None
    generation_seed: int = 0  # TextStream(generation_seed).next_tokens(output_tokens) is the answer

    @property
    def ttft(self) -> float | None:
        """Time to first token, or None before it."""
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def e2e(self) -> float | None:
        """Arrival to finish, or None before it."""
        return None if self.finish_time is None else self.finish_time - self.arrival_time


@dataclass(slots=True)
class SimRequest:
    """A completion request: its prompt (as text or as synthetic hash blocks) and sampling limits.

    Build with `from_text`, `from_messages` or `synthetic`. `max_tokens=None` means up to the
    model's context length, as in vLLM. `output_tokens` forces an exact output length (a trace
    replay knows it); otherwise `ignore_eos` gives `max_tokens` and a seeded draw decides.
    """

    request_id: str
    prompt_tokens: int
    max_tokens: int | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    priority: int = 0
    seed: int | None = None
    output_tokens: int | None = None
    # prompt content: UTF-8 bytes (text prompts) or synthetic hash ids (trace prompts)
    prompt_bytes: bytes | None = field(default=None, repr=False)
    hash_ids: tuple[int, ...] = field(default=(), repr=False)
    hash_block_tokens: int = 512
    # bytes the chat template puts between the prompt and the answer; the next turn's prompt
    # repeats them, so blocks holding prompt tail + answer can be prefix-cache hits
    generation_prefix: bytes = field(default=b"", repr=False)

    @classmethod
    def from_text(cls, request_id: str, text: str, **kw: Any) -> SimRequest:
        """A request whose prompt is `text` (4 UTF-8 bytes per token)."""
        data = text.encode("utf-8", "surrogatepass")
        return cls(request_id, -(-len(data) // BYTES_PER_TOKEN), prompt_bytes=data, **kw)

    @classmethod
    def from_messages(cls, request_id: str, messages: Iterable[Mapping[str, Any]], **kw: Any) -> SimRequest:
        """A chat request: messages flattened like the gateway's prefix hashing does."""
        kw.setdefault("generation_prefix", ASSISTANT_PREFIX)
        return cls.from_text(request_id, flatten_messages(messages), **kw)

    @classmethod
    def synthetic(
        cls,
        request_id: str,
        prompt_tokens: int,
        hash_ids: Sequence[int] = (),
        hash_block_tokens: int = 512,
        **kw: Any,
    ) -> SimRequest:
        """A prompt known only by length and block hash ids (Mooncake traces): equal ids, equal tokens."""
        return cls(
            request_id, prompt_tokens, hash_ids=tuple(hash_ids), hash_block_tokens=hash_block_tokens, **kw
        )

    def content_seed(self) -> int:
        """A stable 64-bit digest of the prompt content (seeds output length and text)."""
        if self.prompt_bytes is not None:
            return _digest(self.prompt_bytes)
        return _digest(repr((self.prompt_tokens, self.hash_ids, self.hash_block_tokens)).encode())

    def prompt_block_hashes(self, block_size: int) -> list[int]:
        """Chained hashes of the prompt's full blocks of `block_size` tokens (vLLM's block hash chain)."""
        n_full = self.prompt_tokens // block_size
        out: list[int] = []
        h = 0
        if self.prompt_bytes is not None:
            step = block_size * BYTES_PER_TOKEN
            data = self.prompt_bytes
            for i in range(n_full):
                h = _digest(data[i * step : (i + 1) * step], seed=h)
                out.append(h)
            return out
        hb = self.hash_block_tokens
        ids = self.hash_ids
        unique = _digest(self.request_id.encode())
        for i in range(n_full):
            a, b = i * block_size, (i + 1) * block_size - 1
            ia, ib = a // hb, b // hb
            if ib >= len(ids):  # past the trace's hashed blocks: content unique to this request
                key = _pack3(2, unique, i)
            elif ia == ib:  # the usual case: the block lies inside one hash block
                key = _pack3(1, ids[ia] & _MASK, a - ia * hb)
            else:
                key = repr((ids[ia : ib + 1], a - ia * hb)).encode()
            h = _digest(key, seed=h)
            out.append(h)
        return out
