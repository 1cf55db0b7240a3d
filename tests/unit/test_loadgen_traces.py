"""Trace files become workflows; malformed lines fail with the file and line number."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from loadgen.traces import TraceError, load_trace, parse_trace
from pools.prefix_hash import common_prefix_blocks
from pools.request_features import extract_features

SAMPLE = Path(__file__).resolve().parents[2] / ".." / "shared" / "traces" / "mooncake_synthetic_trace.jsonl"


def lines(*rows: object) -> list[bytes]:
    return [orjson.dumps(r) for r in rows]


def test_mooncake_lines_share_prefixes_by_block_id() -> None:
    wfs = parse_trace(lines(
        {"timestamp": 0, "input_length": 1200, "output_length": 10, "hash_ids": [1, 2, 3]},
        {"timestamp": 500, "input_length": 1100, "output_length": 7, "hash_ids": [1, 2, 9]},
        {"timestamp": 250, "input_length": 600, "output_length": 5, "hash_ids": [4, 5]},
    ), speed=2.0)
    assert [w.arrival_s for w in wfs] == [0.0, 0.125, 0.25]  # sorted, ms -> s, halved by speed
    a, c, b = (w.calls[0] for w in wfs)
    assert (a.prompt_tokens, a.output_tokens, b.prompt_tokens, c.prompt_tokens) == (1200, 10, 1100, 600)
    assert not a.chat and a.body()["max_tokens"] == 10 and a.tags() == {}
    fa, fb = extract_features(a.body(), False), extract_features(b.body(), False)
    shared = common_prefix_blocks(fa.prefix_hashes, fb.prefix_hashes)
    assert shared == 1024 * 4 // 256  # exactly the two shared 512-token blocks
    assert fa.prompt_tokens == 1200


def test_workflow_form_dependencies_and_fanout() -> None:
    wfs = parse_trace(lines(
        {"app": "r", "workflow": "w1", "agent": "planner", "messages": [{"role": "user", "content": "plan"}],
         "output_tokens": 20, "timestamp_ms": 1000},
        {"app": "r", "workflow": "w1", "agent": "search", "prompt": "s1", "output_tokens": 5, "after_ms": 200,
         "parallel_group": 1},
        {"app": "r", "workflow": "w1", "agent": "search", "prompt": "s2", "output_tokens": 5, "after_ms": 100,
         "parallel_group": 1},
        {"app": "r", "workflow": "w1", "agent": "writer", "prompt": "w", "output_tokens": 9, "after_ms": 50},
        {"messages": [{"role": "user", "content": "hi"}], "output_tokens": 3, "timestamp_ms": 0},
    ))
    untagged, wf = wfs
    assert untagged.calls[0].tags() == {} and untagged.arrival_s == 0.0
    assert wf.arrival_s == 1.0 and wf.workflow_id == "w1"
    deps = [c.depends_on for c in wf.calls]
    assert deps == [(), (0,), (0,), (1, 2)]
    assert wf.calls[1].parallel_group == wf.calls[2].parallel_group is not None
    assert [c.think_time_s for c in wf.calls] == [0.0, 0.2, 0.1, 0.05]
    assert wf.calls[0].chat and not wf.calls[1].chat
    assert wf.calls[3].tags()["X-Pythia-Agent"] == "writer"


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "expected a JSON object"),
        (b'{"timestamp": 0, "input_length": "x", "output_length": 1}', "'input_length' must be an integer"),
        (b'{"timestamp": 0, "input_length": 5, "output_length": 0}', "'output_length' must be >= 1"),
        (b'{"timestamp": 0, "input_length": 5, "output_length": 1, "hash_ids": "a"}', "'hash_ids' must be a list"),
        (b'{"workflow": "w", "output_tokens": 3, "timestamp_ms": 0}', "needs 'messages' or 'prompt'"),
        (b'{"workflow": "w", "prompt": "x", "output_tokens": 3}', "needs 'timestamp_ms'"),
        (b'{"prompt": "x", "output_tokens": 3, "timestamp_ms": -5}', "'timestamp_ms' must be >= 0"),
        (b'{"messages": [{"content": "x"}], "output_tokens": 3, "timestamp_ms": 0}', "'messages' must be"),
    ],
)
def test_bad_line_names_file_and_line(row: bytes, message: str) -> None:
    good = orjson.dumps({"timestamp": 0, "input_length": 10, "output_length": 2, "hash_ids": [0]})
    with pytest.raises(TraceError, match=r"t\.jsonl:3: ") as e:
        parse_trace([good, b"   ", row, good], source="t.jsonl")
    assert message in str(e.value)


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="cannot read trace"):
        load_trace(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(TraceError, match="no requests"):
        load_trace(tmp_path / "empty.jsonl")


@pytest.mark.skipif(not SAMPLE.exists(), reason="shared sample trace not present")
def test_shared_mooncake_sample_parses() -> None:
    wfs = load_trace(SAMPLE)
    assert len(wfs) == 3993
    assert wfs[-1].arrival_s == pytest.approx(1022.025)
    assert all(len(w.calls) == 1 and w.calls[0].output_tokens >= 1 for w in wfs)
    assert load_trace(SAMPLE, limit=10)[9].calls[0].prompt_tokens == wfs[9].calls[0].prompt_tokens
