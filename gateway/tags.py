"""Read who sent a call: X-Pythia-* headers first, then `metadata` / `extra_body` body fields.

Our fields are removed from the body before forwarding (vLLM does not know them);
the caller re-serializes the body only when `strip_body_tags` reports a change.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from predictor.types import Tags

TAG_NAMES = ("app", "workflow", "agent", "session")
HEADER_NAMES = {name: f"X-Pythia-{name.capitalize()}" for name in TAG_NAMES}
# body keys we accept for each tag, inside `metadata` or `extra_body` (or `extra_body.metadata`)
BODY_KEYS = {name: (name, f"pythia_{name}") for name in TAG_NAMES}
_ALL_BODY_KEYS = frozenset(k for keys in BODY_KEYS.values() for k in keys)
# printable, no quotes/backslashes/control characters: safe in logs, metric labels and Redis keys
_TAG_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._:@/+=~#-]*")


class TagError(ValueError):
    """A tag is not a string, too long, or has characters we refuse; safe to show the client."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def _check(name: str, value: Any, max_len: int, where: str) -> str:
    if not isinstance(value, str):
        raise TagError(f"tag '{name}' in {where} must be a string", name)
    if len(value) > max_len:
        raise TagError(f"tag '{name}' in {where} is longer than {max_len} characters", name)
    if value and _TAG_RE.fullmatch(value) is None:
        raise TagError(
            f"tag '{name}' in {where} may contain only letters, digits, space and ._:@/+=~#- "
            "and must start with a letter or digit",
            name,
        )
    return value


def _pop_tags(container: dict[str, Any], found: dict[str, str], max_len: int, where: str) -> bool:
    """Move our keys out of `container` into `found` (first value wins); True when any was removed."""
    if not _ALL_BODY_KEYS.intersection(container):
        return False
    for name, keys in BODY_KEYS.items():
        for key in keys:
            if key in container:
                value = _check(name, container.pop(key), max_len, where)
                if value and name not in found:
                    found[name] = value
    return True


def strip_body_tags(body: dict[str, Any], max_len: int = 128) -> tuple[dict[str, str], bool]:
    """Tags found in the body's `metadata` / `extra_body`, removed from it; (tags, body_changed)."""
    found: dict[str, str] = {}
    changed = False
    for field in ("metadata", "extra_body"):
        container = body.get(field)
        if not isinstance(container, dict):
            continue
        here = _pop_tags(container, found, max_len, field)
        inner = container.get("metadata") if field == "extra_body" else None
        if isinstance(inner, dict) and _pop_tags(inner, found, max_len, "extra_body.metadata"):
            here = True
            if not inner:
                del container["metadata"]
        if here:
            changed = True
            if not container:  # leave no empty object we created by removing our keys
                del body[field]
    return found, changed


def read_tags(headers: Mapping[str, str], body: dict[str, Any], max_len: int = 128) -> tuple[Tags, bool]:
    """Tags for one call (headers win over body fields) and whether the body was changed."""
    from_body, changed = strip_body_tags(body, max_len)
    values: dict[str, str] = {}
    for name in TAG_NAMES:
        h = headers.get(HEADER_NAMES[name])
        if h is not None and h != "":
            values[name] = _check(name, h, max_len, "header " + HEADER_NAMES[name])
        elif name in from_body:
            values[name] = from_body[name]
    if not values:
        return _EMPTY, changed
    return Tags(**values), changed


_EMPTY = Tags()
