"""Prometheus metrics of the server (`GET /metrics`), all named ``backplane:*``.

Each app gets its own CollectorRegistry, so several servers in one process
(tests) do not collide. Engine-side numbers (running/waiting requests, KV
cache usage, prefix cache counters) are read from the engine's latest stats
snapshot at scrape time by a custom collector; per-request numbers (token
counters, latencies, finish reasons) are recorded as outputs stream out.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from backplane.outputs import RequestOutput

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
_ITL_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
)
_E2E_BUCKETS = (
    0.1,
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
)


class _EngineStatsCollector(Collector):
    """Gauges and counters read from `AsyncEngine.get_stats()` at scrape time."""

    def __init__(self, engine, model_name: str) -> None:
        self._engine = engine
        self._model_name = model_name

    def collect(self):
        stats = self._engine.get_stats()
        labels = ["model_name"]
        values = [self._model_name]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(f"backplane:{name}", doc, labels=labels)
            g.add_metric(values, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(f"backplane:{name}", doc, labels=labels)
            c.add_metric(values, value)
            return c

        yield gauge(
            "engine_healthy",
            "1 while the engine loop is running, 0 once it died or stopped",
            0.0 if self._engine.errored else 1.0,
        )
        if stats is None:
            return
        yield gauge("num_requests_running", "Requests in the running batch", stats.num_running)
        yield gauge("num_requests_waiting", "Requests waiting to be scheduled", stats.num_waiting)
        yield gauge(
            "kv_cache_usage_perc", "Fraction of KV cache blocks in use (0..1)", stats.kv_cache_usage
        )
        yield gauge("num_kv_blocks", "KV cache blocks in total", stats.num_total_blocks)
        yield gauge("num_free_kv_blocks", "KV cache blocks free", stats.num_free_blocks)
        yield counter(
            "prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache",
            stats.prefix_cache_queries,
        )
        yield counter(
            "prefix_cache_hits", "Prompt tokens found in the prefix cache", stats.prefix_cache_hits
        )


class ServerMetrics:
    """The metrics of one server app, in their own registry."""

    def __init__(self, engine, model_name: str) -> None:
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        self._model_name = model_name
        self.registry.register(_EngineStatsCollector(engine, model_name))
        self.prompt_tokens = Counter(
            "backplane:prompt_tokens", "Prompt tokens processed", labels, registry=self.registry
        )
        self.generation_tokens = Counter(
            "backplane:generation_tokens", "Tokens generated", labels, registry=self.registry
        )
        self.request_success = Counter(
            "backplane:request_success",
            "Requests finished, by finish reason (first completion's when n > 1)",
            labels + ["finished_reason"],
            registry=self.registry,
        )
        self.ttft = Histogram(
            "backplane:time_to_first_token_seconds",
            "Seconds from arrival to the first generated token",
            labels,
            buckets=_TTFT_BUCKETS,
            registry=self.registry,
        )
        self.itl = Histogram(
            "backplane:inter_token_latency_seconds",
            "Seconds between successive generated tokens of a request",
            labels,
            buckets=_ITL_BUCKETS,
            registry=self.registry,
        )
        self.e2e = Histogram(
            "backplane:e2e_request_latency_seconds",
            "Seconds from arrival to the last token",
            labels,
            buckets=_E2E_BUCKETS,
            registry=self.registry,
        )
        # Create the labelled series now, so that they read 0 (not absent) before traffic.
        for metric in (self.prompt_tokens, self.generation_tokens, self.ttft, self.itl, self.e2e):
            metric.labels(model_name)
        for reason in ("stop", "length", "abort"):
            self.request_success.labels(model_name, reason)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)

    async def track(
        self, stream: AsyncIterator[RequestOutput], arrival_time: float
    ) -> AsyncIterator[RequestOutput]:
        """Pass ``stream`` through, recording token counts and latencies on the way.

        A request that ends without finishing (client gone, engine stopped) is
        counted as finished_reason="abort".
        """
        name = self._model_name
        seen_tokens = 0
        last_token_time: float | None = None
        finished = False
        try:
            async for output in stream:
                now = time.time()
                total = sum(len(c.token_ids) for c in output.outputs)
                new = total - seen_tokens
                if new > 0:
                    if last_token_time is None:
                        self.ttft.labels(name).observe(now - arrival_time)
                        self.prompt_tokens.labels(name).inc(len(output.prompt_token_ids))
                    else:
                        # several tokens in one step (n > 1, coalesced outputs) share the gap
                        gap = (now - last_token_time) / new
                        for _ in range(new):
                            self.itl.labels(name).observe(gap)
                    self.generation_tokens.labels(name).inc(new)
                    seen_tokens = total
                    last_token_time = now
                if output.finished:
                    finished = True
                    self.e2e.labels(name).observe(now - arrival_time)
                    # one count per request; with n > 1 the first completion's reason
                    reason = output.outputs[0].finish_reason if output.outputs else None
                    self.request_success.labels(name, reason or "abort").inc()
                yield output
        finally:
            if not finished:
                self.request_success.labels(name, "abort").inc()
