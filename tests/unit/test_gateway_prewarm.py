"""The pre-warm sender: bounded background sends, used and wasted warms counted on /metrics."""

from __future__ import annotations

import orjson

from gateway.prediction import ColdPredictor
from gateway.prewarm import PrewarmSender
from gateway.proxy import Gateway
from gateway.settings import Settings
from pools.prefix_hash import block_hashes
from pools.request_features import extract_features
from pools.routing import PrewarmAction, RoutingContext
from pools.types import PoolConfig
from predictor.types import Prediction, Tags

URLS = ("http://h:1", "http://h:2")
TEXT = "the task text of this workflow " * 100


def sender() -> tuple[Gateway, PrewarmSender, list[tuple[str, dict[str, object]]]]:
    gw = Gateway(Settings(policy="pythia"), [PoolConfig("short", 16384, ("m",), URLS)], ColdPredictor())
    sent: list[tuple[str, dict[str, object]]] = []

    async def call_replica(url: str, path: str, body: bytes, timeout_s: float | None = None) -> tuple[int, bytes]:
        sent.append((url, orjson.loads(body)))
        return 200, b"{}"

    gw.call_replica = call_replica  # type: ignore[method-assign]
    pw = PrewarmSender(gw)
    pw.install()
    return gw, pw, sent


def count(gw: Gateway, outcome: str) -> float:
    return float(gw.metrics.registry.get_sample_value("pythia_prewarm_total", {"outcome": outcome}) or 0.0)


def action(url: str) -> PrewarmAction:
    msgs = ({"role": "system", "content": "reviewer"}, {"role": "user", "content": TEXT})
    from pools.prefix_hash import flatten_messages

    return PrewarmAction(url, msgs, "m", block_hashes(flatten_messages(msgs)), "wf")


async def test_a_warm_is_a_one_token_prefill_and_a_later_call_there_uses_it() -> None:
    gw, pw, sent = sender()
    a = action(URLS[1])
    assert await pw.send(a)
    url, body = sent[0]
    assert url == URLS[1] and body["max_tokens"] == 1 and body["messages"] == list(a.messages)
    f = extract_features({"model": "m", "messages": [*a.messages, {"role": "assistant", "content": "ok"}]}, True, 0.0)
    ctx = RoutingContext(f, Tags(), Prediction(), 0.0, gw.routing_state)
    pw.observe_call(ctx, gw.replicas[URLS[1]])
    assert count(gw, "sent") == 1 and count(gw, "used") == 1


async def test_unused_warms_are_counted_wasted_and_a_full_queue_drops() -> None:
    gw, pw, _ = sender()
    pw.ledger.ttl_s = 0.0
    assert await pw.send(action(URLS[0]))
    pw.ledger.expire(1e12)
    pw._sync_counts()
    assert count(gw, "wasted") == 1
    pw.submit((action(URLS[0]),))  # not started: nowhere to queue it
    assert count(gw, "dropped") == 1
    await pw.start()
    try:
        pw.submit(tuple(action(URLS[0]) for _ in range(200)))
        assert count(gw, "dropped") > 1  # beyond the bounded queue
    finally:
        await pw.stop()
