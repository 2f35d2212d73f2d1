"""Seeded sampling, n > 1, penalties, logit bias, min_tokens, stop conditions."""

from __future__ import annotations

import pytest

from backplane import LLM, SamplingParams
from tests.core.engine.conftest import PROMPTS


def test_seeded_sampling_reproducible_and_batch_independent(llama_llm, llama_model_dir):
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=10,
                            ignore_eos=True)
    (alone,) = llama_llm.generate([PROMPTS[0]], params, use_tqdm=False)
    noisy = SamplingParams(temperature=1.3, max_tokens=10, ignore_eos=True)
    batch = llama_llm.generate(PROMPTS, [params, noisy, noisy, noisy], use_tqdm=False)
    assert batch[0].outputs[0].token_ids == alone.outputs[0].token_ids
    # And across engine instances (a fresh process would do the same).
    fresh = LLM(model=llama_model_dir, max_model_len=256, num_kv_blocks=64)
    (again,) = fresh.generate([PROMPTS[0]], params, use_tqdm=False)
    assert again.outputs[0].token_ids == alone.outputs[0].token_ids
    other_seed = SamplingParams(temperature=1.0, seed=99, max_tokens=10, ignore_eos=True)
    (different,) = llama_llm.generate([PROMPTS[0]], other_seed, use_tqdm=False)
    assert different.outputs[0].token_ids != alone.outputs[0].token_ids


def test_n_gives_n_outputs(llama_llm):
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8, ignore_eos=True)
    (out,) = llama_llm.generate([PROMPTS[0]], params, use_tqdm=False)
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 8 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    stats = llama_llm.llm_engine.get_stats()
    assert stats.num_free_blocks == stats.num_total_blocks


def test_stop_token_ids_end_generation(llama_llm):
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    (ref,) = llama_llm.generate([PROMPTS[0]], greedy, use_tqdm=False)
    tokens = ref.outputs[0].token_ids
    stop_id = tokens[4]
    first_hit = tokens.index(stop_id)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True,
                            stop_token_ids=[stop_id])
    (out,) = llama_llm.generate([PROMPTS[0]], params, use_tqdm=False)
    assert out.outputs[0].token_ids == tokens[: first_hit + 1]
    assert out.outputs[0].finish_reason == "stop"
    assert out.outputs[0].stop_reason == stop_id


def test_stop_string_is_cut_and_reported(llama_llm):
    greedy = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    (ref,) = llama_llm.generate([PROMPTS[2]], greedy, use_tqdm=False)
    text = ref.outputs[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop and stop in text
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, stop=[stop])
    (out,) = llama_llm.generate([PROMPTS[2]], params, use_tqdm=False)
    assert out.outputs[0].finish_reason == "stop"
    assert out.outputs[0].stop_reason == stop
    assert out.outputs[0].text == text[: text.index(stop)]
    assert stop not in out.outputs[0].text
    keep = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, stop=[stop],
                          include_stop_str_in_output=True)
    (kept,) = llama_llm.generate([PROMPTS[2]], keep, use_tqdm=False)
    assert kept.outputs[0].text == text[: text.index(stop) + len(stop)]
    stats = llama_llm.llm_engine.get_stats()
    assert stats.num_free_blocks == stats.num_total_blocks


def test_eos_stops_unless_ignored_and_min_tokens(llama_llm):
    tokenizer = llama_llm.get_tokenizer()
    eos = tokenizer.eos_token_id
    forced = SamplingParams(temperature=0.0, max_tokens=10, logit_bias={eos: 100.0})
    (out,) = llama_llm.generate([PROMPTS[0]], forced, use_tqdm=False)
    assert out.outputs[0].token_ids == [eos]
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason is None
    ignored = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True,
                             logit_bias={eos: 100.0})
    (out,) = llama_llm.generate([PROMPTS[0]], ignored, use_tqdm=False)
    assert out.outputs[0].token_ids == [eos] * 5 and out.outputs[0].finish_reason == "length"
    min_tokens = SamplingParams(temperature=0.0, max_tokens=10, min_tokens=3,
                                logit_bias={eos: 100.0})
    (out,) = llama_llm.generate([PROMPTS[0]], min_tokens, use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 4 and out.outputs[0].token_ids[-1] == eos
    assert eos not in out.outputs[0].token_ids[:3]


def test_penalties_change_greedy_output(llama_llm):
    base = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    (plain,) = llama_llm.generate([PROMPTS[1]], base, use_tqdm=False)
    tokens = plain.outputs[0].token_ids
    assert len(set(tokens)) < len(tokens), "fixture should repeat itself without penalties"
    for kwargs in ({"repetition_penalty": 5.0}, {"frequency_penalty": 2.0},
                   {"presence_penalty": 2.0}):
        params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, **kwargs)
        (out,) = llama_llm.generate([PROMPTS[1]], params, use_tqdm=False)
        assert out.outputs[0].token_ids != tokens, kwargs
    strong = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True,
                            presence_penalty=2.0, logit_bias={7: -100.0})
    (out,) = llama_llm.generate([PROMPTS[1]], strong, use_tqdm=False)
    assert 7 not in out.outputs[0].token_ids


def test_top_k_one_is_greedy(llama_llm):
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    top1 = SamplingParams(temperature=0.8, top_k=1, seed=3, max_tokens=8, ignore_eos=True)
    tiny_p = SamplingParams(temperature=0.8, top_p=1e-6, seed=3, max_tokens=8, ignore_eos=True)
    outs = llama_llm.generate([PROMPTS[0]] * 3, [greedy, top1, tiny_p], use_tqdm=False)
    assert outs[0].outputs[0].token_ids == outs[1].outputs[0].token_ids
    assert outs[0].outputs[0].token_ids == outs[2].outputs[0].token_ids


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -3}, "top_k"),
        ({"min_p": 2.0}, "min_p"),
        ({"n": 0}, "n"),
        ({"presence_penalty": 3.0}, "presence_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"logprobs": -1}, "logprobs"),
        ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
    ],
)
def test_invalid_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field) as info:
        SamplingParams(**kwargs)
    assert str(list(kwargs.values())[0]) in str(info.value)


def test_plugin_logits_processors_apply_after_raw_logprobs(llama_model_dir):
    llm = LLM(model=llama_model_dir, max_model_len=128, num_kv_blocks=32)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=0)
    (plain,) = llm.generate([PROMPTS[0]], params, use_tqdm=False)
    banned = plain.outputs[0].token_ids[0]
    seen_outputs = []

    def ban_first_choice(logits, output_token_ids):
        seen_outputs.append([list(t) for t in output_token_ids])
        logits[:, banned] = float("-inf")
        return logits

    llm.llm_engine.engine_core.model_runner.logits_processors = (ban_first_choice,)
    (out,) = llm.generate([PROMPTS[0]], params, use_tqdm=False)
    assert banned not in out.outputs[0].token_ids
    # Logprobs still describe the model's raw distribution.
    first = out.outputs[0].logprobs[0][out.outputs[0].token_ids[0]]
    assert first.rank == 2
    assert seen_outputs[0] == [[]] and len(seen_outputs[1][0]) == 1
