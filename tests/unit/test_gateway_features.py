"""Predictor inputs the gateway adds: messages, linking hashes for untagged calls, output fingerprints."""

from __future__ import annotations

import orjson

from gateway.features import add_predictor_inputs, answer_fingerprint, stream_fingerprint, wants_linking
from pools.prefix_hash import block_hashes, flatten_messages
from pools.request_features import extract_features
from predictor.fingerprint import message_fingerprints, output_fingerprint
from predictor.live import CONTENT_BLOCKS
from predictor.types import Tags

TASK = "Find the three largest rivers of Europe and compare their lengths. " * 10
BODY = {
    "model": "m",
    "messages": [{"role": "system", "content": "You are a searcher."}, {"role": "user", "content": TASK}],
}


def test_untagged_calls_get_linking_inputs_and_tagged_ones_do_not() -> None:
    f = extract_features(BODY, True)
    add_predictor_inputs(f, BODY, wants_linking(Tags()))
    assert f.messages[1] is BODY["messages"][1]  # by reference
    assert f.content_hashes == block_hashes(flatten_messages(BODY["messages"][1:]))
    # a long conversation: the leading blocks the predictor links by, the same as hashing all of it
    long_body = {**BODY, "messages": [*BODY["messages"], {"role": "assistant", "content": "é" * 3000}, *BODY["messages"][1:] * 3]}
    h = extract_features(long_body, True)
    add_predictor_inputs(h, long_body, True)
    whole = block_hashes(flatten_messages([m for m in long_body["messages"] if m["role"] != "system"]))
    assert len(whole) > 20 and h.content_hashes == whole[:CONTENT_BLOCKS]
    assert f.message_fingerprints == message_fingerprints(BODY["messages"])
    g = extract_features(BODY, True)
    add_predictor_inputs(g, BODY, wants_linking(Tags(app="a", workflow="wf-1")))
    assert g.messages and not g.content_hashes and not g.message_fingerprints


def test_output_fingerprint_of_a_plain_answer_matches_the_quoted_message() -> None:
    text = "The Volga is the longest river in Europe at about 3,530 km, followed by the Danube."
    chat = orjson.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]})
    assert answer_fingerprint(chat, True) == output_fingerprint(text) != ""
    cmpl = orjson.dumps({"choices": [{"text": text}]})
    assert answer_fingerprint(cmpl, False) == output_fingerprint(text)
    assert answer_fingerprint(b"not json", True) == ""


def test_output_fingerprint_of_a_stream_joins_the_deltas() -> None:
    words = [f"word{i} " for i in range(80)]
    events = [{"choices": [{"delta": {"role": "assistant", "content": ""}}]}] + [
        {"choices": [{"delta": {"content": w}}]} for w in words
    ]
    sse = b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events) + b"data: [DONE]\n\n"
    assert stream_fingerprint(sse, True) == output_fingerprint("".join(words))
    # only the first bytes kept: still the first FINGERPRINT_CHARS characters, a cut event is ignored
    assert stream_fingerprint(sse[: len(sse) // 2 + 7], True) == output_fingerprint("".join(words))
