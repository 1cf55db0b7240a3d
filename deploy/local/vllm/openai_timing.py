"""Timed streaming completions against an OpenAI-compatible engine (real vLLM or the simulated one).

Shared by the step-time profiler and the fidelity check: one request, streamed, with the time of
its first token and of every later token, measured at the client.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson


@dataclass(slots=True)
class Timing:
    """What the client saw of one streamed completion."""

    start: float
    first_token: float = 0.0
    end: float = 0.0
    token_times: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    status: int = 0
    error: str = ""

    @property
    def ttft(self) -> float:
        return self.first_token - self.start

    @property
    def e2e(self) -> float:
        return self.end - self.start


async def stream_completion(
    session: aiohttp.ClientSession, base_url: str, body: dict[str, Any], timeout_s: float = 600.0
) -> Timing:
    """POST /v1/completions with stream=true; records the arrival time of each token chunk."""
    payload = {**body, "stream": True, "stream_options": {"include_usage": True}}
    t = Timing(start=time.perf_counter())
    try:
        async with session.post(
            base_url + "/v1/completions",
            data=orjson.dumps(payload),
            headers={"Content-Type": "application/json"},
            timeout=aiohttp.ClientTimeout(total=timeout_s),
        ) as resp:
            t.status = resp.status
            if resp.status != 200:
                t.error = (await resp.read())[:500].decode(errors="replace")
                t.end = time.perf_counter()
                return t
            buf = b""
            async for chunk in resp.content.iter_any():
                now = time.perf_counter()
                buf += chunk
                while b"\n\n" in buf:
                    event, buf = buf.split(b"\n\n", 1)
                    _take_event(t, event, now)
            t.end = time.perf_counter()
    except (aiohttp.ClientError, TimeoutError) as e:
        t.error = f"{e.__class__.__name__}: {e}"
        t.end = time.perf_counter()
    return t


def _take_event(t: Timing, event: bytes, now: float) -> None:
    line = event.strip()
    if not line.startswith(b"data:"):
        return
    data = line[5:].strip()
    if data == b"[DONE]":
        return
    obj = orjson.loads(data)
    usage = obj.get("usage")
    if usage:
        t.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        t.completion_tokens = int(usage.get("completion_tokens") or 0)
        details = usage.get("prompt_tokens_details") or {}
        t.cached_tokens = int(details.get("cached_tokens") or 0)
    choices = obj.get("choices") or []
    if choices and (choices[0].get("text") or choices[0].get("finish_reason") is None):
        if not t.first_token:
            t.first_token = now
        t.token_times.append(now)


async def scrape_counters(
    session: aiohttp.ClientSession, base_url: str, names: tuple[str, ...]
) -> dict[str, float]:
    """Sum of each named Prometheus series over its labels, from GET /metrics."""
    async with session.get(base_url + "/metrics", timeout=aiohttp.ClientTimeout(total=10)) as resp:
        text = await resp.text()
    out = dict.fromkeys(names, 0.0)
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in out:
            out[name] += float(line.rsplit(" ", 1)[1])
    return out
