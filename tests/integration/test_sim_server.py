"""`pythia sim-engine` as a real process: OpenAI API and SSE like vLLM, /metrics, and wall clock = virtual time."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pools.sim import SimEngine, SimRequest
from pools.sim.virtual import Arrival, run_trace
from tests.conftest import VENV_BIN, Proc, ProcessGroup, free_port

MODEL = "llama-3.1-8b"
TIMEOUT = aiohttp.ClientTimeout(total=30)


def start_sim(group: ProcessGroup, *args: str, name: str = "sim") -> Proc:
    port = free_port()
    return group.start(
        [str(VENV_BIN / "pythia"), "sim-engine", "--port", str(port), *args],
        name=name,
        url=f"http://127.0.0.1:{port}",
        ready_path="/health",
    )


@pytest.fixture(scope="module")
def sim(module_procs: ProcessGroup) -> Iterator[Proc]:
    yield start_sim(module_procs, "--time-scale", "50", "--seed", "1", "--scheduling-policy", "priority")


def chat(content: str, **kw: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **kw}


async def sse(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> list[bytes]:
    async with session.post(url, json=body) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        raw = await r.read()
    events = [e for e in raw.split(b"\n\n") if e]
    assert all(e.startswith(b"data: ") for e in events)
    return [e[len(b"data: ") :] for e in events]


async def test_streamed_chat_matches_vllm_format(sim: Proc) -> None:
    body = chat(
        "stream please", max_tokens=6, ignore_eos=True, stream=True, stream_options={"include_usage": True}
    )
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        events = await sse(s, sim.url + "/v1/chat/completions", body)
    assert events[-1] == b"[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == MODEL for c in chunks)
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text_chunks = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]
    assert text_chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in text_chunks[:-1])
    usage = chunks[-1]
    assert usage["choices"] == []
    assert usage["usage"]["completion_tokens"] == 6
    assert usage["usage"]["prompt_tokens"] == len(b"<|user|>stream please") // 4 + 1
    assert usage["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    text = "".join(c["choices"][0]["delta"]["content"] for c in text_chunks)
    assert len(text.encode()) == 6 * 4  # 4 bytes per token


async def test_streamed_completion_and_no_usage_without_include_usage(sim: Proc) -> None:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        events = await sse(
            s, sim.url + "/v1/completions", {"prompt": "once upon", "max_tokens": 3, "stream": True}
        )
    chunks = [orjson.loads(e) for e in events[:-1]]
    assert events[-1] == b"[DONE]"
    assert all(c["object"] == "text_completion" and "usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")


async def test_repeated_prompt_reports_cached_tokens(sim: Proc) -> None:
    prompt = "A long shared system prompt for caching. " * 120
    body = chat(prompt, max_tokens=4, ignore_eos=True)
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        replies = []
        for _ in range(2):
            async with s.post(sim.url + "/v1/chat/completions", json=body) as r:
                assert r.status == 200
                replies.append(await r.json())
    first, second = (r["usage"] for r in replies)
    assert first["prompt_tokens_details"]["cached_tokens"] == 0
    assert second["prompt_tokens_details"]["cached_tokens"] == (second["prompt_tokens"] - 1) // 16 * 16
    msg = replies[1]["choices"][0]
    assert msg["message"]["role"] == "assistant" and msg["finish_reason"] == "length"
    assert replies[0]["choices"][0]["message"]["content"] == msg["message"]["content"]  # same seed, same text
    assert replies[1]["object"] == "chat.completion" and replies[1]["usage"]["completion_tokens"] == 4


async def test_a_conversation_reuses_the_blocks_of_its_previous_answer(sim: Proc) -> None:
    msgs = [{"role": "system", "content": "Agent rules. " * 200}, {"role": "user", "content": "first task"}]
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        async with s.post(
            sim.url + "/v1/chat/completions", json=chat("", messages=msgs, max_tokens=200)
        ) as r:
            first = await r.json()
        answer = first["choices"][0]["message"]["content"]
        msgs2 = [*msgs, {"role": "assistant", "content": answer}, {"role": "user", "content": "next task"}]
        async with s.post(sim.url + "/v1/chat/completions", json=chat("", messages=msgs2, max_tokens=5)) as r:
            second = await r.json()
    reused = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert reused >= first["usage"]["prompt_tokens"] + first["usage"]["completion_tokens"] - 32


async def test_models_health_and_errors(sim: Proc) -> None:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        async with s.get(sim.url + "/v1/models") as r:
            models = await r.json()
        assert [m["id"] for m in models["data"]] == [MODEL] and models["object"] == "list"
        async with s.get(sim.url + "/health") as r:
            assert r.status == 200
        cases = [
            (chat("x", max_tokens="ten"), 400, "max_tokens"),
            ({"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
            (chat("x", stream=1), 400, "stream"),
            ({"model": MODEL}, 400, "messages"),
        ]
        for body, status, param in cases:
            async with s.post(sim.url + "/v1/chat/completions", json=body) as r:
                assert r.status == status
                err = (await r.json())["error"]
                assert err["param"] == param and err["code"] == status and err["message"] and err["type"]
        async with s.post(sim.url + "/v1/chat/completions", data=b"{not json") as r:
            assert r.status == 400 and "error" in await r.json()
        # unknown fields are ignored, as vLLM does
        async with s.post(
            sim.url + "/v1/chat/completions", json=chat("x", max_tokens=1, frobnicate=True)
        ) as r:
            assert r.status == 200


async def test_client_disconnect_aborts_the_request(procs: ProcessGroup) -> None:
    eng = start_sim(procs, "--time-scale", "1", name="abort")
    body = chat("a long answer please", max_tokens=5000, ignore_eos=True, stream=True)
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        async with s.post(eng.url + "/v1/chat/completions", json=body) as r:
            await r.content.readline()  # the first chunk: the request is running
        await asyncio.sleep(0.3)  # connection closed: the server notices and aborts
        async with s.get(eng.url + "/metrics") as r:
            text = await r.text()
    assert scrape(text)["vllm:num_requests_running"] == 0
    assert 'vllm:request_success_total{finished_reason="abort",model_name="llama-3.1-8b"} 1.0' in text


def scrape(text: str, model: str = MODEL) -> dict[str, float]:
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            if smp.labels.get("model_name") == model and "le" not in smp.labels:
                out[smp.name] = out.get(smp.name, 0.0) + smp.value
    return out


async def test_metrics_move_and_advertise_capacity(procs: ProcessGroup) -> None:
    eng = start_sim(
        procs, "--time-scale", "20", "--kv-cache-gb", "0.5", "--model", "small-model", name="tiny"
    )
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        async with s.get(eng.url + "/metrics") as r:
            text0 = await r.text()
        assert 'num_gpu_blocks="256"' in text0 and 'block_size="16"' in text0
        before = scrape(text0, "small-model")

        async def one(i: int) -> None:
            body = {
                "model": "small-model",
                "prompt": f"{i} " + "tok " * 400,
                "max_tokens": 400,
                "ignore_eos": True,
            }
            async with s.post(eng.url + "/v1/completions", json=body) as r:
                assert r.status == 200

        tasks = [asyncio.create_task(one(i)) for i in range(8)]
        await asyncio.sleep(0.2)
        async with s.get(eng.url + "/metrics") as r:
            mid = scrape(await r.text(), "small-model")
        await asyncio.gather(*tasks)
        async with s.get(eng.url + "/metrics") as r:
            after = scrape(await r.text(), "small-model")
    assert mid["vllm:num_requests_running"] > 0 and mid["vllm:num_requests_waiting"] > 0
    assert mid["vllm:kv_cache_usage_perc"] > 0.5
    assert after["vllm:num_requests_running"] == 0 and after["vllm:kv_cache_usage_perc"] == 0
    assert after["vllm:num_preemptions_total"] > before["vllm:num_preemptions_total"]
    assert after["vllm:generation_tokens_total"] == 8 * 400
    assert after["vllm:prompt_tokens_total"] > 8 * 400
    assert after["vllm:prefix_cache_queries_total"] >= after["vllm:prompt_tokens_total"]
    assert after["vllm:time_to_first_token_seconds_count"] == 8
    assert after["vllm:e2e_request_latency_seconds_count"] == 8


async def test_wall_clock_ttfts_match_virtual_time(procs: ProcessGroup) -> None:
    scale = 2.0
    eng = start_sim(procs, "--time-scale", str(scale), "--seed", "5", name="clock")
    shared = "Shared agent instructions. " * 900  # ~6000 tokens reused by half the calls
    trace = []
    for i in range(8):
        content = (shared if i % 2 else f"call {i} private context " * 1000) + f" step {i}"
        trace.append((0.5 * i, [{"role": "user", "content": content}]))

    async def call(
        s: aiohttp.ClientSession, t0: float, at: float, msgs: list[dict[str, str]]
    ) -> tuple[float, int]:
        await asyncio.sleep(max(0.0, t0 + at / scale - time.monotonic()))
        sent = time.monotonic()
        body = {"model": MODEL, "messages": msgs, "max_tokens": 30, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}  # fmt: skip
        first = None
        cached = -1
        async with s.post(eng.url + "/v1/chat/completions", json=body) as r:
            async for line in r.content:
                if not line.startswith(b"data: {"):
                    continue
                chunk = orjson.loads(line[6:])
                if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    first = time.monotonic()
                if chunk.get("usage"):
                    cached = chunk["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert first is not None
        return (first - sent) * scale, cached

    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        t0 = time.monotonic() + 0.05
        wall = await asyncio.gather(*(call(s, t0, at, m) for at, m in trace))

    virtual_engine = SimEngine.from_preset("llama-3.1-8b-a100", seed=5)
    res = run_trace(
        virtual_engine,
        [
            Arrival(at, SimRequest.from_messages(f"r{i}", m, max_tokens=30, ignore_eos=True))
            for i, (at, m) in enumerate(trace)
        ],
    )
    # The engine's own clock (virtual time in both modes) sees the same TTFTs up to when each
    # request reached it: compare its TTFT histogram sum, which HTTP and client jitter do not touch.
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s, s.get(eng.url + "/metrics") as r:
        engine_side = scrape(await r.text())["vllm:time_to_first_token_seconds_sum"]
    virtual_sum = sum(r.ttft or 0.0 for r in res.values())
    assert abs(engine_side - virtual_sum) <= 0.05 * virtual_sum + 0.02 * len(trace) * scale
    # Per request, as the client measures it: the same cache hits, and TTFTs within what 150 ms of
    # wall-clock jitter (a busy shared machine) allows.
    for i, (ttft_wall, cached) in enumerate(wall):
        v = res[f"r{i}"]
        assert v.ttft is not None
        assert cached == v.cached_tokens
        assert abs(ttft_wall - v.ttft) <= 0.25 * v.ttft + 0.15 * scale, (i, ttft_wall, v.ttft)
