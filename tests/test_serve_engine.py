"""The serving engine without HTTP (llmc.serve.engine), on llama-tiny with a paged KV cache:
sequences joining and leaving the batch get exactly the tokens they get alone, with chunked
prefill, under preemption and reusing a shared prefix's cached blocks; aborted requests give their blocks back; bad requests and a
full queue are refused before anything runs."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from llmc import runtime
from llmc.serve.engine import Engine, QueueFull, Request, RequestError


@pytest.fixture(scope="module")
def paged(artifacts):
    return artifacts("llama-tiny", kv_layout="paged:16")


def _requests(rng, n: int, longest: int = 50) -> list[Request]:
    lengths, news = rng.integers(1, longest, n), rng.integers(1, longest, n)
    return [Request(tuple(int(t) for t in rng.integers(0, 100, int(p))), int(k), ignore_eos=True)
            for p, k in zip(lengths, news)]


def _run(engine: Engine, requests: list[Request]) -> list[list[int]]:
    async def one(request):
        return [o.token async for o in engine.submit(request) if o.token is not None]

    async def all_of():
        return await asyncio.gather(*(one(r) for r in requests))
    return asyncio.run(all_of())


@pytest.mark.parametrize("kv_blocks", [None, 8], ids=["blocks-enough", "preempting"])
def test_concurrent_requests_get_the_tokens_they_get_alone(paged, kv_blocks, rng):
    """16 requests of different lengths through 8 slots, prompts prefilled 16 tokens per
    iteration; with 8 blocks (one context's worth) sequences are preempted and recomputed."""
    alone = runtime.load(paged)
    requests = _requests(rng, 16)
    want = [alone.generate(list(r.prompt), r.max_tokens) for r in requests]
    engine = Engine(runtime.load(paged), max_batch=8, prefill_chunk=16, kv_blocks=kv_blocks)
    try:
        got = _run(engine, requests)
        stats = engine.stats()
    finally:
        engine.shutdown(grace=1)
    assert got == want
    assert stats["running"] == stats["waiting"] == stats["kv_blocks_used"] == 0
    assert (stats["preemptions"] > 0) == (kv_blocks is not None)


@pytest.mark.parametrize("kv_blocks", [None, 8], ids=["blocks-enough", "preempting"])
def test_a_shared_prefix_is_computed_once_and_changes_no_token(paged, kv_blocks, rng):
    """A conversation's second turn (the first turn, its answer and a new message) and requests
    sharing a 40-token system prompt reuse the cached blocks of what they share (whole blocks of
    16, the last token always computed) and get the tokens they get alone."""
    alone = runtime.load(paged)
    system = [int(t) for t in rng.integers(0, 100, 40)]
    first = Request(tuple(system + [7, 8, 9]), 30, ignore_eos=True)
    engine = Engine(runtime.load(paged), max_batch=4, prefill_chunk=16, kv_blocks=kv_blocks)
    try:
        answer = _run(engine, [first])[0]
        second = Request(first.prompt + tuple(answer) + (5, 6), 10, ignore_eos=True)
        others = [Request(tuple(system + [int(t) for t in rng.integers(0, 100, n)]), 12, ignore_eos=True)
                  for n in (1, 9, 23)]
        got = _run(engine, [second, *others])
        stats = engine.stats()
    finally:
        engine.shutdown(grace=1)
    assert [answer, *got] == [alone.generate(list(r.prompt), r.max_tokens) for r in [first, second, *others]]
    # the second turn: 75 tokens, 4 whole blocks cached (64); each other request: 2 blocks (32)
    assert stats["prefix_cached_tokens"] >= 64 + 3 * 32 if kv_blocks is None else stats["prefix_cached_tokens"] > 0
    assert stats["kv_blocks_used"] == 0


def test_without_prefix_cache_every_prompt_is_computed(paged):
    engine = Engine(runtime.load(paged), max_batch=2, prefix_cache=False)
    try:
        _run(engine, [Request(tuple(range(1, 40)), 4)])
        _run(engine, [Request(tuple(range(1, 40)), 4)])
        assert engine.stats()["prefix_cached_tokens"] == 0
    finally:
        engine.shutdown(grace=1)


def test_a_request_left_early_leaves_the_batch_and_gives_its_blocks_back(paged):
    engine = Engine(runtime.load(paged), max_batch=4)

    async def leave_after(n):
        outputs = engine.submit(Request(tuple(range(1, 30)), 90, ignore_eos=True))
        got = [await outputs.__anext__() for _ in range(n)]
        await outputs.aclose()
        return got

    async def then_wait():
        got = await leave_after(3)
        for _ in range(200):  # the engine drops it at its next iteration
            if engine.stats()["running"] == 0:
                break
            await asyncio.sleep(0.01)
        return got
    try:
        got = asyncio.run(then_wait())
        stats = engine.stats()
        after = _run(engine, [Request((5, 6, 7), 4, ignore_eos=True)])  # and the next is served
    finally:
        engine.shutdown(grace=1)
    assert len(got) == 3 and stats["running"] == 0 and stats["kv_blocks_used"] == 0
    assert len(after[0]) == 4


def test_bad_requests_and_a_full_queue_are_refused_before_they_queue(paged):
    engine = Engine(runtime.load(paged), max_batch=1, max_queue=1)
    try:
        with pytest.raises(RequestError, match=r"prompt \(100 tokens\) \+ max_tokens \(29\) exceeds .* 128"):
            engine.check(Request(tuple([1] * 100), 29))
        for bad, message in [(Request((), 4), "empty"), (Request((1,), 0), "max_tokens 0"),
                             (Request((1,), 4, temperature=-1.0), "temperature"), (Request((1,), 4, top_p=2.0), "top-p"),
                             (Request((10 ** 6,), 4), r"token ids must be in \[0, ")]:
            with pytest.raises(RequestError, match=message):
                engine.check(bad)

        async def flood():
            first = engine.submit(Request(tuple(range(1, 60)), 60, ignore_eos=True))
            await first.__anext__()  # running: the queue is empty again
            second = engine.submit(Request((1, 2), 60, ignore_eos=True))
            with pytest.raises(QueueFull):
                engine.submit(Request((1, 2), 4))
            await first.aclose()
            await second.aclose()
        asyncio.run(flood())
    finally:
        engine.shutdown(grace=1)


def test_an_artifact_without_a_paged_cache_is_served_one_sequence_at_a_time(artifacts, rng, caplog):
    path = artifacts("llama-tiny")
    alone = runtime.load(path)
    requests = _requests(rng, 4, longest=20)
    want = [alone.generate(list(r.prompt), r.max_tokens) for r in requests]
    engine = Engine(runtime.load(path), max_batch=8)
    try:
        assert engine.max_batch == 1 and "one sequence at a time" in caplog.text
        assert _run(engine, requests) == want
    finally:
        engine.shutdown(grace=1)


def test_sampling_is_the_request_own_business(paged, rng):
    """A seeded sampled request gets the same tokens alone and among others."""
    prompt = tuple(int(t) for t in rng.integers(0, 100, 9))
    seeded = Request(prompt, 12, temperature=0.8, top_k=20, seed=7, ignore_eos=True)
    others = _requests(rng, 6)
    engine = Engine(runtime.load(paged), max_batch=4)
    try:
        alone = _run(engine, [seeded])[0]
        together = _run(engine, [seeded] + others)[0]
    finally:
        engine.shutdown(grace=1)
    assert alone == together
    assert alone == runtime.load(paged).generate(list(prompt), 12, temperature=0.8, top_k=20, seed=7)


def test_logprobs_are_the_model_distribution(paged):
    model = runtime.load(paged)
    logits = model.forward(np.array([[3, 4, 5]]), 0, last_only=True)[0, -1].astype(np.float64)
    want = logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
    engine = Engine(runtime.load(paged), max_batch=2)
    try:
        async def first():
            async for o in engine.submit(Request((3, 4, 5), 1, logprobs=3, ignore_eos=True)):
                return o
        out = asyncio.run(first())
    finally:
        engine.shutdown(grace=1)
    assert out.token == int(np.argmax(logits))
    assert out.logprob == pytest.approx(want[out.token], abs=1e-9)
    assert [t for t, _ in out.top_logprobs] == list(np.argsort(-want, kind="stable")[:3])
