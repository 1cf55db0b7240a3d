"""Pythia's mechanisms in the live gateway: `pythia serve` (policy pythia) in front of simulated vLLM engines.

Two pools: `short` (2 engines, 8k-token KV each) and `long` (1 engine, 10k-token KV, so few long calls
fit at once). The predictor learns two apps from a warm-up: `research` (plan -> search -> write ->
final, prompts growing from ~3k to ~9k tokens) and `chat` (draft -> review, ~2k tokens). Then:
saturated calls queue at the gateway and leave finishing workflows first; a workflow stays in the
pool its predicted peak chose; the next call's prefix is pre-warmed on a replica and reused there;
the autoscaling signal rises with in-flight workflows; untagged calls are linked into one workflow.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest

from tests.conftest import VENV_BIN, Proc, ProcessGroup, free_port
from tests.integration.conftest import start_gateway

MODEL = "llama-3.1-8b"
OUT = 16  # output tokens of every workflow call (ignore_eos: exactly this many)
ROLES = ("plan", "search", "write", "final")
# prompt characters (4 per token) each research role adds: ~3k, ~4.5k, ~6k, ~9k tokens in all
GROWTH = {"plan": 12_000, "search": 6_000, "write": 6_000, "final": 12_000}


@pytest.fixture(scope="module")
def cluster(module_procs: ProcessGroup) -> Iterator[Proc]:
    def engine(i: int, kv_gb: float) -> Proc:
        port = free_port()
        return module_procs.start(
            [str(VENV_BIN / "pythia"), "sim-engine", "--port", str(port), "--time-scale", "20", "--seed", str(i),
             "--scheduling-policy", "priority", "--kv-cache-gb", str(kv_gb)],
            name=f"sim-{i}", url=f"http://127.0.0.1:{port}", ready_path="/health",
        )  # fmt: skip

    short = [engine(0, 1.0), engine(1, 1.0)]
    long = [engine(2, 1.25)]
    pools = [
        {"name": "short", "max_context_tokens": 8192, "models": [MODEL], "replicas": [e.url for e in short]},
        {"name": "long", "max_context_tokens": 65536, "models": [MODEL], "replicas": [e.url for e in long]},
    ]
    yield start_gateway(
        module_procs, pools, workers=1, policy="pythia", routing_headers=True,
        predictor_options=json.dumps({"workflow_idle_s": 3.0, "tick_interval_s": 0.1, "min_workflows": 3}),
        metrics_scrape_interval_s=0.2, autoscale_interval_s=0.2, autoscale_output_tokens_per_s=50.0,
    )  # fmt: skip


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
        yield s


def text(seed: str, chars: int) -> str:
    words = [f"{seed}{i % 97}w{i}" for i in range(chars // 8 + 1)]
    return " ".join(words)[:chars]


def system(role: str) -> str:
    return f"You are the {role} agent of a research team. " + text(f"sys-{role}-", 1200)


def chat_system(role: str) -> str:
    """The chat app's system prompts are long (tool descriptions): ~1.5k tokens worth warming."""
    return f"You are the {role} of a writing desk. " + text(f"chat-{role}-", 6000)


async def chat(http: aiohttp.ClientSession, url: str, messages: list[dict[str, str]], tags: dict[str, str],
               max_tokens: int = OUT) -> tuple[int, dict[str, Any], dict[str, str]]:
    body = {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "ignore_eos": True}
    headers = {f"X-Pythia-{k.capitalize()}": v for k, v in tags.items()}
    async with http.post(url + "/v1/chat/completions", json=body, headers=headers) as r:
        return r.status, await r.json(content_type=None), dict(r.headers)


class Research:
    """One research workflow: each role's prompt = its system prompt + the task + every earlier note."""

    def __init__(self, wid: str) -> None:
        self.wid = wid
        self.notes = ""
        self.step = 0
        self.pools: list[str] = []

    def messages(self) -> list[dict[str, str]]:
        role = ROLES[self.step]
        self.notes += text(f"{self.wid}-{role}-", GROWTH[role])
        return [{"role": "system", "content": system(role)}, {"role": "user", "content": self.notes}]

    async def call(self, http: aiohttp.ClientSession, url: str) -> dict[str, Any]:
        role = ROLES[self.step]
        status, body, headers = await chat(http, url, self.messages(), {"app": "research", "workflow": self.wid,
                                                                        "agent": role})
        assert status == 200, body
        self.pools.append(headers["x-pythia-pool"])
        self.step += 1
        return body


async def metric(http: aiohttp.ClientSession, url: str, name: str, labels: str = "") -> float:
    async with http.get(url + "/metrics") as r:
        body = await r.text()
    pat = re.compile(rf"^{re.escape(name)}(?:\{{([^}}]*)\}})? (\S+)$", re.M)
    return sum(float(v) for lab, v in pat.findall(body) if labels in lab)


async def long_pool_idle(http: aiohttp.ClientSession, url: str, pool: str = "long") -> None:
    """Wait until the gateway sees the pool idle: a new workflow predicted to grow long then starts in
    the long pool (while it looks much busier than the short pool, Pythia starts it short and accepts a move)."""

    async def idle() -> bool:
        async with http.get(url + "/pythia/replicas") as r:
            view = await r.json()
        reps = next(p for p in view["pools"] if p["pool"] == pool)["replicas"]
        return all(x["inflight"] == 0 and x["kv_usage"] <= 0.01 for x in reps)

    assert await eventually(idle), f"the {pool} pool stayed busy"


async def eventually(probe: Any, timeout: float = 6.0) -> Any:
    """Poll an async probe until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        got = await probe()
        if got or time.monotonic() > deadline:
            return got
        await asyncio.sleep(0.1)


@pytest.fixture(scope="module")
def warm(cluster: Proc) -> Proc:
    """Teach the predictor both apps: four finished workflows each (min_workflows=3)."""

    async def run() -> None:
        async with aiohttp.ClientSession() as http:
            async def research(i: int) -> None:
                wf = Research(f"warm-r{i}")
                for _ in ROLES:
                    await wf.call(http, cluster.url)

            async def draft_review(i: int) -> None:
                task = [{"role": "user", "content": text(f"warm-c{i}-", 6000)}]
                tags = {"app": "chat", "workflow": f"warm-c{i}"}
                s, b, _ = await chat(http, cluster.url, [{"role": "system", "content": chat_system("draft")}, *task],
                                     {**tags, "agent": "draft"})
                assert s == 200, b
                answer = {"role": "assistant", "content": b["choices"][0]["message"]["content"]}
                s, b, _ = await chat(http, cluster.url,
                                     [{"role": "system", "content": chat_system("review")}, *task, answer],
                                     {**tags, "agent": "review"})
                assert s == 200, b

            for i in range(4):  # one after another: the long pool takes one ~9k-token call at a time
                await asyncio.gather(research(i), draft_review(i))
            await asyncio.sleep(3.2)  # idle workflows end (workflow_idle_s) and the models become warm

        async def is_warm() -> bool:
            async with aiohttp.ClientSession() as http:
                ok = True
                for app in ("research", "chat"):
                    async with http.get(f"{cluster.url}/pythia/apps/{app}/model") as r:
                        ok = ok and r.status == 200 and not (await r.json())["cold"]
                return ok

        assert await eventually(is_warm), "the predictor did not learn the apps"

    asyncio.run(run())
    return cluster


async def test_saturated_pool_queues_at_the_gateway_and_finishing_workflows_go_first(
    warm: Proc, http: aiohttp.ClientSession
) -> None:
    url = warm.url
    early = [Research(f"early-{i}") for i in range(3)]  # will wait at their 2nd step (2 steps remain after)
    late = [Research(f"late-{i}") for i in range(3)]  # will wait at their last step (none remain)
    for wf in early:
        await long_pool_idle(http, url)
        await wf.call(http, url)
    for wf in late:
        await long_pool_idle(http, url)
        for _ in range(3):
            await wf.call(http, url)
    queued_before = await metric(http, url, "pythia_admission_queued_total")
    # a cold call that fills the long engine's KV for a while (9k tokens: only the long pool holds it)
    blocker = asyncio.create_task(chat(http, url, [{"role": "user", "content": text("blocker", 30_000)}],
                                       {"app": "blocker", "workflow": "b"}, max_tokens=1500))
    await asyncio.sleep(0.15)
    finished: list[str] = []

    async def step(wf: Research) -> None:
        await wf.call(http, url)
        finished.append(wf.wid)

    tasks = [asyncio.create_task(step(wf)) for wf in early]  # queued first ...
    await asyncio.sleep(0.1)
    tasks += [asyncio.create_task(step(wf)) for wf in late]  # ... but these finish their workflows
    await asyncio.gather(*tasks)
    status, _, _ = await blocker
    assert status == 200
    assert await metric(http, url, "pythia_admission_queued_total") - queued_before >= 6  # all of them waited
    assert set(finished[:3]) == {wf.wid for wf in late}, finished  # shortest remaining work first
    assert set(finished[3:]) == {wf.wid for wf in early}
    # each workflow stayed in the pool its predicted peak chose, from its first (small) call on
    for wf in early + late:
        assert set(wf.pools) == {"long"}, (wf.wid, wf.pools)


async def test_the_next_calls_prefix_is_prewarmed_and_reused(warm: Proc, http: aiohttp.ClientSession) -> None:
    url = warm.url
    # a warm is sent only for a prefix no replica of the pool holds: let other traffic push the warm-up's
    # prompts out of both short engines (and out of the gateway's prefix index, which mirrors their LRU)
    for i in range(4):
        await long_pool_idle(http, url, "short")  # idle replicas tie, and ties rotate: two fillers each
        s, _, h = await chat(http, url, [{"role": "user", "content": text(f"filler{i}-", 28_000)}],
                             {"app": "filler", "workflow": f"filler-{i}"})
        assert s == 200 and h["x-pythia-pool"] == "short"
    await long_pool_idle(http, url, "short")
    sent_before = await metric(http, url, "pythia_prewarm_total", 'outcome="sent"')
    used_before = await metric(http, url, "pythia_prewarm_total", 'outcome="used"')
    task = [{"role": "user", "content": text("fresh-chat-", 6000)}]
    tags = {"app": "chat", "workflow": "fresh-chat"}
    s, b, h1 = await chat(http, url, [{"role": "system", "content": chat_system("draft")}, *task],
                          {**tags, "agent": "draft"})
    assert s == 200 and h1["x-pythia-pool"] == "short"

    async def warmed() -> bool:
        return await metric(http, url, "pythia_prewarm_total", 'outcome="sent"') > sent_before

    assert await eventually(warmed), "no pre-warm was sent for the review call"
    answer = {"role": "assistant", "content": b["choices"][0]["message"]["content"]}
    s, b, h2 = await chat(http, url, [{"role": "system", "content": chat_system("review")}, *task, answer],
                          {**tags, "agent": "review"})
    assert s == 200
    # the reviewer's system prompt was in no engine's cache: only the warm put it there
    assert b["usage"]["prompt_tokens_details"]["cached_tokens"] >= 1000, (b["usage"], h1, h2)
    assert await metric(http, url, "pythia_prewarm_total", 'outcome="used"') > used_before


async def test_autoscale_signal_rises_with_inflight_workflows(warm: Proc, http: aiohttp.ClientSession) -> None:
    url = warm.url

    async def pools() -> dict[str, dict[str, Any]]:
        async with http.get(url + "/pythia/autoscale") as r:
            assert r.status == 200
            view = await r.json()
        return {p["pool"]: p for p in view["pools"]}

    def total(view: dict[str, dict[str, Any]], key: str) -> float:
        return sum(p["projected"][key] if key in p["projected"] else p[key] for p in view.values())

    before = await pools()
    assert before["long"]["current_replicas"] == 1 and before["short"]["current_replicas"] == 2
    assert all(p["desired_replicas_reactive"] >= 1 and p["desired_replicas_predictive"] >= 1 for p in before.values())
    wfs = [Research(f"scale-{i}") for i in range(6)]
    await asyncio.gather(*(wf.call(http, url) for wf in wfs))  # six workflows begin; three steps each remain
    after = await pools()
    assert total(after, "inflight_workflows") >= total(before, "inflight_workflows") + 6
    assert total(after, "desired_replicas_share") > total(before, "desired_replicas_share")
    pool = max(after, key=lambda p: after[p]["desired_replicas_share"] - before[p]["desired_replicas_share"])

    async def gauge_rose() -> bool:
        return await metric(http, url, "pythia_pool_desired_replicas", f'pool="{pool}"') > before[pool]["desired_replicas_share"]

    assert await eventually(gauge_rose), "pythia_pool_desired_replicas did not rise"


async def test_untagged_workflow_calls_are_linked_live(cluster: Proc, http: aiohttp.ClientSession) -> None:
    url = cluster.url
    names = ("predictor_new_untagged", "predictor_linked_content", "predictor_linked_message")
    before = {n: await metric(http, url, "pythia_predictor_stat", f'name="{n}"') for n in names}
    task = {"role": "user", "content": text("untagged-task-", 5000)}

    def sys_(role: str) -> dict[str, str]:
        return {"role": "system", "content": f"Untagged {role}. " + text(f"u-{role}-", 800)}

    s, b, _ = await chat(http, url, [sys_("planner"), task], {})
    assert s == 200
    answer = b["choices"][0]["message"]["content"]
    # the same task behind another role's system prompt: linked by the task text (content hashes)
    s, _, _ = await chat(http, url, [sys_("writer"), task], {})
    assert s == 200
    # a call quoting the first answer only: linked by the answer's fingerprint (output/message fingerprints)
    s, _, _ = await chat(http, url, [sys_("checker"), {"role": "user", "content": "Check the plan below."},
                                     {"role": "assistant", "content": answer}], {})
    assert s == 200

    async def linked() -> dict[str, float]:
        now = {n: await metric(http, url, "pythia_predictor_stat", f'name="{n}"') - before[n] for n in names}
        return now if now["predictor_linked_content"] >= 1 and now["predictor_linked_message"] >= 1 else {}

    got = await eventually(linked)
    assert got, "untagged calls were not linked"
    assert got["predictor_new_untagged"] == 1  # three calls, one workflow


async def test_prefix_index_share_is_exported_per_replica_within_its_bounds(
    warm: Proc, http: aiohttp.ClientSession
) -> None:
    # after the warm-up every engine (8-10k tokens of KV) has computed more than its cache holds, so the
    # gateway reconciles each replica's index share from its hit counters: the share stays within 1/4-2x
    async with http.get(warm.url + "/pythia/replicas") as r:
        replicas = [x["url"] for p in (await r.json())["pools"] for x in p["replicas"]]
    assert len(replicas) == 3
    for url in replicas:
        ratio = await metric(http, warm.url, "pythia_prefix_index_share_ratio", f'replica="{url}"')
        assert 0.25 <= ratio <= 2.0, (url, ratio)
