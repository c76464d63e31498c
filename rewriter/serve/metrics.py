"""The server's Prometheus metrics, in a registry of its own (two servers in one process do not mix).

The engine loop thread updates them; GET /metrics renders them in the Prometheus text format.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
    """Requests running / waiting, tokens in and out, TTFT and inter-token latency, KV blocks, engine steps."""

    def __init__(self, num_blocks: int) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.running = Gauge("hfrewrite_requests_running", "Requests being generated", registry=r)
        self.waiting = Gauge("hfrewrite_requests_waiting", "Requests queued for admission", registry=r)
        self.finished = Counter("hfrewrite_requests_finished", "Requests ended, by finish reason", ["reason"],
                                registry=r)
        self.rejected = Counter("hfrewrite_requests_rejected", "Requests refused with 503 (queue full)", registry=r)
        self.prompt_tokens = Counter("hfrewrite_prompt_tokens", "Prompt tokens admitted", registry=r)
        self.generation_tokens = Counter("hfrewrite_generation_tokens", "Tokens generated", registry=r)
        self.steps = Counter("hfrewrite_engine_steps", "Engine steps (forwards) run", registry=r)
        self.peak_batch = Gauge("hfrewrite_peak_running_sequences", "Most sequences running in one step", registry=r)
        self.batch = Histogram("hfrewrite_step_sequences", "Sequences running per engine step",
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.ttft = Histogram("hfrewrite_time_to_first_token_seconds", "Arrival to first token", registry=r,
                              buckets=LATENCY_BUCKETS)
        self.itl = Histogram("hfrewrite_inter_token_latency_seconds", "Between consecutive tokens of a request",
                             registry=r, buckets=LATENCY_BUCKETS)
        self.e2e = Histogram("hfrewrite_request_latency_seconds", "Arrival to last token", registry=r,
                             buckets=LATENCY_BUCKETS)
        self.blocks_used = Gauge("hfrewrite_kv_blocks_used", "KV-cache blocks held by running requests", registry=r)
        self.blocks_total = Gauge("hfrewrite_kv_blocks_total", "KV-cache blocks in all", registry=r)
        self.blocks_total.set(num_blocks)

    def render(self) -> bytes:
        return generate_latest(self.registry)
