"""Unit tests of the bench helpers: workloads, percentiles, shapes, SLO parsing, arrivals."""

from __future__ import annotations

import math

import pytest

from backplane.benchmarks.make_model import SHAPES, build_config
from backplane.benchmarks.memory import kv_bytes_per_token, num_parameters
from backplane.benchmarks.report import percentile, summarize
from backplane.benchmarks.serve import arrival_gaps, parse_goodput
from backplane.benchmarks.workload import WorkloadSpec, build_requests


def test_mixed_workload_lengths_and_determinism():
    spec = WorkloadSpec(num_prompts=64, output_len=128, input_len_range=(64, 512), seed=3)
    reqs = build_requests(spec, 10, 500)
    assert len(reqs) == 64
    assert all(64 <= r.prompt_len <= 512 for r in reqs)
    assert all(10 <= t < 500 for r in reqs for t in r.prompt_token_ids)
    assert len({r.prompt_len for r in reqs}) > 10  # lengths really vary
    assert [r.prompt_token_ids for r in build_requests(spec, 10, 500)] == [
        r.prompt_token_ids for r in reqs
    ]


def test_shared_prefix_workload():
    spec = WorkloadSpec(num_prompts=8, output_len=4, input_len=32, prefix_len=400, seed=1)
    reqs = build_requests(spec, 0, 1000)
    prefixes = {tuple(r.prompt_token_ids[:400]) for r in reqs}
    owns = {tuple(r.prompt_token_ids[400:]) for r in reqs}
    assert len(prefixes) == 1 and len(owns) == 8
    assert all(r.prompt_len == 432 for r in reqs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_prompts=0, output_len=1, input_len=4), "num_prompts (0)"),
        (dict(num_prompts=1, output_len=0, input_len=4), "output_len (0)"),
        (dict(num_prompts=1, output_len=1, input_len_range=(9, 3)), "input_len_range (9, 3)"),
        (dict(num_prompts=1, output_len=1), "input_len (None)"),
    ],
)
def test_workload_errors_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        WorkloadSpec(**kwargs).validate()


def test_percentiles():
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert math.isnan(percentile([], 50))
    s = summarize([1.0, 2.0, 3.0])
    assert s["mean"] == 2.0 and s["median"] == 2.0 and s["p90"] == pytest.approx(2.8)


def test_real_shapes_have_the_documented_sizes():
    qwen = build_config(SHAPES["qwen2-0.5b"], "bfloat16", 0)
    assert num_parameters(qwen) == 494_032_768
    # 24 layers x 2 (K, V) x 2 heads x 64 dims x 2 bytes
    assert kv_bytes_per_token(qwen, "bfloat16") == 12_288
    llama = build_config(SHAPES["llama-1b"], "bfloat16", 0)
    assert 1.23e9 < num_parameters(llama) < 1.24e9


def test_goodput_parsing():
    assert parse_goodput(["ttft:500", "tpot:50"]) == {"ttft": 0.5, "tpot": 0.05}
    with pytest.raises(ValueError, match="NAME:MILLISECONDS"):
        parse_goodput(["latency:5"])
    with pytest.raises(ValueError, match="not a number"):
        parse_goodput(["ttft:fast"])


def test_arrival_gaps():
    assert arrival_gaps(5, math.inf, 1.0, 0) == [0.0] * 5
    gaps = arrival_gaps(4000, 10.0, 1.0, 0)
    assert sum(gaps) / len(gaps) == pytest.approx(0.1, rel=0.1)
    with pytest.raises(ValueError, match="request_rate"):
        arrival_gaps(3, 0.0, 1.0, 0)
