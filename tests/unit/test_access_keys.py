"""Access control without sockets: key checks, admin key, local token buckets, payload text extraction."""

from __future__ import annotations

import orjson
import pytest

from gateway.access import Access, completion_text, key_id, parse_keys, prompt_text
from gateway.ratelimit import LocalBuckets, RateLimiter, retry_after_header
from gateway.settings import Settings


def make(**kw: object) -> Access:
    return Access(Settings(**kw))  # type: ignore[arg-type]


def test_keys_are_recognised_only_as_bearer_tokens() -> None:
    a = make(api_keys="sk-one, sk-two\nsk-three")
    assert parse_keys("a, b  c\n") == ["a", "b", "c"]
    assert a.identify("Bearer sk-two") == key_id("sk-two")
    assert a.identify("bearer   sk-three ") == key_id("sk-three")
    for bad in (
        None,
        "",
        "Bearer",
        "Bearer sk-on",
        "Bearer sk-one2",
        "Basic sk-one",
        "sk-one",
        "Bearer SK-ONE",
    ):
        assert a.identify(bad) is None, bad
    assert a.needs_key and not a.has_admin_key


def test_admin_key_is_separate_from_api_keys() -> None:
    a = make(api_keys="sk-user", admin_api_key="sk-admin")
    assert a.is_admin("Bearer sk-admin")
    assert not a.is_admin("Bearer sk-user")
    assert a.identify("Bearer sk-admin") is None
    assert not make().is_admin("Bearer anything")


def test_key_id_does_not_reveal_the_key() -> None:
    kid = key_id("sk-secret-value")
    assert "secret" not in kid and kid.startswith("k_") and len(kid) == 18
    assert kid != key_id("sk-secret-valuf")


def test_settings_repr_hides_keys() -> None:
    s = Settings(api_keys="sk-hidden-1", admin_api_key="sk-hidden-2")  # type: ignore[call-arg,arg-type]
    assert "sk-hidden" not in repr(s) and "sk-hidden" not in str(s.model_dump())


def test_local_bucket_limits_requests_and_refills_over_a_minute() -> None:
    now = [0.0]
    b = LocalBuckets(rpm=3, tpm=0, clock=lambda: now[0])
    assert [b.take("k", 0).allowed for _ in range(4)] == [True, True, True, False]
    denied = b.take("k", 0)
    assert denied.limit == "requests" and denied.retry_after_s == pytest.approx(20.0)
    assert b.take("other", 0).allowed  # buckets are per key
    now[0] = 20.0  # one request's worth refilled
    assert b.take("k", 0).allowed and not b.take("k", 0).allowed


def test_local_bucket_limits_tokens_and_clamps_a_huge_call() -> None:
    now = [0.0]
    b = LocalBuckets(rpm=0, tpm=1000, clock=lambda: now[0])
    assert b.take("k", 600).allowed
    v = b.take("k", 600)
    assert not v.allowed and v.limit == "tokens" and v.retry_after_s == pytest.approx(12.0)
    now[0] = 60.0
    assert b.take("k", 5000).allowed  # larger than the whole minute: allowed once the bucket is full
    assert not b.take("k", 1).allowed


async def test_limiter_without_redis_is_local_and_off_when_unset() -> None:
    assert not RateLimiter(0, 0).enabled
    r = RateLimiter(1, 0)
    assert (await r.take("k", 0)).allowed
    v = await r.take("k", 0)
    assert not v.allowed and not v.shared
    assert retry_after_header(0.2) == "1" and retry_after_header(59.1) == "60"


async def test_limiter_with_unreachable_redis_decides_locally() -> None:
    r = RateLimiter(2, 0, redis_url="redis://127.0.0.1:1/0", timeout_s=0.2)
    got = [await r.take("k", 0) for _ in range(3)]
    assert [v.allowed for v in got] == [True, True, False]
    assert not any(v.shared for v in got)
    await r.close()


def test_prompt_and_completion_text() -> None:
    chat = {"messages": [{"role": "system", "content": "be brief"},
                         {"role": "user", "content": [{"type": "text", "text": "hi there"}]}]}  # fmt: skip
    assert prompt_text(orjson.dumps(chat)) == "be brief\nhi there"
    assert prompt_text(orjson.dumps({"prompt": "once upon"})) == "once upon"
    assert prompt_text(b"\xff not json") == ""
    answer = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "hello!"}}]}
    assert completion_text(orjson.dumps(answer)) == "hello!"
    sse = (
        b"".join(
            b"data: " + orjson.dumps({"choices": [{"index": 0, "delta": {"content": w}}]}) + b"\n\n"
            for w in ("a", "b")
        )
        + b'data: {"choices":[{"index":0,"text":"c"}]}\n\ndata: [DONE]\n\n'
    )
    assert completion_text(sse) == "abc"
    assert completion_text(b"data: {broken\n\n") == ""
