"""Prometheus metrics of the server (`GET /metrics`), named ``backplane:*`` and ``vllm:*``.

Each app gets its own CollectorRegistry, so several servers in one process
(tests) do not collide. Engine-side numbers (running/waiting requests, KV
cache usage, prefix cache counters, preemptions) are read from the engine's
latest stats snapshot at scrape time by a custom collector; per-request
numbers (token counters, latencies, finish reasons, request sizes) are
recorded as outputs stream out.

Data parallel (``--data-parallel-size``): the engine gauges and counters are
the totals over every engine core; ``backplane:dp_rank_*`` families give each
rank's own numbers, labelled ``engine="<rank>"`` as vLLM labels its engines
(one series, ``engine="0"``, with a single core). They have no ``vllm:`` alias:
vLLM's names would carry the totals and the ranks in one family, which a
``sum()`` would count twice.

Every metric is recorded once, under its ``backplane:`` name; `_VLLM_ALIASES`
maps those names to the ``vllm:`` names that vLLM's Grafana dashboard and
other vLLM tooling query, and `_Aliased` exposes each sample again under
them at scrape time, so both names always read the same.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
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
_N_BUCKETS = (1, 2, 5, 10, 20)

# backplane family -> the vLLM names it is also exposed as (same samples and labels).
# vllm:gpu_cache_usage_perc and vllm:time_per_output_token_seconds are the older
# names vLLM kept next to kv_cache_usage_perc and inter_token_latency_seconds.
_VLLM_ALIASES: dict[str, tuple[str, ...]] = {
    "backplane:num_requests_running": ("vllm:num_requests_running",),
    "backplane:num_requests_waiting": ("vllm:num_requests_waiting",),
    "backplane:kv_cache_usage_perc": ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
    "backplane:num_preemptions": ("vllm:num_preemptions",),
    "backplane:prefix_cache_queries": ("vllm:prefix_cache_queries",),
    "backplane:prefix_cache_hits": ("vllm:prefix_cache_hits",),
    "backplane:spec_decode_num_drafts": ("vllm:spec_decode_num_drafts",),
    "backplane:spec_decode_num_draft_tokens": ("vllm:spec_decode_num_draft_tokens",),
    "backplane:spec_decode_num_accepted_tokens": ("vllm:spec_decode_num_accepted_tokens",),
    "backplane:spec_decode_num_accepted_tokens_per_pos": (
        "vllm:spec_decode_num_accepted_tokens_per_pos",),
    "backplane:prompt_tokens": ("vllm:prompt_tokens",),
    "backplane:generation_tokens": ("vllm:generation_tokens",),
    "backplane:request_success": ("vllm:request_success",),
    "backplane:time_to_first_token_seconds": ("vllm:time_to_first_token_seconds",),
    "backplane:inter_token_latency_seconds": (
        "vllm:inter_token_latency_seconds",
        "vllm:time_per_output_token_seconds",
    ),
    "backplane:e2e_request_latency_seconds": ("vllm:e2e_request_latency_seconds",),
    "backplane:request_decode_time_seconds": ("vllm:request_decode_time_seconds",),
    "backplane:request_prompt_tokens": ("vllm:request_prompt_tokens",),
    "backplane:request_generation_tokens": ("vllm:request_generation_tokens",),
    "backplane:request_max_num_generation_tokens": ("vllm:request_max_num_generation_tokens",),
    "backplane:request_params_n": ("vllm:request_params_n",),
}


def _one_two_five_buckets(limit: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to ``limit`` (>= 1), for token-count histograms."""
    return [m * 10**e for e in range(len(str(limit))) for m in (1, 2, 5) if m * 10**e <= limit]


def _renamed(family: Metric, name: str) -> Metric:
    """A copy of ``family`` under ``name`` (sample suffixes such as _total, _bucket kept)."""
    copy = Metric(name, f"{family.documentation} (same as {family.name})", family.type)
    copy.samples = [s._replace(name=name + s.name[len(family.name) :]) for s in family.samples]
    return copy


class _Aliased(Collector):
    """Collects ``sources`` and yields each family plus its copies under `_VLLM_ALIASES`."""

    def __init__(self, *sources: Collector) -> None:
        self._sources = sources

    def collect(self):
        for source in self._sources:
            for family in source.collect():
                yield family
                for alias in _VLLM_ALIASES.get(family.name, ()):
                    yield _renamed(family, alias)


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
        yield counter(
            "num_preemptions", "Requests preempted (KV freed, to recompute)", stats.num_preemptions
        )
        spec = stats.spec_decode
        if spec is not None:
            yield counter("spec_decode_num_drafts",
                          "Speculative verifications (one request's drafts in one step)",
                          spec["num_drafts"])
            yield counter("spec_decode_num_draft_tokens", "Draft tokens verified",
                          spec["num_draft_tokens"])
            yield counter("spec_decode_num_accepted_tokens", "Draft tokens accepted",
                          spec["num_accepted_tokens"])
            per_position = CounterMetricFamily(
                "backplane:spec_decode_num_accepted_tokens_per_pos",
                "Draft tokens accepted, by position in the draft (0 = first)",
                labels=labels + ["position"])
            for position, accepted in enumerate(spec["accepted_per_position"]):
                per_position.add_metric(values + [str(position)], accepted)
            yield per_position
        yield from self._per_rank(stats)

    def _per_rank(self, stats):
        """The ``backplane:dp_rank_*`` families: each data-parallel rank's own numbers."""
        ranks = stats.dp_ranks
        if ranks is None:  # one engine core: rank 0 is the whole engine
            ranks = [{
                "num_running": stats.num_running, "num_waiting": stats.num_waiting,
                "kv_cache_usage": stats.kv_cache_usage,
                "num_total_blocks": stats.num_total_blocks,
                "num_free_blocks": stats.num_free_blocks,
                "num_generated_tokens": stats.num_generated_tokens,
                "num_preemptions": stats.num_preemptions,
                "prefix_cache_queries": stats.prefix_cache_queries,
                "prefix_cache_hits": stats.prefix_cache_hits,
            }]
        labels = ["model_name", "engine"]
        for kind, name, key, doc in _PER_RANK:
            family = (GaugeMetricFamily if kind == "gauge" else CounterMetricFamily)(
                f"backplane:dp_rank_{name}", f"{doc}, per data-parallel rank", labels=labels)
            for rank, numbers in enumerate(ranks):
                family.add_metric([self._model_name, str(rank)], numbers.get(key, 0))
            yield family


# (type, name after backplane:dp_rank_, EngineStats key, help) of the per-rank families.
_PER_RANK = (
    ("gauge", "num_requests_running", "num_running", "Requests in the running batch"),
    ("gauge", "num_requests_waiting", "num_waiting", "Requests waiting to be scheduled"),
    ("gauge", "kv_cache_usage_perc", "kv_cache_usage", "Fraction of KV cache blocks in use"),
    ("gauge", "num_kv_blocks", "num_total_blocks", "KV cache blocks in total"),
    ("gauge", "num_free_kv_blocks", "num_free_blocks", "KV cache blocks free"),
    ("counter", "generation_tokens", "num_generated_tokens", "Tokens generated"),
    ("counter", "num_preemptions", "num_preemptions", "Requests preempted"),
    ("counter", "prefix_cache_queries", "prefix_cache_queries",
     "Prompt tokens looked up in the prefix cache"),
    ("counter", "prefix_cache_hits", "prefix_cache_hits",
     "Prompt tokens found in the prefix cache"),
)


class ServerMetrics:
    """The metrics of one server app, in their own registry."""

    def __init__(self, engine, model_name: str) -> None:
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        self._model_name = model_name
        token_buckets = _one_two_five_buckets(int(engine.config.max_model_len))
        # registry=None: _Aliased below collects them, with their vllm: names, in one go.
        self.prompt_tokens = Counter(
            "backplane:prompt_tokens", "Prompt tokens processed", labels, registry=None
        )
        self.generation_tokens = Counter(
            "backplane:generation_tokens", "Tokens generated", labels, registry=None
        )
        self.request_success = Counter(
            "backplane:request_success",
            "Requests finished, by finish reason (first completion's when n > 1)",
            labels + ["finished_reason"],
            registry=None,
        )

        def histogram(name: str, doc: str, buckets) -> Histogram:
            return Histogram(f"backplane:{name}", doc, labels, buckets=buckets, registry=None)

        self.ttft = histogram(
            "time_to_first_token_seconds",
            "Seconds from arrival to the first generated token",
            _TTFT_BUCKETS,
        )
        self.itl = histogram(
            "inter_token_latency_seconds",
            "Seconds between successive generated tokens of a request",
            _ITL_BUCKETS,
        )
        self.e2e = histogram(
            "e2e_request_latency_seconds", "Seconds from arrival to the last token", _E2E_BUCKETS
        )
        self.decode_time = histogram(
            "request_decode_time_seconds",
            "Seconds from a request's first generated token to its last",
            _E2E_BUCKETS,
        )
        self.request_prompt_tokens = histogram(
            "request_prompt_tokens", "Prompt tokens of each finished request", token_buckets
        )
        self.request_generation_tokens = histogram(
            "request_generation_tokens",
            "Tokens generated by each finished request (all n completions)",
            token_buckets,
        )
        self.request_max_generation_tokens = histogram(
            "request_max_num_generation_tokens",
            "Tokens of the longest completion of each finished request",
            token_buckets,
        )
        self.request_n = histogram("request_params_n", "The n of each finished request", _N_BUCKETS)
        per_request = (
            self.prompt_tokens,
            self.generation_tokens,
            self.request_success,
            self.ttft,
            self.itl,
            self.e2e,
            self.decode_time,
            self.request_prompt_tokens,
            self.request_generation_tokens,
            self.request_max_generation_tokens,
            self.request_n,
        )
        self.registry.register(_Aliased(_EngineStatsCollector(engine, model_name), *per_request))
        # Create the labelled series now, so that they read 0 (not absent) before traffic.
        for metric in per_request:
            if metric is not self.request_success:
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
        first_token_time: float | None = None
        last_token_time: float | None = None
        finished = False
        try:
            async for output in stream:
                now = time.time()
                total = sum(len(c.token_ids) for c in output.outputs)
                new = total - seen_tokens
                if new > 0:
                    if last_token_time is None:
                        first_token_time = now
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
                    self._observe_finished(output, total, first_token_time, last_token_time)
                yield output
        finally:
            if not finished:
                self.request_success.labels(name, "abort").inc()

    def _observe_finished(
        self,
        output: RequestOutput,
        num_generated: int,
        first_token_time: float | None,
        last_token_time: float | None,
    ) -> None:
        """The per-request histograms, once a request has its final output."""
        name = self._model_name
        decode = 0.0 if first_token_time is None else last_token_time - first_token_time
        self.decode_time.labels(name).observe(decode)
        self.request_prompt_tokens.labels(name).observe(len(output.prompt_token_ids))
        self.request_generation_tokens.labels(name).observe(num_generated)
        longest = max((len(c.token_ids) for c in output.outputs), default=0)
        self.request_max_generation_tokens.labels(name).observe(longest)
        self.request_n.labels(name).observe(len(output.outputs))
