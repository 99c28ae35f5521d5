"""The server's Prometheus metrics (`GET /metrics`), fed by the engine as it works.

Gauges are read from the engine when scraped (requests running and waiting, KV blocks held,
preemptions, prompt tokens served from cached blocks); counters and histograms are updated as
tokens come (prompt and generated tokens, finished requests, time to first token, inter-token
latency). Each server has a registry of its own."""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# latency buckets from 1 ms to a minute: CPU decode steps are tens of ms, a long prefill seconds
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
           30.0, 60.0)


class Metrics:
    def __init__(self, stats: Callable[[], dict]):
        """`stats`: the engine's `stats()` (or {} while the model loads)."""
        self.registry = r = CollectorRegistry()
        for key, doc in (("running", "requests in the running batch"), ("waiting", "requests waiting for a slot"),
                         ("kv_blocks_used", "KV cache blocks held by sequences"),
                         ("preemptions", "sequences preempted for KV blocks since start"),
                         ("prefix_cached_tokens", "prompt tokens whose KV blocks were reused since start")):
            Gauge(f"llmc_{key}", doc, registry=r).set_function(lambda key=key: stats().get(key, 0))
        self.prompt_tokens = Counter("llmc_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("llmc_generation_tokens", "tokens generated", registry=r)
        self.requests = Counter("llmc_requests", "requests admitted to the queue", registry=r)
        self.finished = Counter("llmc_requests_finished", "requests finished (or aborted)", registry=r)
        self.ttft = Histogram("llmc_time_to_first_token_seconds", "from arrival to the first token",
                              buckets=BUCKETS, registry=r)
        self.itl = Histogram("llmc_inter_token_latency_seconds", "between a request's consecutive tokens",
                             buckets=BUCKETS, registry=r)

    # the engine's hooks (its thread)
    def request_started(self) -> None:
        self.requests.inc()

    def token(self, seconds: float, first: bool) -> None:
        (self.ttft if first else self.itl).observe(seconds)
        self.generation_tokens.inc()

    def request_finished(self, prompt_tokens: int, completion_tokens: int) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.finished.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
