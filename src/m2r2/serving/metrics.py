"""The server's Prometheus metrics (``GET /metrics``), through ``prometheus-client``: requests by endpoint and
status, tokens in and out, recent tokens/s, queue length, active slots, and time-to-first-token and per-token
latency histograms."""

from __future__ import annotations

import threading
import time
from collections import deque


class Metrics:
    def __init__(self, batcher):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        self.registry = r = CollectorRegistry()
        self.requests = Counter("m2r2_requests", "finished HTTP requests", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("m2r2_prompt_tokens", "prompt tokens of admitted requests", registry=r)
        self.completion_tokens = Counter("m2r2_completion_tokens", "generated tokens", registry=r)
        self.ttft = Histogram("m2r2_time_to_first_token_seconds", "from request to its first token", registry=r,
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.tpot = Histogram("m2r2_time_per_output_token_seconds", "per-token latency after the first", registry=r,
                              buckets=(0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28))
        Gauge("m2r2_queue_length", "requests waiting for a slot", registry=r).set_function(batcher.queued)
        Gauge("m2r2_active_slots", "slots holding a request", registry=r).set_function(batcher.active)
        Gauge("m2r2_slots", "slots (--parallel)", registry=r).set(batcher.parallel)
        Gauge("m2r2_tokens_per_second", "generated tokens per second over the last 10 s", registry=r) \
            .set_function(self._rate)
        self._window: deque = deque()
        self._lock = threading.Lock()
        self.batcher = batcher

    def _rate(self) -> float:
        now = time.perf_counter()
        with self._lock:
            self._window.append((now, self.batcher.tokens_out))
            while len(self._window) > 1 and now - self._window[0][0] > 10:
                self._window.popleft()
            (t0, n0), (t1, n1) = self._window[0], self._window[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0

    def started(self, handle) -> None:
        self.prompt_tokens.inc(len(handle.request.prompt_ids))

    def request(self, path: str, status: int) -> None:
        self.requests.labels(path, str(status)).inc()

    def finished(self, handle, last, status: int, path: str) -> None:
        self.requests.labels(path, str(status)).inc()
        if last is not None:
            self.completion_tokens.inc(last.completion_tokens)
            if handle.first_token is not None:
                self.ttft.observe(handle.first_token - handle.submitted)
                if last.completion_tokens > 1 and handle.finished is not None:
                    self.tpot.observe((handle.finished - handle.first_token) / (last.completion_tokens - 1))

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        self._rate()
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
