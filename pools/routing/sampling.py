"""Which of a prompt's chained block hashes the routing index keeps: the first 8, then geometrically sparser.

A chained hash at position i stands for the whole prefix up to block i, so keeping a sample of
positions loses only resolution, never correctness: a match is reported at the last sampled
position both prompts share. Positions 0-7 are all kept, then each kept position is about 1.4x the
previous one (so a match is under-reported by at most ~30%), and a 512-block prompt costs 19 index
entries instead of 512. That keeps a decision's index work (match + insert) within the routing
budget of tens of microseconds, whatever the prompt length.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from operator import itemgetter

from pools.prefix_hash import MAX_BLOCKS


def _positions() -> tuple[int, ...]:
    out = list(range(8))
    x = 8.0
    while x < MAX_BLOCKS:
        out.append(int(x) - 1)
        x *= 1.4
    out.append(MAX_BLOCKS - 1)
    return tuple(sorted(set(out)))


POSITIONS: tuple[int, ...] = _positions()
# how many sampled positions lie below n, for every n
_COUNT: list[int] = [sum(1 for p in POSITIONS if p < n) for n in range(MAX_BLOCKS + 1)]
# BLOCKS_FOR[k]: leading blocks covered by the first k sampled positions
BLOCKS_FOR: list[int] = [0, *(p + 1 for p in POSITIONS)]
# _TAKE[k](hashes): the hashes at the first k sampled positions, as a tuple (one C call per prompt);
# only k >= 9 is ever asked for (shorter prompts are kept whole)
_TAKE: dict[int, Callable[[Sequence[int]], tuple[int, ...]]] = {
    k: itemgetter(*POSITIONS[:k]) for k in range(2, len(POSITIONS) + 1)
}
# index entries per block of KV, for a typical agent context of a few thousand to 20k tokens
ENTRIES_PER_BLOCK = 0.1


def sampled(hashes: Sequence[int]) -> tuple[int, ...]:
    """The hashes at the sampled positions."""
    n = len(hashes)
    if n <= 8:
        return tuple(hashes)
    return _TAKE[_COUNT[min(n, MAX_BLOCKS)]](hashes)


def blocks_for(samples_matched: int) -> int:
    """Leading blocks covered by the first `samples_matched` sampled positions."""
    return POSITIONS[samples_matched - 1] + 1 if samples_matched > 0 else 0


# FULL_MATCH_BLOCKS[n]: `full_match_blocks(n)` for every n up to MAX_BLOCKS (one list index per call)
FULL_MATCH_BLOCKS: list[int] = [BLOCKS_FOR[_COUNT[n]] for n in range(MAX_BLOCKS + 1)]


def full_match_blocks(n: int) -> int:
    """Leading blocks a match reports for a prompt of `n` blocks that the index holds in full."""
    return FULL_MATCH_BLOCKS[n if n < MAX_BLOCKS else MAX_BLOCKS]
