"""Repeated workflow calls through `pythia serve` on two real vLLM replicas: which policy keeps vLLM's prefix cache warm.

Three workflows, three calls each, interleaved; every call's prompt is the previous call's prompt
plus one more turn. Sticky (`session`) and cache-aware (`pythia`) routing send a workflow's calls
to the replica that holds its prefix; `round_robin` alternates them between the two replicas, so
the second call of each workflow finds nothing cached. Hits are read from vLLM's own counters.
"""

from __future__ import annotations

import json
import urllib.request
import uuid
from collections import defaultdict
from dataclasses import dataclass

import pytest

from tests.conftest import ProcessGroup
from tests.integration.conftest import start_gateway
from tests.real_vllm.conftest import MODEL, Replica, metric_sum, pool_of

pytestmark = [pytest.mark.real_vllm, pytest.mark.timeout(900)]

WORKFLOWS = 3
CALLS = 3


def _post(url: str, body: dict[str, object], headers: dict[str, str]) -> tuple[int, bytes, str]:
    """POST JSON; status, body and the replica the gateway chose (x-pythia-replica)."""
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json", **headers}
    )
    with urllib.request.urlopen(req, timeout=120) as r:
        return r.status, r.read(), r.headers.get("x-pythia-replica", "")


def _system_prompt(workflow: str) -> str:
    # ~600 tokens, unique to the workflow from its first token: nothing shared across workflows or runs
    facts = " ".join(f"Fact {k}: sample {k * 31 % 97} of series {k % 7} is stable." for k in range(45))
    return f"Workflow {workflow}. You are a careful research agent. {facts}"


def _messages(workflow: str, call: int) -> list[dict[str, str]]:
    msgs = [
        {"role": "system", "content": _system_prompt(workflow)},
        {"role": "user", "content": "Task: summarise the facts above."},
    ]
    for k in range(call):
        msgs.append({"role": "assistant", "content": f"Partial summary {k}: the series are stable."})
        msgs.append({"role": "user", "content": f"Step {k + 1}: now check series {k} again."})
    return msgs


@dataclass
class PolicyRun:
    hits: float  # prefix-cache hit tokens, from vLLM's counters
    cached: int  # cached prompt tokens vLLM reported in the calls' usage
    placed: dict[str, set[str]]  # workflow -> replicas its calls went to


def _run(policy: str, replicas: list[Replica], gateways: ProcessGroup) -> PolicyRun:
    gw = start_gateway(
        gateways, pool_of([r.url for r in replicas]), workers=1, policy=policy, routing_headers=True
    )
    hits0 = sum(metric_sum(r.url, "vllm:prefix_cache_hits_total") for r in replicas)
    run = uuid.uuid4().hex[:8]
    placed: dict[str, set[str]] = defaultdict(set)
    cached = 0
    for call in range(CALLS):
        for w in range(WORKFLOWS):
            wf = f"{policy}-{run}-{w}"
            headers = {"X-Pythia-App": "affinity", "X-Pythia-Workflow": wf, "X-Pythia-Agent": "researcher"}
            body = {"model": MODEL, "messages": _messages(wf, call), "max_tokens": 4, "temperature": 0}
            status, data, replica = _post(gw.url + "/v1/chat/completions", body, headers)
            assert status == 200, data
            placed[wf].add(replica)
            usage = json.loads(data)["usage"]
            cached += int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    gateways.close()
    hits = sum(metric_sum(r.url, "vllm:prefix_cache_hits_total") for r in replicas) - hits0
    return PolicyRun(hits, cached, dict(placed))


def test_affinity_and_pythia_keep_prefix_hits_that_round_robin_spreads_away(
    vllm_replicas: list[Replica], gateways: ProcessGroup
) -> None:
    results = {p: _run(p, vllm_replicas, gateways) for p in ("round_robin", "session", "pythia")}
    print("\nprefix-cache hit tokens by policy:", {p: r.hits for p, r in results.items()})
    rr, sess, py = (results[p].hits for p in ("round_robin", "session", "pythia"))
    assert sess > rr, results
    assert py > rr, results
    # sticky routing kept every workflow on one replica; round robin moved each one
    assert all(len(where) == 1 for where in results["session"].placed.values()), results
    assert all(len(where) == 2 for where in results["round_robin"].placed.values()), results
    # the hits vLLM counted were reused by the calls themselves (pythia may add pre-warm hits)
    for p in ("round_robin", "session"):
        assert results[p].cached == results[p].hits, results
