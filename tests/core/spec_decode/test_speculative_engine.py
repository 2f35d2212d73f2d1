"""Speculative decoding end to end: exact output, rollback, limits, statistics.

Every method must leave greedy output token for token what decoding without
speculation gives, with chunked prefill, prefix caching and preemption forced
by a small KV cache; sampled output must come from the same distribution.
"""

from __future__ import annotations

import pytest

from backplane import LLM, SamplingParams
from tests.fixtures.tiny_eagle import make_tiny_eagle
from tests.fixtures.tiny_models import make_tiny_model

# Repetitive prompts, so prompt lookup finds matches; one long enough to chunk.
PROMPTS = [
    "the quick brown fox jumps over the lazy dog the quick brown fox jumps over the",
    "hello hello hello hello hello",
    "one two three four one two three four one two three",
    "once upon a time there was a small village by the sea where people told stories "
    "about the old lighthouse and the keeper who lived alone by the sea where people told",
]
# Small cache and budget: prompts are chunked and requests get preempted.
TIGHT = dict(block_size=4, num_kv_blocks=32, max_num_batched_tokens=16, max_num_seqs=4,
             max_model_len=128)
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1,
         "prompt_lookup_max": 3}


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory) -> str:
    """A different, smaller model with the target's tokenizer (random: low acceptance)."""
    return make_tiny_model(tmp_path_factory.mktemp("draft") / "draft", "llama", seed=1,
                           num_hidden_layers=1)


@pytest.fixture(scope="module")
def reference(llama_model_dir):
    """Greedy outputs (with logprobs) without speculation."""
    llm = LLM(model=llama_model_dir, **TIGHT)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, logprobs=2)
    return llm.generate(PROMPTS, params, use_tqdm=False)


def _check_exact(llm: LLM, reference) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, logprobs=2)
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    for got, want in zip(outs, reference, strict=True):
        assert got.outputs[0].token_ids == want.outputs[0].token_ids
        assert got.outputs[0].text == want.outputs[0].text
        # Logprobs of accepted tokens are the target's, one entry per token.
        assert len(got.outputs[0].logprobs) == len(want.outputs[0].logprobs)
        for a, b in zip(got.outputs[0].logprobs, want.outputs[0].logprobs, strict=True):
            assert a.keys() == b.keys()
            for token in a:
                assert a[token].logprob == pytest.approx(b[token].logprob, abs=1e-4)
    core = llm.llm_engine.engine_core
    stats = llm.llm_engine.get_stats()
    assert stats.num_free_blocks == stats.num_total_blocks  # nothing leaked
    assert core.scheduler.num_preemptions > 0  # the tight cache forced recomputation
    assert stats.spec_decode["num_draft_tokens"] > 0
    return stats


def test_ngram_greedy_is_exact_under_chunking_preemption_and_prefix_caching(
        llama_model_dir, reference):
    llm = LLM(model=llama_model_dir, speculative_config=NGRAM, **TIGHT)
    stats = _check_exact(llm, reference)
    assert stats.spec_decode["num_accepted_tokens"] > 0
    # A second round hits the prefix cache and must still be exact.
    _check_exact(llm, reference)
    assert llm.llm_engine.get_stats().prefix_cache_hits > 0


def test_draft_model_greedy_is_exact(llama_model_dir, draft_dir, reference):
    config = {"method": "draft_model", "model": draft_dir, "num_speculative_tokens": 3}
    _check_exact(LLM(model=llama_model_dir, speculative_config=config, **TIGHT), reference)


@pytest.mark.parametrize("method", ["eagle", "eagle3"])
def test_eagle_heads_run_end_to_end_and_stay_exact(llama_model_dir, reference, method,
                                                   tmp_path):
    """A randomly initialised EAGLE head over the fixture target: acceptance is low,
    output must still be exactly the target's."""
    extra = {"aux_layer_ids": [0, 1, 2]} if method == "eagle3" else {}
    head = make_tiny_eagle(tmp_path / method, llama_model_dir, method, **extra)
    config = {"method": method, "model": head, "num_speculative_tokens": 3}
    _check_exact(LLM(model=llama_model_dir, speculative_config=config, **TIGHT), reference)


def test_draft_equal_to_target_accepts_every_draft(llama_model_dir, reference):
    """The upper bound, and a check that the draft's KV cache follows the target's:
    a draft model identical to the target proposes exactly the target's tokens."""
    config = {"method": "draft_model", "model": llama_model_dir, "num_speculative_tokens": 4}
    stats = _check_exact(LLM(model=llama_model_dir, speculative_config=config, **TIGHT),
                         reference)
    spec = stats.spec_decode
    assert spec["num_accepted_tokens"] == spec["num_draft_tokens"]
    assert stats.spec_mean_accepted_length > 4


def test_stop_strings_max_tokens_and_n(llama_model_dir, reference):
    plain = LLM(model=llama_model_dir, max_model_len=192, num_kv_blocks=96)
    spec = LLM(model=llama_model_dir, max_model_len=192, num_kv_blocks=96,
               speculative_config=NGRAM)
    text = reference[0].outputs[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cases = [
        SamplingParams(temperature=0.0, max_tokens=40, stop=[stop], ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=20, n=2, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=20, stop_token_ids=[
            reference[2].outputs[0].token_ids[5]], ignore_eos=True),
        # min_tokens bans the stop token for the first 12 outputs only.
        SamplingParams(temperature=0.0, max_tokens=20, min_tokens=12, stop_token_ids=[
            reference[2].outputs[0].token_ids[5]]),
    ]
    for params in cases:
        want = plain.generate(PROMPTS, params, use_tqdm=False)
        got = spec.generate(PROMPTS, params, use_tqdm=False)
        for a, b in zip(got, want, strict=True):
            assert [(c.token_ids, c.text, c.finish_reason) for c in a.outputs] == [
                (c.token_ids, c.text, c.finish_reason) for c in b.outputs]
    stats = spec.llm_engine.get_stats()
    assert stats.num_free_blocks == stats.num_total_blocks


def test_penalties_bad_words_and_min_tokens_see_the_drafts_as_history(llama_model_dir,
                                                                      reference):
    """History-dependent settings are built per verified position, with the drafts
    before it counted as output: greedy output equals decoding one token at a time."""
    plain = LLM(model=llama_model_dir, max_model_len=192, num_kv_blocks=96)
    spec = LLM(model=llama_model_dir, max_model_len=192, num_kv_blocks=96,
               speculative_config=dict(NGRAM, num_speculative_tokens=4))
    word = reference[1].outputs[0].token_ids[3:5]
    cases = [
        SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, repetition_penalty=1.3),
        SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, presence_penalty=0.4,
                       frequency_penalty=0.3),
        SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True,
                       bad_words_token_ids=[word]),
        SamplingParams(temperature=0.0, max_tokens=30, min_tokens=25, stop_token_ids=[
            reference[2].outputs[0].token_ids[5]]),
    ]
    for params in cases:
        want = plain.generate(PROMPTS, params, use_tqdm=False)
        before = spec.llm_engine.get_stats().spec_decode["num_draft_tokens"]
        got = spec.generate(PROMPTS, params, use_tqdm=False)
        for a, b in zip(got, want, strict=True):
            assert a.outputs[0].token_ids == b.outputs[0].token_ids, params
        # Drafts were verified for these requests (penalties make many of them wrong).
        assert spec.llm_engine.get_stats().spec_decode["num_draft_tokens"] > before, params


def test_seeded_sampling_is_reproducible_and_batch_independent(llama_model_dir, draft_dir):
    config = {"method": "draft_model", "model": draft_dir, "num_speculative_tokens": 3}
    llm = LLM(model=llama_model_dir, max_model_len=192, num_kv_blocks=96,
              speculative_config=config)
    seeded = SamplingParams(temperature=1.0, top_k=50, seed=11, max_tokens=16,
                            ignore_eos=True)
    (alone,) = llm.generate([PROMPTS[0]], seeded, use_tqdm=False)
    noisy = SamplingParams(temperature=1.2, max_tokens=16, ignore_eos=True)
    batch = llm.generate(PROMPTS, [seeded, noisy, noisy, noisy], use_tqdm=False)
    assert batch[0].outputs[0].token_ids == alone.outputs[0].token_ids


def _second_token_counts(llm: LLM, num: int, tokens: list[int]) -> list[int]:
    # Prompt built of the allowed tokens in a loop: prompt lookup always matches.
    prompt = {"prompt_token_ids": (tokens * 3)[:-1]}
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=3, ignore_eos=True,
                             allowed_token_ids=tokens) for s in range(num)]
    outs = llm.generate([prompt] * num, params, use_tqdm=False)
    counts = [0] * len(tokens)
    for out in outs:
        for token in out.outputs[0].token_ids[1:]:
            counts[tokens.index(token)] += 1
    return counts


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_sampled_tokens_follow_the_target_distribution(llama_model_dir, draft_dir, method):
    """Two-sample chi-square (p = 0.001, fixed seeds) on a 4-token vocabulary: tokens
    emitted through verification (2nd and 3rd) are distributed as without speculation."""
    tokens = [17, 40, 73, 101]
    num = 1200
    kw = dict(max_model_len=64, num_kv_blocks=512, block_size=4, max_num_seqs=256,
              max_num_batched_tokens=2048)
    plain = _second_token_counts(LLM(model=llama_model_dir, **kw), num, tokens)
    config = (NGRAM if method == "ngram" else
              {"method": "draft_model", "model": draft_dir, "num_speculative_tokens": 2})
    spec_llm = LLM(model=llama_model_dir, speculative_config=config, **kw)
    spec = _second_token_counts(spec_llm, num, tokens)
    stats = spec_llm.llm_engine.get_stats().spec_decode
    assert stats["num_accepted_tokens"] > 0
    assert stats["num_draft_tokens"] > stats["num_accepted_tokens"]  # both paths ran
    total = [a + b for a, b in zip(plain, spec, strict=True)]
    statistic = sum(
        (observed - expected) ** 2 / expected
        for counts in (plain, spec)
        for observed, expected in zip(counts, [t / 2 for t in total], strict=True)
        if expected > 0)
    assert statistic < 16.27, (plain, spec)  # chi-square, 3 degrees of freedom, p = 0.001


def test_invalid_configs_are_refused_with_the_field(llama_model_dir, tmp_path):
    cases = [
        ({"method": "medusa", "num_speculative_tokens": 2}, "method ('medusa')"),
        ({"method": "ngram"}, "num_speculative_tokens is required"),
        ({"method": "ngram", "num_speculative_tokens": 40}, "num_speculative_tokens (40)"),
        ({"method": "ngram", "num_speculative_tokens": 2, "model": llama_model_dir},
         "not used by method 'ngram'"),
        ({"method": "draft_model", "num_speculative_tokens": 2}, "model is required"),
        ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4,
          "prompt_lookup_max": 2}, "prompt_lookup_min (4)"),
        ({"method": "ngram", "num_speculative_tokens": 2, "draft_tensor_parallel_size": 2},
         "draft_tensor_parallel_size (2)"),
        ({"method": "ngram", "num_speculative_tokens": 2, "bogus": 1}, "unknown key(s) ['bogus']"),
    ]
    for config, message in cases:
        with pytest.raises(ValueError) as info:
            LLM(model=llama_model_dir, max_model_len=64, num_kv_blocks=32,
                speculative_config=config)
        assert message in str(info.value)
    with pytest.raises(ValueError, match="async_scheduling"):
        LLM(model=llama_model_dir, max_model_len=64, num_kv_blocks=32, async_scheduling=True,
            speculative_config=NGRAM)
    other_vocab = make_tiny_model(tmp_path / "v", "llama", vocab_size=600)
    with pytest.raises(ValueError, match="vocab_size 600"):
        LLM(model=llama_model_dir, max_model_len=64, num_kv_blocks=32, speculative_config={
            "method": "draft_model", "model": other_vocab, "num_speculative_tokens": 2})


def test_disable_by_batch_size_turns_drafts_off(llama_model_dir):
    config = dict(NGRAM, disable_by_batch_size=2)
    llm = LLM(model=llama_model_dir, max_model_len=128, num_kv_blocks=96,
              speculative_config=config)
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    llm.generate(PROMPTS[:3], params, use_tqdm=False)  # 3 running: no drafts
    assert llm.llm_engine.get_stats().spec_decode["num_drafts"] == 0
    llm.generate(PROMPTS[:1], params, use_tqdm=False)  # alone: drafts
    assert llm.llm_engine.get_stats().spec_decode["num_drafts"] > 0


@pytest.mark.parametrize("method", ["eagle", "eagle3"])
def test_eagle_head_is_fed_the_targets_states_at_the_right_positions(
        llama_model_dir, method, tmp_path, monkeypatch):
    """Every position the head is fed from the target carries the target's hidden
    state there (final, or the three captured layers for EAGLE-3) and the token after
    it, across chunked prefill, rejections and preemption (checked against
    transformers on the final sequence)."""
    import torch
    from transformers import AutoModelForCausalLM

    from backplane.core.spec_decode.model_drafter import ModelDrafter

    aux = [0, 1, 2]
    extra = {"aux_layer_ids": aux} if method == "eagle3" else {}
    head = make_tiny_eagle(tmp_path / method, llama_model_dir, method, **extra)
    fed = []
    original_propose, original_forward = ModelDrafter.propose, ModelDrafter._forward

    def propose(self, *args, **kwargs):
        self.first_feed = True
        return original_propose(self, *args, **kwargs)

    def forward(self, feed, input_ids, hidden_in):
        if self.first_feed:
            fed.append((feed.positions.copy(), input_ids.copy(), hidden_in.clone()))
            self.first_feed = False
        return original_forward(self, feed, input_ids, hidden_in)

    monkeypatch.setattr(ModelDrafter, "propose", propose)
    monkeypatch.setattr(ModelDrafter, "_forward", forward)
    config = {"method": method, "model": head, "num_speculative_tokens": 3}
    llm = LLM(model=llama_model_dir, speculative_config=config, **TIGHT)
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    (out,) = llm.generate([PROMPTS[3]], params, use_tqdm=False)
    sequence = out.prompt_token_ids + out.outputs[0].token_ids
    hf = AutoModelForCausalLM.from_pretrained(llama_model_dir, torch_dtype=torch.float32)
    captured = []  # the last layer's output before the final norm (EAGLE-3's layer L)
    hf.model.norm.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    with torch.no_grad():
        states = list(hf(torch.tensor([sequence]), output_hidden_states=True).hidden_states)
    final = states[-1][0]
    states[-1] = captured[0]  # hidden_states[i] enters layer i; [L] is normed in transformers
    want = (torch.cat([states[i][0] for i in aux], dim=-1) if method == "eagle3" else final)
    assert len(fed) > 5
    for positions, input_ids, hidden_in in fed:
        assert input_ids.tolist() == [sequence[p + 1] for p in positions.tolist()]
        torch.testing.assert_close(hidden_in, want[torch.from_numpy(positions)],
                                   atol=1e-4, rtol=1e-4)


def test_engine_process_carries_several_tokens_per_step_and_the_counters(
        llama_model_dir, reference):
    llm = LLM(model=llama_model_dir, engine_process=True, speculative_config=NGRAM, **TIGHT)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, logprobs=2)
        outs = llm.generate(PROMPTS, params, use_tqdm=False)
        for got, want in zip(outs, reference, strict=True):
            assert got.outputs[0].token_ids == want.outputs[0].token_ids
            assert len(got.outputs[0].logprobs) == len(want.outputs[0].token_ids)
        stats = llm.llm_engine.get_stats()
        assert stats.spec_decode["num_accepted_tokens"] > 0
        assert stats.num_free_blocks == stats.num_total_blocks
    finally:
        llm.llm_engine.shutdown()


def test_plugin_logits_processors_see_each_positions_history(llama_model_dir):
    """A logits processor whose effect depends on the output so far (no token twice in
    a row) gives the same greedy output with speculation: each verified position is
    handed its own history, drafts before it included."""

    def no_immediate_repeat(logits, output_token_ids):
        for row, history in enumerate(output_token_ids):
            if history:
                logits[row, history[-1]] = float("-inf")
        return logits

    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    outputs = []
    for config in (None, dict(NGRAM, num_speculative_tokens=4)):
        llm = LLM(model=llama_model_dir, max_model_len=192, num_kv_blocks=96,
                  speculative_config=config)
        llm.llm_engine.engine_core.model_runner.logits_processors = (no_immediate_repeat,)
        outputs.append([o.outputs[0].token_ids for o in llm.generate(PROMPTS, params,
                                                                       use_tqdm=False)])
        if config is not None:
            assert llm.llm_engine.get_stats().spec_decode["num_draft_tokens"] > 0
    assert outputs[0] == outputs[1]
    for tokens in outputs[1]:
        assert all(a != b for a, b in zip(tokens, tokens[1:], strict=False))
