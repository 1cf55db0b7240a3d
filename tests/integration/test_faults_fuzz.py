"""Bad input fuzzed with hypothesis against a running gateway: every answer is an OpenAI-shaped 4xx
(or a normal answer when the input happens to be valid), and the gateway keeps serving.

Example counts are bounded so the module runs in a few seconds.
"""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import Proc, ProcessGroup
from tests.integration.conftest import start_fake_upstream, start_gateway

MODEL = "test-model"
BODY_LIMIT = 256 * 1024
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)

json_leaf = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
)
json_value = st.recursive(
    json_leaf, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)  # fmt: skip
FIELDS = ("model", "messages", "prompt", "max_tokens", "stream", "stream_options", "metadata", "extra_body",
          "priority", "n", "temperature", "max_completion_tokens", "ignore_eos")  # fmt: skip
# a plausible request with some fields replaced by values of any JSON type
request_body = st.dictionaries(st.sampled_from(FIELDS), json_value, min_size=1, max_size=4).map(
    lambda junk: {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **junk}
)
message = st.fixed_dictionaries({}, optional={"role": json_value, "content": json_value, "name": json_value})
header_text = st.text(
    st.characters(exclude_characters="\r\n\x00", exclude_categories=["Cs"]), max_size=300
)


@pytest.fixture(scope="module")
def gateway(module_procs: ProcessGroup) -> Iterator[Proc]:
    up = start_fake_upstream(module_procs, "a", MODEL)
    pools = [{"name": "p", "max_context_tokens": 8192, "models": [MODEL], "replicas": [up.url]}]
    yield start_gateway(module_procs, pools, workers=1, routing_headers=True, body_limit_bytes=BODY_LIMIT)


def post(
    gw: Proc, body: bytes, headers: dict[str, Any] | None = None, path: str = "/v1/chat/completions"
) -> tuple[int, bytes, http.client.HTTPMessage]:
    host, port = gw.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=20)
    try:
        conn.putrequest("POST", path, skip_accept_encoding=True)
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        conn.endheaders(body)
        r = conn.getresponse()
        return r.status, r.read(), r.headers
    finally:
        conn.close()


def check(status: int, body: bytes, headers: http.client.HTTPMessage) -> None:
    """A gateway answer to junk: an OpenAI error with a 4xx status, or a relayed upstream answer."""
    if "x-pythia-replica" in headers:  # accepted and forwarded: whatever the upstream said, relayed
        assert status < 500 or body, status
        return
    assert 400 <= status < 500, (status, body[:300])
    err = orjson.loads(body)["error"]
    assert (
        isinstance(err["message"], str)
        and isinstance(err["code"], str)
        and err["type"] == "invalid_request_error"
    )


def still_serves(gw: Proc) -> None:
    status, body, _ = post(
        gw, orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": "ok?"}]})
    )
    assert status == 200 and orjson.loads(body)["choices"], body


@FUZZ
@given(raw=st.binary(max_size=2000))
def test_arbitrary_bytes(gateway: Proc, raw: bytes) -> None:
    check(*post(gateway, raw))


@FUZZ
@given(body=request_body, path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
def test_wrong_types_in_known_fields(gateway: Proc, body: dict[str, Any], path: str) -> None:
    check(*post(gateway, json.dumps(body).encode(), path=path))


@FUZZ
@given(messages=st.lists(message, max_size=4) | json_value)
def test_malformed_messages(gateway: Proc, messages: Any) -> None:
    check(*post(gateway, json.dumps({"model": MODEL, "messages": messages}).encode()))


@FUZZ
@given(
    name=st.sampled_from(["X-Pythia-App", "X-Pythia-Workflow", "X-Pythia-Agent", "X-Pythia-Session"]),
    value=header_text | st.binary(max_size=300).filter(lambda b: not set(b) & {0, 10, 13}),
    body_tags=st.dictionaries(
        st.sampled_from(["app", "workflow", "agent", "session", "pythia_app"]), json_value
    ),
)
def test_forged_and_oversized_tags(
    gateway: Proc, name: str, value: str | bytes, body_tags: dict[str, Any]
) -> None:
    value = value.encode("utf-8") if isinstance(value, str) else value
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "metadata": body_tags}
    check(*post(gateway, json.dumps(body).encode(), {name: value}))


def test_structural_extremes(gateway: Proc) -> None:
    cases = [
        b"[" * 100_000 + b"]" * 100_000,  # nesting far deeper than any parser's limit
        b'{"model": "'
        + MODEL.encode()
        + b'", "messages": '
        + b'[{"content": ' * 2000
        + b"1"
        + b"}]" * 2000
        + b"}",
        b'{"model": "test-model", "messages": [{"role": "user", "content": "\xff\xfe\xc0\xaf"}]}',  # invalid UTF-8
        b'{"model": "test-model", "messages": [{"role": "user", "content": "\\ud800"}]}',  # lone surrogate
        b'{"model": "test-model", "messages": [{"role": "user", "content": "hi"}]' + b" " * 10 + b",",
        b'{"model": "test-model", "max_tokens": 1e400, "messages": [{"role": "user", "content": "hi"}]}',
        b'{"model": "test-model", "max_tokens": -5, "messages": [{"role": "user", "content": "hi"}]}',
        b'{"model": "nope", "messages": [{"role": "user", "content": "hi"}]}',
        b"",
        b"null",
    ]
    for raw in cases:
        check(*post(gateway, raw))
    huge = (
        b'{"model": "test-model", "messages": [{"role": "user", "content": "'
        + b"a" * (BODY_LIMIT + 10)
        + b'"}]}'
    )
    status, body, headers = post(gateway, huge)
    assert status == 413 and orjson.loads(body)["error"]["code"] == "request_too_large"
    long_tag = {"X-Pythia-App": "a" * 5000}
    status, body, headers = post(gateway, orjson.dumps({"model": MODEL, "messages": []}), long_tag)
    check(status, body, headers)
    still_serves(gateway)


def raw_exchange(gw: Proc, data: bytes) -> tuple[int, bytes, str]:
    """Send raw bytes, read the answer until the gateway closes: (status, body, content type)."""
    host, port = gw.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(data)
        buf = b""
        while chunk := s.recv(65536):
            buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    ctype = next((v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:]) if k.lower() == "content-type"), "")
    return int(lines[0].split()[1]), body, ctype


def test_malformed_http_gets_openai_errors_on_every_path(gateway: Proc) -> None:
    flood = b"".join(b"X-Junk-%d: v\r\n" % i for i in range(300))
    cases = [
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + flood + b"\r\n",  # more header lines than aiohttp takes
        b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",  # request line too long
        b"GET /health HTTP/1.1\r\nHost: x\r\nBad Header Without Colon\r\n\r\n",
    ]
    for raw in cases:
        status, body, ctype = raw_exchange(gateway, raw)
        assert 400 <= status < 500 and ctype.startswith("application/json"), (status, ctype, body[:200])
        err = orjson.loads(body)["error"]
        assert err["type"] == "invalid_request_error" and err["code"] and err["message"]
    still_serves(gateway)


def test_gateway_unaffected_after_fuzzing(gateway: Proc) -> None:
    still_serves(gateway)
    assert gateway.alive()
    assert "Traceback" not in gateway.log_text(), gateway.log_text()[-3000:]

