"""Measure a running engine's step times: prefill against prompt length, decode against batch and context.

    .venv/bin/python deploy/local/vllm/step_profile.py --url http://127.0.0.1:8101 --out steps.json

Prefill: one request at a time, a fresh prompt of L tokens, max_tokens=1: its TTFT is one prefill
step plus the fixed cost of a request (HTTP, tokenizer, detokenizer, scheduling), which the L=16
point shows. Decode: B requests at once with a C-token prompt; the step time is the median gap
between streamed tokens once every request has its first token (no prefill left in the batch).
Every prompt is token ids unique to its request, so the prefix cache never helps.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from openai_timing import stream_completion
from token_prompts import unique_token_ids

PREFILL_LENGTHS = (16, 128, 256, 512, 1024, 1536, 1984)
DECODE_BATCHES = (1, 2, 4, 8, 16, 32)
DECODE_CONTEXTS = (128, 1024)
DECODE_TOKENS = 40


async def _one(session: aiohttp.ClientSession, url: str, model: str, prompt_len: int, max_tokens: int) -> Any:
    body = {
        "model": model,
        "prompt": unique_token_ids(uuid.uuid4().hex, prompt_len),
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0.0,
    }
    t = await stream_completion(session, url, body)
    if t.error:
        raise RuntimeError(f"request failed: {t.status} {t.error}")
    return t


async def profile(url: str, model: str, repeats: int) -> dict[str, Any]:
    """Prefill and decode step times of the engine at `url`."""
    async with aiohttp.ClientSession() as session:
        for _ in range(3):  # warm-up: first calls pay lazy initialisation
            await _one(session, url, model, 256, 4)
        prefill = []
        for n in PREFILL_LENGTHS:
            ttfts = [(await _one(session, url, model, n, 1)).ttft for _ in range(repeats)]
            prefill.append({"tokens": n, "ttft_s": float(np.median(ttfts)), "samples": ttfts})
            print(f"prefill {n:5d} tokens: TTFT {np.median(ttfts) * 1000:7.1f} ms", file=sys.stderr)
        decode = []
        for ctx in DECODE_CONTEXTS:
            for b in DECODE_BATCHES:
                runs = await asyncio.gather(
                    *(_one(session, url, model, ctx, DECODE_TOKENS) for _ in range(b))
                )
                all_started = max(r.first_token for r in runs)
                gaps = [
                    t1 - t0
                    for r in runs
                    for t0, t1 in zip(r.token_times, r.token_times[1:], strict=False)
                    if t0 >= all_started
                ]
                step = float(np.median(gaps)) if gaps else float("nan")
                decode.append({"batch": b, "context": ctx, "step_s": step, "gaps": len(gaps)})
                print(f"decode batch {b:3d} context {ctx:5d}: step {step * 1000:7.1f} ms", file=sys.stderr)
    return {
        "url": url,
        "model": model,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "prefill": prefill,
        "decode": decode,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8101")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    result = asyncio.run(profile(args.url.rstrip("/"), args.model, args.repeats))
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
