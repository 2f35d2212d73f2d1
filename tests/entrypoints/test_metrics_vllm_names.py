"""/metrics also speaks vLLM's names: each vllm:* series mirrors a backplane:* one.

vLLM's Grafana dashboard (and other vLLM tooling) queries these names with a
``model_name`` label, ``finished_reason`` on vllm:request_success_total.
"""

from __future__ import annotations

import re

import pytest

from tests.entrypoints.conftest import SERVED_NAME
from tests.entrypoints.server_utils import metric, wait_until_idle

# vLLM family -> the backplane family it mirrors, and the Prometheus type of both.
VLLM_FAMILIES = {
    "vllm:num_requests_running": ("backplane:num_requests_running", "gauge"),
    "vllm:num_requests_waiting": ("backplane:num_requests_waiting", "gauge"),
    "vllm:kv_cache_usage_perc": ("backplane:kv_cache_usage_perc", "gauge"),
    "vllm:gpu_cache_usage_perc": ("backplane:kv_cache_usage_perc", "gauge"),
    "vllm:num_preemptions": ("backplane:num_preemptions", "counter"),
    "vllm:prefix_cache_queries": ("backplane:prefix_cache_queries", "counter"),
    "vllm:prefix_cache_hits": ("backplane:prefix_cache_hits", "counter"),
    "vllm:prompt_tokens": ("backplane:prompt_tokens", "counter"),
    "vllm:generation_tokens": ("backplane:generation_tokens", "counter"),
    "vllm:request_success": ("backplane:request_success", "counter"),
    "vllm:time_to_first_token_seconds": ("backplane:time_to_first_token_seconds", "histogram"),
    "vllm:inter_token_latency_seconds": ("backplane:inter_token_latency_seconds", "histogram"),
    "vllm:time_per_output_token_seconds": ("backplane:inter_token_latency_seconds", "histogram"),
    "vllm:e2e_request_latency_seconds": ("backplane:e2e_request_latency_seconds", "histogram"),
    "vllm:request_decode_time_seconds": ("backplane:request_decode_time_seconds", "histogram"),
    "vllm:request_prompt_tokens": ("backplane:request_prompt_tokens", "histogram"),
    "vllm:request_generation_tokens": ("backplane:request_generation_tokens", "histogram"),
    "vllm:request_max_num_generation_tokens": (
        "backplane:request_max_num_generation_tokens",
        "histogram",
    ),
    "vllm:request_params_n": ("backplane:request_params_n", "histogram"),
}
# vLLM has these too, but backplane lacks the data (see docs/serving.md, Metrics).
NOT_EXPOSED = ("vllm:request_queue_time_seconds", "vllm:request_params_max_tokens")

_SAMPLE = re.compile(r"^([^\s{]+)(?:\{(.*)\})? (\S+)$")


def _family(text: str, family: str) -> dict[tuple[str, tuple], float]:
    """{(suffix, sorted label pairs): value} of every sample of ``family`` in ``text``."""
    out = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m or not (m[1] == family or m[1].startswith(family + "_")):
            continue
        labels = tuple(sorted(re.findall(r'(\w+)="([^"]*)"', m[2] or "")))
        out[(m[1][len(family) :], labels)] = float(m[3])
    return out


def _delta(before: str, after: str, name: str, **labels) -> float:
    return metric(after, name, **labels) - metric(before, name, **labels)


def _complete(server, **body) -> dict:
    with server.client() as c:
        r = c.post("/v1/completions", json={"temperature": 0, "ignore_eos": True, **body})
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module")
def scrape(server):
    """/metrics after a little traffic (length- and stop-finished, n=2), once idle."""
    _complete(server, prompt="In the beginning", max_tokens=6)
    _complete(server, prompt="In the beginning", max_tokens=6, n=2, temperature=1.0, seed=3)
    every_token = list(range(512))  # whatever comes first ends it: finish_reason "stop"
    done = _complete(server, prompt=[5, 6, 7], max_tokens=8, stop_token_ids=every_token)
    assert done["choices"][0]["finish_reason"] == "stop"
    return wait_until_idle(server)


@pytest.mark.parametrize("vllm_name", sorted(VLLM_FAMILIES))
def test_vllm_series_mirrors_backplane(scrape, vllm_name):
    backplane_name, kind = VLLM_FAMILIES[vllm_name]
    exposed = vllm_name + "_total" if kind == "counter" else vllm_name
    assert f"# TYPE {exposed} {kind}" in scrape
    mirrored = _family(scrape, vllm_name)
    assert mirrored, f"{vllm_name} missing"
    assert mirrored == _family(scrape, backplane_name)
    for _suffix, labels in mirrored:
        assert dict(labels)["model_name"] == SERVED_NAME


def test_request_success_has_finished_reason(scrape):
    for reason in ("stop", "length", "abort"):
        metric(scrape, "vllm:request_success_total", model_name=SERVED_NAME, finished_reason=reason)
    assert metric(scrape, "vllm:request_success_total", finished_reason="stop") >= 1
    assert metric(scrape, "vllm:request_success_total", finished_reason="length") >= 2
    assert metric(scrape, "vllm:request_params_n_bucket", le="2.0") >= 1


def test_idle_gauges(scrape):
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting"):
        assert metric(scrape, name, model_name=SERVED_NAME) == 0
    usage = metric(scrape, "vllm:kv_cache_usage_perc")
    assert usage == metric(scrape, "vllm:gpu_cache_usage_perc") and 0 <= usage <= 1


def test_not_exposed(scrape):
    for name in NOT_EXPOSED:
        assert name not in scrape


def test_counters_move_by_the_tokens(server):
    """Two identical 40-token prompts generating 4 tokens each, then one n=2 request."""
    prompt = [(i * 37 + 11) % 480 for i in range(40)]  # used by no other test
    before = wait_until_idle(server)
    for _ in range(2):
        _complete(server, prompt=prompt, max_tokens=4)
    after = wait_until_idle(server)
    assert _delta(before, after, "vllm:prompt_tokens_total") == 80
    assert _delta(before, after, "vllm:generation_tokens_total") == 8
    assert _delta(before, after, "vllm:request_success_total", finished_reason="length") == 2
    assert _delta(before, after, "vllm:request_prompt_tokens_sum") == 80
    assert _delta(before, after, "vllm:request_generation_tokens_sum") == 8
    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds"):
        assert _delta(before, after, f"vllm:{name}_count") == 2
    itl = _delta(before, after, "vllm:inter_token_latency_seconds_count")
    assert 0 < itl <= 6  # at most one gap per token after the first
    assert _delta(before, after, "vllm:time_per_output_token_seconds_count") == itl
    # Prefix cache, in tokens: each lookup queries the whole prompt; the second
    # finds the two full 16-token blocks (the last token is always computed).
    assert _delta(before, after, "vllm:prefix_cache_queries_total") == 80
    assert _delta(before, after, "vllm:prefix_cache_hits_total") == 32

    _complete(server, prompt=prompt, max_tokens=3, n=2, temperature=1.0, seed=0)
    after_n = wait_until_idle(server)
    assert _delta(after, after_n, "vllm:request_params_n_sum") == 2
    assert _delta(after, after_n, "vllm:request_params_n_count") == 1
    assert _delta(after, after_n, "vllm:generation_tokens_total") == 6
    assert _delta(after, after_n, "vllm:request_generation_tokens_sum") == 6
    assert _delta(after, after_n, "vllm:request_max_num_generation_tokens_sum") == 3
    assert _delta(after, after_n, "vllm:prompt_tokens_total") == 40  # once per request
