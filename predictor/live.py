"""State of the workflows in flight: their steps so far, and the indexes that link untagged calls."""

from __future__ import annotations

import functools
from collections import OrderedDict
from dataclasses import dataclass, field
from itertools import islice
from typing import Any


@dataclass(slots=True)
class StepRec:
    """One step of a workflow: one or more parallel calls of the same role."""

    role: str
    k: int  # how many steps of this role the workflow has had, this one included
    started: float
    width: int = 0  # calls launched in this step
    observed: int = 0  # calls of this step whose outcome came back
    out_tokens: int = 0
    prompt_tokens: int = 0  # of its first call
    max_context: int = 0  # max prompt + output over its calls
    hashes: tuple[int, ...] = ()  # prompt block hashes of its first call


@dataclass(slots=True)
class LiveWorkflow:
    """One workflow in flight (tagged or linked)."""

    app: str
    wid: str
    created: float
    last_seen: float
    steps: list[StepRec] = field(default_factory=list)
    visits: dict[str, int] = field(default_factory=dict)  # role -> steps so far
    in_flight: int = 0
    last_hashes: tuple[int, ...] = ()  # block hashes of its latest prompt (what the next call continues)
    last_messages: tuple[dict[str, str], ...] = ()
    last_context: int = 0  # prompt + output of the latest finished call
    peak_context: int = 0
    out_tokens: int = 0
    indexed: list[int] = field(default_factory=list)  # block hashes this workflow holds in the link index
    content_indexed: list[int] = field(default_factory=list)  # ... and in the content index
    message_indexed: list[str] = field(default_factory=list)  # message/response fingerprints indexed
    local_only: bool = False  # an untagged workflow linked here: its id means nothing to other processes
    epoch: int = 0  # bumped when steps seen by another gateway process are merged in (step indexes move)
    remote_calls: int = 0  # calls in the latest state merged from another process

    @property
    def calls(self) -> int:
        """Calls of this workflow seen so far (by any process, as far as this one knows)."""
        n = 0
        for s in self.steps:  # a loop: no generator frame for the usual one or two steps
            n += s.width
        return n


DENSE = 8  # blocks indexed one by one right after the system prompt
STRIDE = 8  # then every STRIDE-th block (absolute position), so a long prompt costs few index entries
CONTENT_BLOCKS = 4  # leading blocks of a prompt's content (after its system message) that link untagged calls


@functools.lru_cache(maxsize=8192)
def _positions(n: int, skip: int) -> tuple[int, ...]:
    """Block positions of an n-block prompt that the link index uses (ascending; cached: two per call)."""
    dense = min(n, skip + DENSE)
    first = dense + (-dense) % STRIDE
    return (*range(skip, dense), *range(first, n, STRIDE))


class LiveTable:
    """Live workflows by (app, id), oldest-active first, plus a prefix-hash index for linking."""

    def __init__(self, max_workflows: int = 100_000) -> None:
        self.max_workflows = max_workflows
        self.flows: OrderedDict[tuple[str, str], LiveWorkflow] = OrderedDict()
        # app -> block hash -> workflow id whose latest prompt contains that block (chained, so position too)
        self.hash_index: dict[str, dict[int, str]] = {}
        # app -> block hash of prompt content after the system message -> workflow id
        self.content_index: dict[str, dict[int, str]] = {}
        # app -> fingerprint of a message or response of the workflow -> workflow id
        self.message_index: dict[str, dict[str, str]] = {}

    def get(self, app: str, wid: str) -> LiveWorkflow | None:
        """The live workflow, or None."""
        return self.flows.get((app, wid))

    def touch(self, wf: LiveWorkflow, now: float) -> None:
        """Mark activity: keeps the table ordered by last activity."""
        if now > wf.last_seen:  # max(last_seen, now)
            wf.last_seen = now
        self.flows.move_to_end((wf.app, wf.wid))

    def add(self, wf: LiveWorkflow) -> list[LiveWorkflow]:
        """Insert a workflow; returns workflows dropped to respect the size bound."""
        self.flows[(wf.app, wf.wid)] = wf
        dropped: list[LiveWorkflow] = []
        while len(self.flows) > self.max_workflows:
            _, old = self.flows.popitem(last=False)
            self._unindex(old)
            dropped.append(old)
        return dropped

    def remove(self, wf: LiveWorkflow) -> None:
        """Forget a workflow."""
        if self.flows.pop((wf.app, wf.wid), None) is not None:
            self._unindex(wf)

    def expired(self, now: float, idle_s: float, limit: int = 8) -> list[LiveWorkflow]:
        """Remove and return up to `limit` workflows idle for longer than `idle_s` with nothing in flight."""
        out: list[LiveWorkflow] = []
        flows = self.flows
        if not flows or next(iter(flows.values())).last_seen + idle_s > now:
            return out  # the least recently active one is not idle: nothing is (observe asks every call)
        for key in list(islice(iter(self.flows), limit * 4)):
            wf = self.flows[key]
            if wf.last_seen + idle_s > now:
                break  # ordered by activity: the rest are newer
            if wf.in_flight > 0 and wf.last_seen + 10 * idle_s > now:
                continue  # a call is still running; give it longer (its outcome may never come)
            del self.flows[key]
            self._unindex(wf)
            out.append(wf)
            if len(out) >= limit:
                break
        return out

    def set_prompt(self, wf: LiveWorkflow, hashes: tuple[int, ...], skip: int, max_indexed: int = 2048) -> None:
        """Index a prompt of the workflow for linking: later calls may continue any of its prompts
        (a coder retry continues the coder's prompt, not the tester's in between). Indexed: the
        first DENSE blocks after the system prompt (where task texts differ), then every STRIDE-th."""
        wf.last_hashes = hashes
        if not hashes:
            return
        idx = self.hash_index.get(wf.app)
        if idx is None:  # (not setdefault(app, {}): that builds an empty dict on every call)
            idx = self.hash_index[wf.app] = {}
        new = wf.indexed
        wid = wf.wid
        get = idx.get
        for i in _positions(len(hashes), skip):
            h = hashes[i]
            if get(h) != wid:
                idx[h] = wid
                new.append(h)
        if len(new) > max_indexed:  # a very long workflow: forget its oldest prompts
            old = new[: len(new) // 2]
            del new[: len(new) // 2]
            for h in old:
                if idx.get(h) == wid:
                    del idx[h]

    def set_content(self, wf: LiveWorkflow, hashes: tuple[int, ...], blocks: int = CONTENT_BLOCKS) -> None:
        """Index the first blocks of a prompt's content after its system message (its task text)."""
        idx = self.content_index.get(wf.app)
        if idx is None:  # (not setdefault(app, {}): that builds an empty dict on every call)
            idx = self.content_index[wf.app] = {}
        wid = wf.wid
        for h in hashes[:blocks]:
            if idx.get(h) != wid:
                idx[h] = wid
                wf.content_indexed.append(h)

    def longest_content(self, app: str, hashes: tuple[int, ...], blocks: int = CONTENT_BLOCKS) -> tuple[str, int]:
        """The live workflow whose prompts' content starts like this one's: (id, blocks shared) or ("", 0)."""
        idx = self.content_index.get(app)
        if not idx:
            return "", 0
        for i in range(min(len(hashes), blocks) - 1, -1, -1):
            wid = idx.get(hashes[i])
            if wid is not None:
                return wid, i + 1
        return "", 0

    def set_messages(self, wf: LiveWorkflow, fingerprints: tuple[str, ...] | list[str]) -> None:
        """Index fingerprints of the workflow's messages or responses (empty ones are skipped)."""
        idx = self.message_index.get(wf.app)
        if idx is None:  # (not setdefault(app, {}): that builds an empty dict on every call)
            idx = self.message_index[wf.app] = {}
        wid = wf.wid
        for fp in fingerprints:
            if fp and idx.get(fp) != wid:
                idx[fp] = wid
                wf.message_indexed.append(fp)

    def find_message(self, app: str, fingerprints: tuple[str, ...]) -> str:
        """The live workflow one of whose messages or responses this call quotes (latest message first)."""
        idx = self.message_index.get(app)
        if not idx:
            return ""
        for fp in reversed(fingerprints):
            if fp:
                wid = idx.get(fp)
                if wid is not None:
                    return wid
        return ""

    def _unindex(self, wf: LiveWorkflow) -> None:
        for index, keys in ((self.hash_index, wf.indexed), (self.content_index, wf.content_indexed),
                            (self.message_index, wf.message_indexed)):
            idx: dict[Any, str] | None = index.get(wf.app)
            if idx:
                for h in keys:
                    if idx.get(h) == wf.wid:
                        del idx[h]
            keys.clear()

    def longest_prefix(self, app: str, hashes: tuple[int, ...], min_blocks: int) -> tuple[str, int]:
        """The live workflow whose prompts share the longest block prefix with `hashes` (to the
        indexing granularity). Returns (workflow id, blocks shared) or ("", 0); matches of fewer than
        `min_blocks` (the role's fixed system prompt, which every workflow shares) do not count.
        """
        idx = self.hash_index.get(app)
        if not idx:
            return "", 0
        skip = min_blocks - 1 if min_blocks > 1 else 0  # max(min_blocks - 1, 0)
        for i in reversed(_positions(len(hashes), skip)):
            wid = idx.get(hashes[i])
            if wid is not None:
                return wid, i + 1
        return "", 0

    def recent(self, app: str, limit: int) -> list[LiveWorkflow]:
        """Up to `limit` of the most recently active workflows of `app`, newest first."""
        out: list[LiveWorkflow] = []
        for key in islice(reversed(self.flows), limit * 8):  # bounded scan: other apps may dominate
            if key[0] == app:
                out.append(self.flows[key])
                if len(out) >= limit:
                    break
        return out
