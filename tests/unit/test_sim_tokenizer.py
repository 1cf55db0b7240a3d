"""The engine's tokenizer agrees with the gateway's estimate and keeps prefixes."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from pools.prefix_hash import flatten_messages as gateway_flatten
from pools.request_features import estimate_tokens
from pools.sim import SimRequest, TextStream, count_tokens, flatten_messages, tokenize
from pools.sim.tokenizer import detokenize, generated_token_ids


@given(st.text(max_size=300))
def test_token_count_matches_the_gateway_estimate(text: str) -> None:
    assert count_tokens(text) == estimate_tokens(text) == len(tokenize(text))


@given(st.text(min_size=1, max_size=400), st.text(max_size=200), st.text(max_size=200))
def test_equal_prefixes_give_equal_block_hashes(prefix: str, a: str, b: str) -> None:
    ra, rb = SimRequest.from_text("a", prefix + a), SimRequest.from_text("b", prefix + b)
    ha, hb = ra.prompt_block_hashes(4), rb.prompt_block_hashes(4)
    shared = len(prefix.encode("utf-8", "surrogatepass")) // 16  # full 4-token blocks inside the prefix
    assert ha[:shared] == hb[:shared]


def test_flattening_matches_the_gateway() -> None:
    msgs: list[dict[str, Any]] = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image_url"}]},
        {"role": "assistant", "content": None},
    ]
    assert flatten_messages(msgs) == gateway_flatten(msgs)


def test_generated_text_is_deterministic_and_counts_exactly() -> None:
    s1, s2 = TextStream(42), TextStream(42)
    text = s1.next_tokens(10) + s1.next_tokens(5)
    assert text == s2.next_tokens(15)
    assert count_tokens(text) == 15
    assert detokenize(generated_token_ids(42, 15)) == text
    assert TextStream(43).next_tokens(15) != text


def test_synthetic_prompts_share_blocks_by_hash_id() -> None:
    a = SimRequest.synthetic("a", 1024, hash_ids=[1, 2])
    b = SimRequest.synthetic("b", 1024, hash_ids=[1, 3])
    ha, hb = a.prompt_block_hashes(16), b.prompt_block_hashes(16)
    assert ha[:32] == hb[:32] and ha[32] != hb[32]
