"""Tags: headers win over body fields, our fields leave the body, bad tags are refused."""

from __future__ import annotations

import pytest

from gateway.tags import TagError, read_tags
from predictor.types import Tags


def test_headers_win_and_body_fields_are_stripped() -> None:
    body = {"model": "m", "metadata": {"app": "body-app", "agent": "coder", "user": "x"}}
    tags, changed = read_tags({"X-Pythia-App": "hdr-app", "X-Pythia-Session": "s1"}, body)
    assert tags == Tags(app="hdr-app", workflow="", agent="coder", session="s1")
    assert changed and body == {"model": "m", "metadata": {"user": "x"}}


def test_extra_body_and_prefixed_keys_and_empty_containers_removed() -> None:
    body = {"model": "m", "extra_body": {"metadata": {"pythia_workflow": "wf-1"}, "pythia_app": "a"}}
    tags, changed = read_tags({}, body)
    assert tags == Tags(app="a", workflow="wf-1")
    assert changed and body == {"model": "m"}


def test_untagged_body_is_unchanged() -> None:
    body = {"model": "m", "metadata": {"user": "x"}, "messages": []}
    tags, changed = read_tags({}, body)
    assert tags == Tags() and not changed and body["metadata"] == {"user": "x"}


@pytest.mark.parametrize(
    ("headers", "body"),
    [
        ({"X-Pythia-App": "a\nb"}, {}),
        ({"X-Pythia-Agent": 'x"y'}, {}),
        ({"X-Pythia-Workflow": "w" * 129}, {}),
        ({"X-Pythia-Session": " leading-space"}, {}),
        ({}, {"metadata": {"app": ["list"]}}),
        ({}, {"metadata": {"agent": "{bad}"}}),
    ],
)
def test_forged_or_oversized_tags_are_refused(headers: dict[str, str], body: dict[str, object]) -> None:
    with pytest.raises(TagError):
        read_tags(headers, body, max_len=128)


def test_ordinary_ids_are_accepted() -> None:
    tags, _ = read_tags(
        {"X-Pythia-Workflow": "3f1c2a9e-7b1d-4c1e-9f55-0d2c1a7e4b11", "X-Pythia-Agent": "web searcher"}, {}
    )
    assert tags.workflow.startswith("3f1c") and tags.agent == "web searcher"
