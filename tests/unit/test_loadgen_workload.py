"""Workload templates expand into the workflow shapes they describe, deterministically."""

from __future__ import annotations

import itertools

import pytest

from loadgen.arrivals import arrival_times
from loadgen.dists import TemplateError
from loadgen.synth_text import count_tokens, synth_text
from loadgen.workload import (
    builtin_workloads,
    expand_one,
    expand_workload,
    generate,
    load_template,
    parse_template,
)
from pools.prefix_hash import common_prefix_blocks
from pools.request_features import extract_features


def test_builtins_are_listed() -> None:
    assert {"deep_research", "coding_agent", "chat", "mixed"} <= set(builtin_workloads())


def test_deep_research_shape() -> None:
    for wf in expand_workload("deep_research", 30, seed=7):
        roles = [c.role for c in wf.calls]
        n = roles.count("searcher")
        assert roles == ["planner"] + ["searcher"] * n + ["summariser", "writer"]
        assert 3 <= n <= 8
        searchers = wf.calls[1 : 1 + n]
        assert all(c.depends_on == (0,) and c.parallel_group == searchers[0].parallel_group for c in searchers)
        assert searchers[0].parallel_group is not None
        assert wf.calls[n + 1].depends_on == tuple(range(1, n + 1))  # summariser waits for every searcher
        assert wf.calls[n + 2].depends_on == (n + 1,)
        assert wf.calls[0].think_time_s == 0.0


def test_coding_agent_loops_and_context_grows() -> None:
    wfs = expand_workload("coding_agent", 200, seed=1)
    loops = [sum(c.role == "coder" for c in wf.calls) for wf in wfs]
    assert min(loops) == 1 and max(loops) > 2 and max(loops) <= 6
    for wf in wfs:
        roles = [c.role for c in wf.calls]
        assert roles[0] == "planner" and roles[-1] == "reviewer"
        assert roles[1:-1] == ["coder", "tester"] * ((len(roles) - 2) // 2)
        assert all(c.depends_on == (c.index - 1,) for c in wf.calls[1:])
        coders = [c for c in wf.calls if c.role == "coder"]
        assert all(b.prompt_tokens > a.prompt_tokens for a, b in itertools.pairwise(coders))


def test_chat_turns_extend_the_previous_prompt() -> None:
    wf = expand_workload("chat", 5, seed=3)[4]
    assert len(wf.calls) >= 2
    for prev, nxt in zip(wf.calls, wf.calls[1:], strict=False):
        a, b = prev.messages, nxt.messages
        assert b[: len(a)] == a  # the next turn resends the whole conversation
        assert b[len(a)]["role"] == "assistant"
        assert nxt.session == prev.session == wf.workflow_id


def test_same_role_shares_system_prompt_across_workflows() -> None:
    a, b = expand_workload("deep_research", 2, seed=0)
    fa = extract_features(a.calls[0].body(), True)
    fb = extract_features(b.calls[0].body(), True)
    assert fa.system_fingerprint == fb.system_fingerprint
    assert common_prefix_blocks(fa.prefix_hashes, fb.prefix_hashes) >= 900 * 4 // 256 - 1


def test_expansion_is_deterministic_and_prefix_stable() -> None:
    a = expand_workload("mixed", 40, seed=11)
    b = expand_workload("mixed", 10, seed=11)
    c = expand_workload("mixed", 10, seed=12)
    for x, y in zip(a[:10], b, strict=True):
        assert x.workflow_id == y.workflow_id and x.template == y.template
        assert [cl.body() for cl in x.calls] == [cl.body() for cl in y.calls]
    assert [w.template for w in b] != [w.template for w in c] or [len(w.calls) for w in b] != [len(w.calls) for w in c]
    assert len({w.template for w in a}) >= 3


def test_prompt_tokens_match_the_gateway_estimate() -> None:
    for wf in expand_workload("mixed", 10, seed=5):
        for call in wf.calls:
            assert extract_features(call.body(), True).prompt_tokens == call.prompt_tokens


def test_request_body_and_tags() -> None:
    call = expand_workload("chat", 1)[0].calls[0]
    body = call.body()
    assert body["max_tokens"] == call.output_tokens and body["ignore_eos"] is True and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert call.tags() == {
        "X-Pythia-App": "chat",
        "X-Pythia-Workflow": call.workflow_id,
        "X-Pythia-Agent": "assistant",
        "X-Pythia-Session": call.workflow_id,
    }


def test_synth_text_exact_lengths() -> None:
    for n in (0, 1, 63, 64, 65, 1000):
        t = synth_text("k", n)
        assert count_tokens(t) == n and len(t) == 4 * n and t.isascii()
    assert synth_text("a", 100) == synth_text("a", 100) != synth_text("b", 100)


def test_bad_templates_name_the_field() -> None:
    with pytest.raises(TemplateError, match=r"roles\.a\.context"):
        parse_template({"roles": {"a": {"prompt_tokens": 1, "output_tokens": 1, "context": "x"}}, "steps": ["a"]})
    with pytest.raises(TemplateError, match=r"steps\[0\].call: unknown role 'b'"):
        parse_template({"roles": {"a": {"prompt_tokens": 1, "output_tokens": 1}}, "steps": [{"call": "b"}]})
    with pytest.raises(TemplateError, match="retry_probability"):
        parse_template({"roles": {"a": {"prompt_tokens": 1, "output_tokens": 1}},
                        "steps": [{"loop": {"body": ["a"], "retry_probability": 2}}]})
    with pytest.raises(TemplateError, match="unknown workload"):
        load_template("nope")


def test_custom_template_file(tmp_path) -> None:
    p = tmp_path / "mine.yaml"
    p.write_text("roles:\n  r: {prompt_tokens: 10, output_tokens: {dist: uniform_int, min: 5, max: 6}}\n"
                 "steps: [{parallel: {role: r, count: 4}}, r]\n")
    wf = expand_one(load_template(str(p)), seed=0, index=0)
    assert [c.depends_on for c in wf.calls] == [(), (), (), (), (0, 1, 2, 3)]
    assert all(5 <= c.output_tokens <= 6 for c in wf.calls)


def test_arrivals() -> None:
    t = arrival_times("poisson", 10.0, n=2000, seed=1)
    assert t == sorted(t) and t[0] == 0.0 and 150 < t[-1] < 250
    assert arrival_times("poisson", 10.0, n=50, seed=1) == t[:50]
    d = arrival_times("bursty", 10.0, duration_s=200, seed=2)
    assert all(x % 20.0 < 5.0 for x in d) and 1000 < len(d) < 3000
    assert arrival_times("constant", 4.0, duration_s=1.0) == [0.0, 0.25, 0.5, 0.75]
    wfs = generate("chat", rate=5.0, duration_s=3.0, seed=0)
    assert [w.arrival_s for w in wfs] == arrival_times("poisson", 5.0, duration_s=3.0, seed=0)
