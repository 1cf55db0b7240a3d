"""Request traces (JSONL) into workflows: the Mooncake form and the workflow form of DESIGN.md.

Mooncake form: `timestamp` (ms), `input_length`, `output_length`, `hash_ids` (512-token blocks).
Each block id becomes a deterministic 512-token text (same id, same text), so shared ids are
shared prompt prefixes; each line is a one-call workflow sent at its timestamp.

Workflow form: `app`, `workflow`, `agent` (optional tags), `messages` or `prompt`,
`output_tokens`, and `timestamp_ms` (a call without a predecessor) or `after_ms` (sent that long
after the previous line of the same workflow completes), optional `parallel_group` (consecutive
lines of a workflow with the same group are one fan-out; the next line waits for all of them).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from loadgen.workflow import Call, Segment, Workflow

MOONCAKE_BLOCK_TOKENS = 512


class TraceError(ValueError):
    """A trace line is malformed; the message names the file and line number."""


def _num(row: dict[str, Any], key: str, where: str, integer: bool = False, minimum: float = 0) -> float:
    v = row.get(key)
    if isinstance(v, bool) or not isinstance(v, int | float) or (integer and not isinstance(v, int)):
        kind = "an integer" if integer else "a number"
        raise TraceError(f"{where}: '{key}' must be {kind}, got {v!r}")
    if not math.isfinite(v) or v < minimum:
        raise TraceError(f"{where}: '{key}' must be >= {minimum}, got {v!r}")
    return v


@dataclass(slots=True)
class _Pending:
    """A workflow being assembled from its lines, in file order."""

    wf: Workflow
    prev_step: tuple[int, ...] = ()  # calls the next non-sibling line waits on
    group: Any = None  # parallel_group of the last line
    group_deps: tuple[int, ...] = ()  # what the current group waits on
    group_members: list[int] = field(default_factory=list)
    group_id: int = 0  # id of the current fan-out (1, 2, ... per workflow)
    roots_abs_s: dict[int, float] = field(default_factory=dict)  # absolute start of calls without predecessors


def load_trace(
    path: str | Path,
    speed: float = 1.0,
    model: str = "",
    limit: int | None = None,
    tagged: bool = True,
) -> list[Workflow]:
    """All workflows of a trace file, arrivals sorted, times divided by `speed`; raises TraceError."""
    p = Path(path)
    try:
        fh = p.open("rb")
    except OSError as e:
        raise TraceError(f"cannot read trace {path}: {e.strerror}") from None
    with fh:
        return parse_trace(fh, str(path), speed=speed, model=model, limit=limit, tagged=tagged)


def parse_trace(
    lines: Iterable[bytes | str],
    source: str = "<trace>",
    speed: float = 1.0,
    model: str = "",
    limit: int | None = None,
    tagged: bool = True,
) -> list[Workflow]:
    """Workflows from trace lines (either form, mixed forms allowed); blank lines are skipped."""
    if speed <= 0:
        raise ValueError("speed must be > 0")
    pending: dict[str, _Pending] = {}
    order: list[_Pending] = []
    rows = 0
    for lineno, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        where = f"{source}:{lineno}"
        try:
            row = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            raise TraceError(f"{where}: not valid JSON ({e})") from None
        if not isinstance(row, dict):
            raise TraceError(f"{where}: expected a JSON object, got {type(row).__name__}")
        if "hash_ids" in row or "input_length" in row:
            wf = _mooncake(row, where, lineno, speed, model)
            order.append(_Pending(wf))
        else:
            _workflow_line(row, where, lineno, speed, model, tagged, pending, order)
        rows += 1
        if limit is not None and rows >= limit:
            break
    if not order:
        raise TraceError(f"{source}: the trace has no requests")
    out: list[Workflow] = []
    for pw in order:
        if pw.roots_abs_s:  # workflow form: arrival = earliest root; roots wait their offset from it
            start = min(pw.roots_abs_s.values())
            pw.wf.arrival_s = start
            for idx, t in pw.roots_abs_s.items():
                pw.wf.calls[idx].think_time_s = t - start
        out.append(pw.wf)
    out.sort(key=lambda w: w.arrival_s)  # stable: equal timestamps keep file order
    return out


def _mooncake(row: dict[str, Any], where: str, lineno: int, speed: float, model: str) -> Workflow:
    ts = _num(row, "timestamp", where)
    n_in = int(_num(row, "input_length", where, integer=True, minimum=1))
    n_out = int(_num(row, "output_length", where, integer=True, minimum=1))
    ids = row.get("hash_ids", [])
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise TraceError(f"{where}: 'hash_ids' must be a list of integers")
    segs: list[Segment] = []
    left = n_in
    for hid in ids:
        if left <= 0:
            break
        take = min(MOONCAKE_BLOCK_TOKENS, left)
        segs.append(Segment("user", "", f"mc:{hid}", take))  # a prefix of block `hid`'s full text
        left -= take
    if left > 0:  # more input than blocks: unique filler for the rest
        segs.append(Segment("user", "", f"mc-tail:{lineno}", left))
    wid = f"mooncake-{lineno:06d}"
    call = Call(workflow_id=wid, app="", index=0, role="", output_tokens=n_out, model=model,
                segments=tuple(segs), completion=True, tagged=False)
    return Workflow(wid, "", [call], ts / 1000.0 / speed, "mooncake")


def _workflow_line(
    row: dict[str, Any],
    where: str,
    lineno: int,
    speed: float,
    model: str,
    tagged: bool,
    pending: dict[str, _Pending],
    order: list[_Pending],
) -> None:
    for key in ("app", "workflow", "agent"):
        if key in row and not isinstance(row[key], str):
            raise TraceError(f"{where}: '{key}' must be a string")
    messages = row.get("messages")
    prompt = row.get("prompt")
    if messages is None and prompt is None:
        raise TraceError(f"{where}: a line needs 'messages' or 'prompt' (or the Mooncake fields)")
    if messages is not None:
        if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str | list)
            for m in messages
        ):
            raise TraceError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    elif not isinstance(prompt, str):
        raise TraceError(f"{where}: 'prompt' must be a string")
    n_out = int(_num(row, "output_tokens", where, integer=True, minimum=1))
    app = row.get("app", "")
    wid = row.get("workflow") or f"line-{lineno:06d}"
    group = row.get("parallel_group")
    pw = pending.get(wid)
    if pw is None:
        pw = pending[wid] = _Pending(Workflow(wid, app, [], 0.0, "trace"))
        order.append(pw)
    idx = len(pw.wf.calls)
    has_pred = idx > 0
    if group is not None and has_pred and group == pw.group:
        deps = pw.group_deps  # a sibling of the previous line: same predecessors
    else:
        deps = pw.prev_step if has_pred else ()
        if group is not None:
            pw.group_deps, pw.group_members = deps, []
            pw.group_id += 1
    if deps and "after_ms" in row:
        think = _num(row, "after_ms", where) / 1000.0 / speed
    elif "timestamp_ms" in row:
        deps = ()
        think = 0.0
        pw.roots_abs_s[idx] = _num(row, "timestamp_ms", where) / 1000.0 / speed
    elif deps:
        think = 0.0
    else:
        raise TraceError(f"{where}: the first call of workflow {wid!r} needs 'timestamp_ms'")
    call = Call(
        workflow_id=wid,
        app=app,
        index=idx,
        role=row.get("agent", ""),
        output_tokens=n_out,
        depends_on=tuple(deps),
        parallel_group=None if group is None else pw.group_id,
        think_time_s=think,
        session=row.get("workflow", ""),
        model=row.get("model", model) or model,
        literal_messages=messages,
        literal_prompt=prompt if messages is None else None,
        tagged=tagged and any(row.get(k) for k in ("app", "workflow", "agent")),
    )
    pw.wf.calls.append(call)
    if group is not None:
        pw.group_members.append(idx)
        pw.prev_step = tuple(pw.group_members)
    else:
        pw.prev_step = (idx,)
    pw.group = group
