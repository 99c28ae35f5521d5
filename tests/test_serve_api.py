"""`llmc serve`'s HTTP API with the real OpenAI client, on llama-tiny (no tokenizer: prompts as
token ids): answers whole and streamed, the OpenAI error JSON and codes for bad requests, the
API key, /health, /v1/models, /metrics, and a clean exit at SIGTERM. Real answers, concurrency,
disconnects and load are held on SmolLM2 (test_serve_smollm2.py)."""

from __future__ import annotations

import httpx2
import openai
import pytest
from serving import metric, server

KEY = "test-key"


@pytest.fixture(scope="module")
def base(artifacts):
    with server(artifacts("llama-tiny", kv_layout="paged:16"), "--api-key", KEY, "--served-model-name", "tiny",
                "--max-batch", "4") as (url, _):
        yield url


@pytest.fixture(scope="module")
def client(base):
    return openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0)


def test_health_models_and_metrics(base, client):
    assert httpx2.get(f"{base}/health").json() == {"status": "ok"}
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert metric(base, "llmc_running") == 0


def test_a_streamed_completion_is_the_whole_one_in_pieces(base, client):
    prompt = [5, 17, 42, 8]
    whole = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, logprobs=2,
                                      extra_body={"ignore_eos": True})
    choice = whole.choices[0]
    assert choice.finish_reason == "length" and len(choice.logprobs.tokens) == 12
    assert whole.usage.prompt_tokens == 4 and whole.usage.completion_tokens == 12 and whole.usage.total_tokens == 16
    chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, logprobs=2,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    tokens = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert tokens == choice.logprobs.tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12 and not chunks[-1].choices
    # the raw stream ends as OpenAI's does
    with httpx2.stream("POST", f"{base}/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"prompt": prompt, "max_tokens": 3, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.headers["content-type"].startswith("text/event-stream") and lines[-1] == "data: [DONE]"


@pytest.mark.parametrize("body, status, param, says", [
    ({"prompt": [1, 2], "max_tokens": 200}, 400, "max_tokens", "prompt (2 tokens) + max_tokens (200)"),
    ({"prompt": [1, 2], "temperature": "hot"}, 400, "temperature", "must be a number"),
    ({"prompt": [1, 2], "max_tokens": 0}, 400, "max_tokens", "must be an integer from 1"),
    ({"prompt": [1, 2], "top_p": 0}, 400, "top_p", "(0, 1]"),
    ({"prompt": [1, 2], "n": 2}, 400, "n", "only n = 1"),
    ({"prompt": [1, 2], "stop": [""]}, 400, "stop", "non-empty string"),
    ({"prompt": {"text": "x"}}, 400, "prompt", "a list of token ids"),
    ({"prompt": "words"}, 400, "prompt", "no tokenizer"),
    ({"prompt": [10 ** 7]}, 400, "prompt", "token ids must be in"),
    ({"prompt": [1, 2], "model": "gpt-4"}, 404, "model", "does not exist"),
])
def test_bad_requests_get_openai_errors(base, body, status, param, says):
    r = httpx2.post(f"{base}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and says in error["message"] and error["type"]


def test_malformed_json_and_wrong_keys(base):
    auth = {"Authorization": f"Bearer {KEY}"}
    r = httpx2.post(f"{base}/v1/chat/completions", content=b"{not json", headers=auth)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx2.post(f"{base}/v1/chat/completions", json={"messages": "hi"}, headers=auth)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx2.post(f"{base}/v1/completions", json={"prompt": [1]}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0).models.list()


def test_a_chat_needs_a_template_and_says_so(base, client):
    with pytest.raises(openai.BadRequestError, match="chat template|no tokenizer"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])


def test_a_bad_artifact_stops_the_server_with_its_error(tmp_path):
    import subprocess
    import sys

    from serving import free_port

    done = subprocess.run([sys.executable, "-m", "llmc.cli", "serve", str(tmp_path / "missing.llmc"), "--port",
                           str(free_port())], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "no such artifact" in done.stderr
