"""`llmc serve` with a real model (SmolLM2-135M-Instruct, paged KV cache) and the real OpenAI
client: real answers, whole and streamed alike; 16 concurrent greedy requests each get the
answer it gets alone; a client that hangs up mid-stream leaves nothing running or held; a full
queue answers 429; a soak of a few hundred requests with random lengths and disconnects leaks
nothing. Slow: the model is downloaded and compiled first."""

from __future__ import annotations

import concurrent.futures
import random
import time
from pathlib import Path

import httpx2
import openai
import pytest
from serving import metric, server, wait_for

from llmc import zoo

pytestmark = pytest.mark.slow
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
TOPICS = ["the sea", "a cat", "winter", "bread", "a city at night", "music", "rain", "the moon", "trains",
          "a garden", "mountains", "coffee", "books", "the wind", "a river", "snow"]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    import llmc

    return llmc.compile(zoo.get("smollm2-135m-instruct").export(), max_seq_len=512, kv_layout="paged:16",
                        output=tmp_path_factory.mktemp("serve") / "smollm2.llmc")


@pytest.fixture(scope="module")
def base(artifact):
    with server(artifact, "--max-batch", "8", "--served-model-name", "smollm2") as (url, _):
        yield url


@pytest.fixture(scope="module")
def client(base):
    return openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)


def test_a_real_answer_whole_and_streamed(client):
    whole = client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=40, temperature=0)
    text = whole.choices[0].message.content
    assert "Paris" in text and whole.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=40, temperature=0,
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == text
    completion = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=8,
                                           temperature=0)
    streamed = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=8,
                                         temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == completion.choices[0].text
    assert "Paris" in completion.choices[0].text
    stopped = client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=40, temperature=0,
                                             stop=["Paris"])
    assert stopped.choices[0].message.content == text[:text.index("Paris")]


def test_concurrent_requests_get_the_answers_they_get_alone(client):
    def ask(topic, tokens):
        return client.chat.completions.create(model="smollm2", temperature=0, max_tokens=tokens,
                                              messages=[{"role": "user", "content": f"Write about {topic}."}]
                                              ).choices[0].message.content
    jobs = [(topic, 8 + 5 * i) for i, topic in enumerate(TOPICS)]
    alone = [ask(*job) for job in jobs]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda job: ask(*job), jobs))
    assert together == alone


def test_a_client_that_hangs_up_leaves_nothing_behind(base, client):
    with httpx2.stream("POST", f"{base}/v1/chat/completions", timeout=60,
                       json={"messages": QUESTION, "max_tokens": 400, "ignore_eos": True, "stream": True}) as r:
        events = r.iter_lines()
        for _ in range(4):
            next(events)
        assert metric(base, "llmc_running") == 1
    assert wait_for(base, "llmc_running", 0) == 0
    assert wait_for(base, "llmc_kv_blocks_used", 0) == 0
    assert client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=4).choices


def test_a_full_queue_answers_429(artifact):
    with server(artifact, "--max-batch", "1", "--max-queue", "1") as (url, _):
        def ask(_):
            return httpx2.post(f"{url}/v1/completions", timeout=120,
                               json={"prompt": "Once upon a time", "max_tokens": 60, "ignore_eos": True})
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(ask, range(6)))
    codes = sorted(a.status_code for a in answers)
    assert 200 in codes and 429 in codes and set(codes) <= {200, 429}, codes
    busy = next(a for a in answers if a.status_code == 429)
    assert busy.headers["retry-after"] and busy.json()["error"]["code"] == "rate_limit_exceeded"


def test_a_soak_leaks_nothing(artifact):
    """300 requests from 12 clients: random lengths, a quarter hung up mid-stream, a small queue
    (some 429s); no 5xx, every block back, resident memory flat after the first 100."""
    rng = random.Random(0)
    with server(artifact, "--max-batch", "8", "--max-queue", "2", "--prefill-chunk", "64") as (url, proc):
        def one(i):
            body = {"prompt": " ".join(rng.choice(TOPICS) for _ in range(rng.randint(1, 60))),
                    "max_tokens": rng.randint(1, 40), "temperature": rng.choice([0, 0.8]), "seed": i}
            codes = []
            while not codes or codes[-1] == 429:  # a busy server: back off a little, as clients do
                if codes:
                    time.sleep(0.05)
                if rng.random() < 0.25:
                    try:
                        with httpx2.stream("POST", f"{url}/v1/completions", json={**body, "stream": True},
                                           timeout=120) as r:
                            for _ in zip(range(2), r.iter_lines()):
                                pass
                            codes.append(r.status_code)
                    except httpx2.TransportError:
                        codes.append(0)
                else:
                    codes.append(httpx2.post(f"{url}/v1/completions", json=body, timeout=120).status_code)
            return codes

        def rss():
            return int(next(line.split()[1] for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines()
                            if line.startswith("VmRSS")))
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            warm = list(pool.map(one, range(100)))
            before = rss()
            rest = list(pool.map(one, range(100, 300)))
        after = rss()
        assert wait_for(url, "llmc_running", 0) == 0 and wait_for(url, "llmc_kv_blocks_used", 0) == 0
        assert metric(url, "llmc_waiting") == 0
    codes = [c for request in warm + rest for c in request]
    assert not [c for c in codes if c >= 500 or c == 0], codes
    assert [request[-1] for request in warm + rest] == [200] * 300
    assert 429 in codes  # the queue was full at times
    assert after - before < 64 * 1024, (before, after)  # kB


def test_sigterm_finishes_or_aborts_what_runs_within_the_grace_period(artifact):
    import signal
    import threading

    with server(artifact, "--grace", "2") as (url, proc):
        got = []

        def stream():
            try:
                with httpx2.stream("POST", f"{url}/v1/completions", timeout=60,
                                   json={"prompt": "Once", "max_tokens": 400, "ignore_eos": True, "stream": True}) as r:
                    got.extend(line for line in r.iter_lines() if line)
            except httpx2.TransportError:
                got.append("cut")
        reader = threading.Thread(target=stream)
        reader.start()
        while metric(url, "llmc_running") != 1:
            time.sleep(0.05)
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0  # the fixture checks the status again
        assert time.monotonic() - start < 15
        reader.join(timeout=30)
    assert got and len(got) < 400  # it was cut: 400 tokens take longer than the grace period
