"""Prometheus metrics of one server (`GET /metrics`), in a registry of its own.

Requests by route and status, prompt and generated tokens, time to first token, inter-token
latency and request latency histograms (measured on the worker thread when tokens are handed to
the event loop), and the scheduler's state: waiting and running sequences, KV-cache slots in use.
"""
from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0,
                   2.5, 5.0, 10.0, 20.0, 40.0, 80.0)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model_name: str):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("lowbit_requests", "HTTP requests answered", ["route", "status"], registry=r)
        self.prompt_tokens = Counter("lowbit_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter("lowbit_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("lowbit_time_to_first_token_seconds", "From arrival to the first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("lowbit_inter_token_latency_seconds", "Between consecutive tokens of a sequence",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("lowbit_request_latency_seconds", "From arrival to the last token",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.waiting = Gauge("lowbit_num_requests_waiting", "Sequences waiting for a KV-cache slot", registry=r)
        self.running = Gauge("lowbit_num_requests_running", "Sequences holding a KV-cache slot", registry=r)
        self.cache_usage = Gauge("lowbit_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use", registry=r)
        self.prefix = Gauge("lowbit_prefix_cache", "Prefix-cache counters since start (queries: prompts looked "
                            "up; query_blocks / hit_blocks: full blocks looked up / found; hit_tokens)", ["counter"],
                            registry=r)
        Gauge("lowbit_model_info", "The served model", ["model_name"], registry=r).labels(model_name).set(1)

    def token(self, seconds: float, first: bool) -> None:
        """One generated token, `seconds` after its sequence's previous one (or its arrival)."""
        (self.ttft if first else self.itl).observe(seconds)

    def generated(self, n: int) -> None:
        """n tokens generated (counted once per hand-over: the counter's lock is taken once)."""
        if n:
            self.generation_tokens.inc(n)

    def scheduler(self, waiting: int, running: int, engine) -> None:
        self.waiting.set(waiting)
        self.running.set(running)
        blocks = getattr(engine, "blocks", None)  # the paged engine's block manager
        if blocks is not None and blocks.num_blocks:
            self.cache_usage.set(1 - blocks.free_blocks / blocks.num_blocks)
            stats = engine.prefix_cache_stats()
            for key in ("queries", "query_blocks", "hit_blocks", "hit_tokens"):
                if key in stats:
                    self.prefix.labels(key).set(stats[key])
        else:
            self.cache_usage.set(1 - engine.free_slots / engine.num_slots)

    def render(self) -> bytes:
        return generate_latest(self.registry)
