"""Shortcuts on the per-call path decide exactly as the plain statements they replace.

The two-replica test of the max-score picker, the table behind `full_match_blocks`, the KV need kept on
the context and `record_prediction`'s hit credit are each checked against the plain rule they stand
for, over random inputs that include exact ties and near-ties around the picker's 1e-9 margin.
"""

from __future__ import annotations

import math
import random

from pools.prefix_hash import MAX_BLOCKS
from pools.routing import RoutingState
from pools.routing.kv import call_kv, call_kv_bound, call_kv_expected
from pools.routing.pickers.max_score import MaxScorePicker
from pools.routing.reconcile import TOKENS_PER_BLOCK, record_prediction
from pools.routing.sampling import _COUNT, BLOCKS_FOR, full_match_blocks
from pools.types import ReplicaState
from predictor.types import Tags
from tests.unit.test_routing_helpers import call, warm


def reference_pick(state: RoutingState, candidates: list[ReplicaState], scores: list[float]) -> ReplicaState:
    """The max-score rule as first written: highest score, ties within 1e-9 rotate per pool."""
    best = max(scores)
    tied = [c for c, s in zip(candidates, scores, strict=True) if s >= best - 1e-9]
    if len(tied) == 1:
        return tied[0]
    n = state.round_robin.get(tied[0].pool, 0)
    state.round_robin[tied[0].pool] = n + 1
    return tied[n % len(tied)]


def test_max_score_pick_of_two_equals_the_plain_rule_on_ties_and_near_ties() -> None:
    rng = random.Random(3)
    picker = MaxScorePicker()
    ours, ref = RoutingState(), RoutingState()
    for _ in range(20_000):
        n = rng.choice((2, 2, 2, 3, 5))
        reps = [ReplicaState(f"http://r{i}", "p") for i in range(n)]
        base = rng.choice((0.0, 1.0, rng.uniform(-3, 12), -math.inf))
        scores = [base + rng.choice((0.0, 0.0, 5e-10, -5e-10, 1e-9, -1e-9, 2e-9, -2e-9, rng.uniform(-2, 2)))
                  for _ in range(n)]
        ctx = call(ours)
        assert picker.pick(ctx, reps, scores).url == reference_pick(ref, reps, scores).url, scores
    assert ours.round_robin == ref.round_robin and ours.round_robin


def test_full_match_blocks_table_equals_its_formula() -> None:
    for n in range(1, MAX_BLOCKS + 40):
        assert full_match_blocks(n) == BLOCKS_FOR[_COUNT[min(n, MAX_BLOCKS)]]


def test_kv_need_worked_out_once_equals_the_reference_formulas() -> None:
    rng = random.Random(8)
    for _ in range(500):
        mt = rng.choice((None, 1, 64, 5000))
        p = warm("w", output_tokens_bound=rng.choice((0, 1, 300, 9000)),
                 output_tokens_expected=rng.choice((0.0, 0.5, 120.4, 8000.0)))
        ctx = call(RoutingState(), "x" * rng.randrange(1, 5000), max_tokens=mt, prediction=p)
        want = (call_kv_bound(ctx), call_kv_expected(ctx))
        assert call_kv(ctx) == want and call_kv(ctx) == want and ctx.kv_need == want


def test_record_prediction_credits_hits_as_the_plain_min_max_rule() -> None:
    """Continuing a workflow's previous prompt on the same replica credits min(prompt, max(hit, previous
    prompt, reply end)); anything else min(prompt, matched blocks)."""
    rng = random.Random(11)
    state = RoutingState()
    replicas = [ReplicaState("http://a", "p"), ReplicaState("http://b", "p")]
    expected: dict[str, float] = {}
    tips: dict[str, tuple[str, int, int]] = {}
    for _ in range(3000):
        wf = rng.choice(("w1", "w2", "w3", ""))
        ctx = call(state, "q" * rng.randrange(1, 6000), prediction=warm(wf) if wf else None, tags=Tags())
        ctx.features.reply_end_tokens = rng.choice((0, 10, 700, 2000))
        chosen = rng.choice(replicas)
        ctx.prefix_match = {chosen.url: rng.randrange(0, 30)} if rng.random() < 0.8 else {}
        hashes = ctx.features.prefix_hashes
        if wf and hashes and rng.random() < 0.5:  # continue the workflow's previous prompt
            tips[wf] = state.workflow_tip[wf] = (chosen.url, len(hashes), hashes[-1]) if rng.random() < 0.8 \
                else (chosen.url, len(hashes) + 1, 0)
        hit_blocks = ctx.prefix_match.get(chosen.url, 0)
        hit = min(ctx.features.prompt_tokens, hit_blocks * TOKENS_PER_BLOCK)
        tip = tips.get(wf) if wf and hashes else None
        if tip is not None and tip[0] == chosen.url:
            n = tip[1]
            if n <= len(hashes) and hashes[n - 1] == tip[2] and hit_blocks >= full_match_blocks(n):
                hit = min(ctx.features.prompt_tokens, max(hit, n * TOKENS_PER_BLOCK, ctx.features.reply_end_tokens))
        if wf and hashes:
            tips[wf] = (chosen.url, len(hashes), hashes[-1])
        expected[chosen.url] = expected.get(chosen.url, 0.0) + hit
        record_prediction(ctx, chosen)
        assert state.workflow_tip == tips
    assert state.predicted_hit_tokens == expected
