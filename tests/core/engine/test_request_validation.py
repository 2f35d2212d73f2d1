"""Bad input to LLM.generate fails before anything is queued; prompt dicts, EOS text,
min_tokens with ignore_eos and cache_salt behave as in vLLM."""

from __future__ import annotations

import pytest

from backplane import LLM, SamplingParams
from backplane.sampling_params import INT64_MAX
from tests.fixtures.tiny_models import EOS_ID


@pytest.fixture(scope="module")
def llm(llama_model_dir) -> LLM:
    return LLM(model=llama_model_dir, max_model_len=128, num_kv_blocks=64, block_size=4, seed=0)


def _idle(llm: LLM) -> bool:
    stats = llm.llm_engine.get_stats()
    return (
        not llm.llm_engine.has_unfinished_requests()
        and stats.num_free_blocks == stats.num_total_blocks
    )


GREEDY = SamplingParams(temperature=0, max_tokens=6)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"n": 2**40}, "n"),
        ({"top_k": 2**63}, "top_k"),
        ({"seed": 2**64}, "seed"),
        ({"max_tokens": 2**70}, "max_tokens"),
        ({"stop_token_ids": [2**63]}, "stop_token_ids"),
        ({"logprobs": -2}, "logprobs"),
        ({"n": True}, "n"),
    ],
)
def test_out_of_range_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field} must be"):
        SamplingParams(**kwargs)


def test_seeds_of_children_wrap_within_int64():
    child = SamplingParams(n=3, seed=INT64_MAX, temperature=1).clone_for_child(2)
    assert child.seed == -(2**63) + 1


@pytest.mark.parametrize(
    ("prompts", "error", "words"),
    [
        (None, TypeError, ["prompts must be"]),
        (123, TypeError, ["prompts must be"]),
        ([None], TypeError, ["prompts[0]"]),
        ([], ValueError, ["prompts is empty"]),
        ({"prompt_token_ids": [1, "x"]}, TypeError, ["prompts[0].prompt_token_ids"]),
        ({"prompt": "hi", "multi_modal_data": {"image": 1}}, ValueError, ["multimodal"]),
        ({"promt": "hi"}, ValueError, ["unknown key", "promt"]),
        ({"prompt": "hi", "cache_salt": ""}, ValueError, ["cache_salt"]),
        ("\ud800abc", ValueError, ["lone surrogate", "U+D800"]),
    ],
)
def test_bad_prompts_raise_before_queueing(llm, prompts, error, words):
    with pytest.raises(error) as info:
        llm.generate(prompts, GREEDY, use_tqdm=False)
    for word in words:
        assert word in str(info.value)
    assert _idle(llm)


def test_bad_sampling_params_type_names_it(llm):
    with pytest.raises(TypeError, match="sampling_params"):
        llm.generate("hi", {"temperature": 0}, use_tqdm=False)
    with pytest.raises(TypeError, match=r"sampling_params\[1\]"):
        llm.generate(["a", "b"], [GREEDY, "greedy"], use_tqdm=False)


def test_stop_token_id_outside_vocab_is_refused_not_crashing_the_sampler(llm):
    params = SamplingParams(max_tokens=8, min_tokens=2, stop_token_ids=[999999])
    with pytest.raises(ValueError, match="stop_token_ids contains token id 999999"):
        llm.generate("In the beginning", params, use_tqdm=False)
    assert _idle(llm)
    # the engine still serves
    assert len(llm.generate("In the beginning", GREEDY, use_tqdm=False)[0].outputs[0].token_ids) > 0


def test_prompt_dicts_equal_their_plain_forms(llm):
    text = "In the beginning"
    ids = llm.get_tokenizer().encode(text)
    plain = llm.generate([text, ids], GREEDY, use_tqdm=False)
    dicts = llm.generate(
        [{"prompt": text}, {"prompt_token_ids": ids, "prompt": "shown"}], GREEDY, use_tqdm=False
    )
    assert [o.outputs[0].token_ids for o in dicts] == [o.outputs[0].token_ids for o in plain]
    assert dicts[1].prompt == "shown" and dicts[1].prompt_token_ids == ids


# EOS gets +100 everywhere, so it is what greedy picks as soon as it is allowed.
FORCE_EOS = {EOS_ID: 100.0}


def test_eos_text_is_not_in_the_output_even_without_skipping_special_tokens(llm):
    params = SamplingParams(
        temperature=0, max_tokens=8, min_tokens=2, logit_bias=FORCE_EOS, skip_special_tokens=False
    )
    out = llm.generate("In the beginning", params, use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] == EOS_ID and len(out.token_ids) == 3
    assert "</s>" not in out.text
    shown = SamplingParams(
        temperature=0, max_tokens=8, min_tokens=2, logit_bias=FORCE_EOS,
        skip_special_tokens=False, include_stop_str_in_output=True,
    )
    assert llm.generate("In the beginning", shown, use_tqdm=False)[0].outputs[0].text.endswith(
        "</s>"
    )


def test_min_tokens_bans_eos_even_with_ignore_eos(llm):
    params = SamplingParams(
        temperature=0, max_tokens=6, min_tokens=3, logit_bias=FORCE_EOS, ignore_eos=True
    )
    out = llm.generate("In the beginning", params, use_tqdm=False)[0].outputs[0]
    assert EOS_ID not in out.token_ids[:3]
    assert out.token_ids[3:] == [EOS_ID] * 3 and out.finish_reason == "length"


def test_cache_salt_isolates_the_prefix_cache(llm):
    prompt = list(range(10, 50))  # 40 tokens: 9 full blocks can be reused
    one = SamplingParams(temperature=0, max_tokens=1)

    def cached(salt):
        p = {"prompt_token_ids": prompt} if salt is None else {
            "prompt_token_ids": prompt, "cache_salt": salt
        }
        return llm.generate(p, one, use_tqdm=False)[0].num_cached_tokens

    llm.llm_engine.engine_core.scheduler.kv.reset_prefix_cache()
    assert cached("alice") == 0
    assert cached("alice") == 36  # same salt: reused
    assert cached("bob") == 0  # another salt: not shared
    assert cached(None) == 0  # unsalted requests do not see salted blocks
    assert cached(None) == 36


def test_allowed_token_ids_restrict_sampling(llm):
    allowed = [7, 8, 9]
    params = SamplingParams(temperature=1.0, seed=1, max_tokens=10, ignore_eos=True,
                            allowed_token_ids=allowed)
    out = llm.generate("In the beginning", params, use_tqdm=False)[0].outputs[0]
    assert set(out.token_ids) <= set(allowed) and len(out.token_ids) == 10
    with pytest.raises(ValueError, match="allowed_token_ids contains token id 4096"):
        llm.generate("x", SamplingParams(allowed_token_ids=[4096]), use_tqdm=False)


def test_bad_words_are_never_completed(llm):
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    ids = llm.generate("In the beginning", greedy, use_tqdm=False)[0].outputs[0].token_ids
    # Ban the two-token sequence greedy decoding produces at positions 2..3.
    word = llm.get_tokenizer().decode(ids[2:4])
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, bad_words=[word])
    out = llm.generate("In the beginning", params, use_tqdm=False)[0].outputs[0].token_ids
    for seq in llm.llm_engine._bad_words_token_ids([word]):
        n = len(seq)
        assert all(out[i:i + n] != seq for i in range(len(out) - n + 1)), (seq, out)
    assert out != ids  # the ban changed the output
    assert out[:2] == ids[:2]  # unchanged up to the banned completion
