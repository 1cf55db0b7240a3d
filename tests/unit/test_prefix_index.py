"""The gateway's prefix index: matching leading blocks, LRU eviction."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pools.prefix_hash import block_hashes, common_prefix_blocks
from pools.prefix_index import PrefixIndex


def test_shared_prefix_gives_shared_leading_hashes() -> None:
    a = block_hashes("S" * 1024 + "first question" * 50, 256)
    b = block_hashes("S" * 1024 + "second question" * 50, 256)
    assert common_prefix_blocks(a, b) == 4
    assert a[4] != b[4]


def test_match_counts_leading_blocks_per_replica() -> None:
    idx = PrefixIndex()
    h = block_hashes("abcd" * 1000, 256)
    idx.insert("r1", h[:10])
    idx.insert("r2", h[:3])
    assert idx.match(h) == {"r1": 10, "r2": 3}
    assert idx.match(block_hashes("zzzz" * 1000, 256)) == {}


def test_lru_eviction_forgets_oldest_blocks() -> None:
    idx = PrefixIndex()
    idx.set_capacity("r", 4)
    old = block_hashes("o" * 256 * 4, 256)
    new = block_hashes("n" * 256 * 4, 256)
    idx.insert("r", old)
    idx.insert("r", new)
    assert idx.match(old) == {}
    assert idx.match(new) == {"r": 4}
    assert idx.size("r") == 4
    idx.forget("r")
    assert idx.match(new) == {}


@given(st.text(min_size=0, max_size=3000), st.text(min_size=0, max_size=600))
def test_extending_a_prompt_keeps_its_hashes(prefix: str, suffix: str) -> None:
    a = block_hashes(prefix, 64)
    b = block_hashes(prefix + suffix, 64)
    assert b[: len(a)] == a
