"""Serving benchmark (`llmc bench-serve URL`): streamed completions against any OpenAI-compatible
server (llmc serve, llama-server, vLLM), at fixed concurrency levels or Poisson arrivals, as
vLLM's `bench serve` measures them.

Each request asks for `--output-len` tokens (`ignore_eos`, so every server generates as many)
after a prompt of `--input-len` words. Per request: time to first token (TTFT), the gaps
between streamed chunks (inter-token latency, ITL), time per output token after the first
(TPOT). Per level: output tokens/s over the level's wall time, and p50/p99 of each latency.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass, field

WORDS = ("the quick brown fox jumps over a lazy dog while seven wise owls watch from an old oak tree near "
         "the river and talk about weather books music bread trains mountains snow coffee gardens").split()


@dataclass
class Result:
    ok: bool
    ttft: float = 0.0
    latency: float = 0.0
    tokens: int = 0
    gaps: list[float] = field(default_factory=list)
    error: str = ""


async def _one(session, url: str, body: dict, headers: dict) -> Result:
    start = time.perf_counter()
    result, last = Result(ok=False), None
    try:
        async with session.post(url, json=body, headers=headers) as r:
            if r.status != 200:
                return Result(ok=False, error=f"HTTP {r.status}: {(await r.text())[:200]}")
            async for raw in r.content:
                line = raw.decode().strip()
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                if chunk.get("usage"):
                    result.tokens = chunk["usage"]["completion_tokens"]
                if not chunk.get("choices") or not chunk["choices"][0].get("text"):
                    continue
                now = time.perf_counter()
                if last is None:
                    result.ttft = now - start
                else:
                    result.gaps.append(now - last)
                last = now
        result.latency = time.perf_counter() - start
        result.tokens = result.tokens or len(result.gaps) + (last is not None)
        result.ok = last is not None
    except Exception as e:  # a transport failure is a failed request, reported, not a crash
        result.error = f"{type(e).__name__}: {e}"
    return result


async def _level(url: str, model: str | None, prompts: list[str], output_len: int, concurrency: int | None,
                 rate: float | None, headers: dict, seed: int) -> tuple[list[Result], float]:
    import aiohttp

    limit = asyncio.Semaphore(concurrency or len(prompts))
    rng = random.Random(seed)

    async def run(session, prompt):
        body = {"prompt": prompt, "max_tokens": output_len, "temperature": 0, "stream": True, "ignore_eos": True,
                "stream_options": {"include_usage": True}}
        if model:
            body["model"] = model
        async with limit:
            return await _one(session, f"{url}/v1/completions", body, headers)

    timeout = aiohttp.ClientTimeout(total=3600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0, force_close=True)) as session:
        start = time.perf_counter()
        tasks = []
        for prompt in prompts:
            tasks.append(asyncio.ensure_future(run(session, prompt)))
            if rate:
                await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
        return results, time.perf_counter() - start


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def summarize(results: list[Result], wall: float) -> dict:
    ok = [r for r in results if r.ok]
    gaps = [g for r in ok for g in r.gaps]
    tpot = [(r.latency - r.ttft) / (r.tokens - 1) for r in ok if r.tokens > 1]
    return {"requests": len(results), "failed": len(results) - len(ok),
            "errors": sorted({r.error for r in results if r.error})[:3],
            "output_tokens_per_s": sum(r.tokens for r in ok) / wall,
            "ttft_p50_ms": _pct([r.ttft for r in ok], 0.5) * 1e3, "ttft_p99_ms": _pct([r.ttft for r in ok], 0.99) * 1e3,
            "itl_p50_ms": _pct(gaps, 0.5) * 1e3, "itl_p99_ms": _pct(gaps, 0.99) * 1e3,
            "tpot_p50_ms": (statistics.median(tpot) if tpot else float("nan")) * 1e3, "wall_s": wall}


def run(url: str, model: str | None = None, concurrency: list[int] = (1,), rate: float | None = None,
        requests: int = 16, input_len: int = 40, output_len: int = 64, api_key: str | None = None,
        seed: int = 0, warmup: int = 1) -> list[dict]:
    """One row per concurrency level (or one for `rate`), as `summarize` gives them."""
    rng = random.Random(seed)
    prompts = [" ".join(rng.choice(WORDS) for _ in range(input_len)) for _ in range(requests)]
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    url = url.rstrip("/")
    if warmup:  # the server's first request pays for warm-up work
        asyncio.run(_level(url, model, prompts[:warmup], 4, 1, None, headers, seed))
    rows = []
    for level in ([None] if rate else concurrency):
        results, wall = asyncio.run(_level(url, model, prompts, output_len, level, rate, headers, seed))
        rows.append({"concurrency": level, "rate": rate, **summarize(results, wall)})
    return rows


def table(rows: list[dict]) -> str:
    out = ["| concurrency | requests (failed) | output tok/s | TTFT p50 / p99 ms | ITL p50 / p99 ms | TPOT p50 ms |",
           "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        level = r["concurrency"] if r["rate"] is None else f"Poisson {r['rate']}/s"
        out.append(f"| {level} | {r['requests']} ({r['failed']}) | {r['output_tokens_per_s']:.1f} | "
                   f"{r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f} | {r['itl_p50_ms']:.1f} / {r['itl_p99_ms']:.1f} | "
                   f"{r['tpot_p50_ms']:.1f} |")
    return "\n".join(out)
