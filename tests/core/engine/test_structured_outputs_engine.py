"""Structured outputs through `LLM` (no server): n > 1 with seeds, async scheduling,
preemption with recompute, prefix caching, and a grammar that fails to compile.

The demo model never writes JSON (or dates) by itself: valid outputs are the constraint's
work. Every KV block is back in the pool at the end of each scenario.
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from backplane import LLM, SamplingParams
from backplane.core.structured_outputs import StructuredOutputManager

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 1, "maxItems": 2},
    },
    "required": ["name", "age", "tags"],
}
DATE = r"\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])"
CHOICES = ["red", "green", "blue"]
# Long enough that several of them cannot hold their KV blocks at once (preemption).
LONG = r"[a-z]{60}\.[a-z]{60}"
PROMPT = "Answer the question, in detail, as well as you can:"


def _llm(**overrides) -> LLM:
    kwargs = dict(model="backplane/demo_model", device="cpu", seed=0, max_model_len=256)
    kwargs.update(overrides)
    return LLM(**kwargs)


def _mixed_params(seed: int) -> list[SamplingParams]:
    return [
        SamplingParams(n=2, seed=seed, temperature=1.0, max_tokens=200,
                       structured_outputs={"json": SCHEMA}),
        SamplingParams(n=2, seed=seed + 1, temperature=1.0, max_tokens=30,
                       structured_outputs={"regex": DATE}),
        SamplingParams(n=2, seed=seed + 2, temperature=1.5, max_tokens=10,
                       structured_outputs={"choice": CHOICES}),
        SamplingParams(temperature=0, max_tokens=20),  # unconstrained, in the same batch
    ]


def _check_mixed(outputs) -> list[list[str]]:
    texts = []
    json_out, date_out, choice_out, free_out = outputs
    assert len(json_out.outputs) == len(date_out.outputs) == len(choice_out.outputs) == 2
    for c in json_out.outputs:
        assert c.finish_reason == "stop", c.text
        jsonschema.validate(json.loads(c.text), SCHEMA)
    for c in date_out.outputs:
        assert re.fullmatch(DATE, c.text), c.text
    for c in choice_out.outputs:
        assert c.text in CHOICES
    assert len(free_out.outputs[0].token_ids) == 20 or free_out.outputs[0].finish_reason == "stop"
    for out in outputs:
        texts.append([c.text for c in out.outputs])
    return texts


def _all_blocks_free(llm: LLM) -> None:
    stats = llm.llm_engine.get_stats()
    assert stats.num_running == 0 and stats.num_waiting == 0
    assert stats.num_free_blocks == stats.num_total_blocks, stats
    assert stats.kv_cache_usage == 0


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_json_regex_choice_with_n_and_seeds(async_scheduling):
    llm = _llm(async_scheduling=async_scheduling)
    first = _check_mixed(llm.generate([PROMPT] * 4, _mixed_params(11), use_tqdm=False))
    again = _check_mixed(llm.generate([PROMPT] * 4, _mixed_params(11), use_tqdm=False))
    assert first == again  # seeded: the same constrained samples
    _all_blocks_free(llm)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_preemption_and_prefix_caching_keep_outputs_valid(async_scheduling):
    llm = _llm(num_kv_blocks=24, block_size=8, max_model_len=192, enable_prefix_caching=True,
               async_scheduling=async_scheduling)
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=140,
                             structured_outputs={"regex": LONG}) for i in range(4)]
    params.append(SamplingParams(temperature=0, max_tokens=150, structured_outputs={
        "json": SCHEMA}))
    outs = llm.generate([PROMPT] * len(params), params, use_tqdm=False)
    for out in outs[:4]:
        c = out.outputs[0]
        assert re.fullmatch(LONG, c.text), (c.finish_reason, c.text)
    jsonschema.validate(json.loads(outs[4].outputs[0].text), SCHEMA)
    stats = llm.llm_engine.get_stats()
    assert stats.num_preemptions > 0, stats
    assert stats.prefix_cache_hits > 0, stats
    _all_blocks_free(llm)


def test_grammar_compile_failure_aborts_only_that_request(monkeypatch):
    """A spec validate() accepts but compilation fails (injected) ends the request with
    finish_reason "abort"; the engine keeps serving others."""
    real = StructuredOutputManager.compile

    def failing(self, params):
        if params.regex == "boom":
            raise RuntimeError("injected compile failure")
        return real(self, params)

    monkeypatch.setattr(StructuredOutputManager, "compile", failing)
    llm = _llm()
    outs = llm.generate([PROMPT] * 3, [
        SamplingParams(max_tokens=10, structured_outputs={"regex": "boom"}),
        SamplingParams(temperature=0, max_tokens=30, structured_outputs={"regex": DATE}),
        SamplingParams(temperature=0, max_tokens=5),
    ], use_tqdm=False)
    assert outs[0].outputs[0].finish_reason == "abort"
    assert outs[0].outputs[0].token_ids == []
    assert re.fullmatch(DATE, outs[1].outputs[0].text)
    assert len(outs[2].outputs[0].token_ids) == 5
    # Still serving, constrained and not.
    again = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=10,
                                                  structured_outputs={"choice": CHOICES}),
                         use_tqdm=False)
    assert again[0].outputs[0].text in CHOICES
    _all_blocks_free(llm)


@pytest.mark.parametrize("speculative", [
    {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1},
    {"method": "draft_model", "model": "backplane/demo_model", "num_speculative_tokens": 3},
])
def test_constrained_requests_speculate_exactly(speculative):
    """Grammars mask every verified position (the matcher walks the drafts and rolls
    back): greedy constrained output equals decoding without speculation, and sampled
    constrained output is valid; drafts were verified and accepted along the way."""
    plain, spec = _llm(), _llm(speculative_config=speculative)
    greedy = [
        SamplingParams(temperature=0, max_tokens=200, structured_outputs={"json": SCHEMA}),
        SamplingParams(temperature=0, max_tokens=30, structured_outputs={"regex": DATE}),
        SamplingParams(temperature=0, max_tokens=10, structured_outputs={"choice": CHOICES}),
        SamplingParams(temperature=0, max_tokens=20),
    ]
    want = plain.generate([PROMPT] * 4, greedy, use_tqdm=False)
    got = spec.generate([PROMPT] * 4, greedy, use_tqdm=False)
    for a, b in zip(got, want, strict=True):
        assert (a.outputs[0].token_ids, a.outputs[0].finish_reason) == (
            b.outputs[0].token_ids, b.outputs[0].finish_reason)
    _check_mixed(spec.generate([PROMPT] * 4, _mixed_params(3), use_tqdm=False))
    stats = spec.llm_engine.get_stats()
    assert stats.spec_decode["num_accepted_tokens"] > 0
    assert stats.num_free_blocks == stats.num_total_blocks
