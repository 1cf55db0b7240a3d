"""Request validation mirrors vLLM's OpenAI server: unknown fields ignored, bad types rejected."""

from __future__ import annotations

import pytest

from pools.sim.api_request import ApiError, ParsedRequest, parse_request

MODEL = "llama-3.1-8b"


def parse(body: object, chat: bool = True, priority: bool = False) -> ParsedRequest:
    return parse_request(body, chat, "id1", MODEL, priority)


def test_chat_request_becomes_a_sim_request() -> None:
    p = parse({"model": MODEL, "messages": [{"role": "user", "content": "hi there"}], "max_tokens": 9,
               "ignore_eos": True, "min_tokens": 2, "stream": True, "stream_options": {"include_usage": True},
               "seed": 3, "some_unknown_field": {"x": 1}})  # fmt: skip
    assert p.stream and p.include_usage
    assert p.sim.max_tokens == 9 and p.sim.ignore_eos and p.sim.min_tokens == 2 and p.sim.seed == 3
    assert p.sim.prompt_tokens == len(b"<|user|>hi there") // 4


def test_completion_defaults_to_16_tokens_like_openai() -> None:
    p = parse({"prompt": ["abcd"]}, chat=False)
    assert p.sim.max_tokens == 16 and p.sim.prompt_tokens == 1 and p.model == MODEL
    with pytest.raises(ApiError, match="batched"):
        parse({"prompt": ["ab", "cd"]}, chat=False)
    with pytest.raises(ApiError):
        parse({"prompt": [1, 2, 3]}, chat=False)  # token ids: not supported, rejected as a bad type


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": "5"}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "x"}], "stream": "yes"}, "stream"),
        ({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, "temperature"),
        ({"messages": "hello"}, "messages"),
        ({"messages": [{"content": "no role"}]}, "messages"),
        ({"messages": [{"role": "user", "content": "x"}], "priority": 1.5}, "priority"),
        ({}, "messages"),
        (
            {"messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": True}},
            "stream_options",
        ),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 5, "min_tokens": 6}, "min_tokens"),
    ],
)
def test_invalid_types_are_400(body: dict, param: str) -> None:
    with pytest.raises(ApiError) as e:
        parse(body)
    assert e.value.status == 400 and e.value.param == param
    assert set(e.value.body()["error"]) >= {"message", "type", "code"}


def test_unknown_model_is_404() -> None:
    with pytest.raises(ApiError) as e:
        parse({"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]})
    assert e.value.status == 404


def test_priority_needs_the_priority_policy_like_vllm() -> None:
    body = {"messages": [{"role": "user", "content": "x"}], "priority": 3}
    with pytest.raises(ApiError, match="Priority scheduling is not enabled"):
        parse(body)
    assert parse(body, priority=True).sim.priority == 3
    assert parse({**body, "priority": 0}).sim.priority == 0
