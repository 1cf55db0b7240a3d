"""Property tests of the gateway's request parsing: any JSON yields features or a client error, never a crash."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.access import completion_text, parse_keys, prompt_text
from gateway.features import add_predictor_inputs
from gateway.tags import TagError, read_tags
from pools.request_features import InvalidRequest, extract_features

leaf = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=30)
value = st.recursive(
    leaf, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=16,
)  # fmt: skip
KEYS = ("model", "messages", "prompt", "max_tokens", "max_completion_tokens", "stream", "priority", "metadata",
        "extra_body", "stream_options", "content", "role", "app", "agent", "workflow", "session", "pythia_app")  # fmt: skip
body = st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), value, max_size=6)
messages = st.lists(
    st.dictionaries(st.sampled_from(("role", "content", "name", "text", "type")), value), max_size=4
)
tag_headers = st.dictionaries(
    st.sampled_from(("X-Pythia-App", "X-Pythia-Workflow", "X-Pythia-Agent", "X-Pythia-Session")),
    st.text(max_size=200),
)
FUZZ = settings(max_examples=60, deadline=None, derandomize=True)


def parse(headers: dict[str, str], b: dict[str, Any], chat: bool) -> None:
    try:
        tags, _ = read_tags(headers, b, 128)
        features = extract_features(b, chat, 0.0)
        add_predictor_inputs(features, b, True)
    except (TagError, InvalidRequest) as e:
        assert str(e)  # a message the client can read
        return
    assert features.prompt_tokens >= 0
    for t in (tags.app, tags.workflow, tags.agent, tags.session):
        assert t is None or len(t) <= 128


@FUZZ
@given(headers=tag_headers, b=body, chat=st.booleans())
def test_any_body_parses_or_is_a_client_error(headers: dict[str, str], b: dict[str, Any], chat: bool) -> None:
    parse(headers, b, chat)


@FUZZ
@given(msgs=messages | value, extra=body)
def test_any_messages_parse_or_are_a_client_error(msgs: Any, extra: dict[str, Any]) -> None:
    parse({}, {**extra, "model": "m", "messages": msgs}, True)


@FUZZ
@given(raw=st.binary(max_size=500) | value.map(lambda v: repr(v).encode()))
def test_payload_text_extraction_never_raises(raw: bytes) -> None:
    assert isinstance(prompt_text(raw), str)
    assert isinstance(completion_text(raw), str)
    assert isinstance(completion_text(b"data: " + raw + b"\n\n"), str)


@FUZZ
@given(text=st.text(max_size=200))
def test_key_list_parsing(text: str) -> None:
    keys = parse_keys(text)
    assert all(k and "," not in k and not any(c.isspace() for c in k) for k in keys)
