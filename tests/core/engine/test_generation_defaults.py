"""The model's generation_config.json sampling defaults in `LLM.generate` / `LLM.chat`
(vLLM's --generation-config, --override-generation-config, get_default_sampling_params)."""

from __future__ import annotations

import logging

import pytest

from backplane import LLM, SamplingParams
from tests.fixtures.generation_config import (
    GENERATION_DEFAULTS,
    SAMPLING_DEFAULTS,
    write_generation_config,
)

EXPLICIT = SAMPLING_DEFAULTS
PROMPT = "the quick brown fox"


@pytest.fixture(scope="module")
def gen_model_dir(llama_model_dir, tmp_path_factory) -> str:
    """The tiny Llama with sampling defaults in its generation_config.json."""
    root = tmp_path_factory.mktemp("generation_defaults")
    return write_generation_config(llama_model_dir, root / "model", **GENERATION_DEFAULTS)


def _llm(model_dir, **kwargs) -> LLM:
    kwargs.setdefault("max_model_len", 64)
    return LLM(model=model_dir, num_kv_blocks=32, block_size=4, **kwargs)


def _tokens(llm: LLM, params: SamplingParams | None = None, prompt: str = PROMPT) -> list[int]:
    return list(llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids)


def test_unset_params_use_the_generation_config(gen_model_dir, llama_model_dir, caplog):
    with caplog.at_level(logging.INFO, logger="backplane.core.engine.llm_engine"):
        llm = _llm(gen_model_dir)
    assert "default sampling parameters (from the model's generation_config.json)" in caplog.text
    assert "temperature=0.7" in caplog.text and "max_tokens=6" in caplog.text
    defaults = llm.get_default_sampling_params()
    assert {k: getattr(defaults, k) for k in EXPLICIT} == EXPLICIT
    defaulted = _tokens(llm)  # first request after the engine seeded the global generator
    # Same weights without the file, the same values passed explicitly: the same tokens.
    assert _tokens(_llm(llama_model_dir), SamplingParams(**EXPLICIT)) == defaulted
    assert _tokens(_llm(llama_model_dir)) != defaulted  # Backplane's own defaults differ
    # LLM.chat without SamplingParams takes them too (6 tokens at most).
    chat = llm.chat([{"role": "user", "content": "hi"}], use_tqdm=False)
    assert 1 <= len(chat[0].outputs[0].token_ids) <= 6


def test_explicit_sampling_params_win(gen_model_dir, llama_model_dir):
    params = SamplingParams(temperature=1.0, max_tokens=9, seed=3, ignore_eos=True)
    got = _tokens(_llm(gen_model_dir), params)
    assert len(got) == 9
    assert got == _tokens(_llm(llama_model_dir), params)


def test_generation_config_vllm_ignores_the_file(gen_model_dir, caplog):
    with caplog.at_level(logging.INFO, logger="backplane.core.engine.llm_engine"):
        llm = _llm(gen_model_dir, generation_config="vllm")
    assert "default sampling parameters: Backplane's own" in caplog.text
    assert llm.llm_engine.config.model_spec.generation_defaults == {}
    assert llm.get_default_sampling_params() == SamplingParams()


def test_generation_config_directory(gen_model_dir, llama_model_dir, tmp_path):
    llm = _llm(llama_model_dir, generation_config=gen_model_dir)
    assert llm.llm_engine.config.model_spec.generation_defaults == GENERATION_DEFAULTS
    with pytest.raises(ValueError, match="has no generation_config.json"):
        _llm(llama_model_dir, generation_config=str(tmp_path))
    with pytest.raises(ValueError, match="neither 'auto', 'vllm' nor a directory"):
        _llm(llama_model_dir, generation_config=str(tmp_path / "missing"))


def test_override_is_merged_over_the_file(gen_model_dir, llama_model_dir):
    llm = _llm(
        gen_model_dir,
        override_generation_config={"temperature": 0.0, "max_new_tokens": 3, "top_p": None},
    )
    assert llm.llm_engine.config.model_spec.sampling_defaults == {
        "temperature": 0.0, "top_k": 5, "repetition_penalty": 1.1, "max_tokens": 3,
    }
    greedy = SamplingParams(temperature=0.0, top_k=5, repetition_penalty=1.1, max_tokens=3)
    assert _tokens(llm) == _tokens(_llm(llama_model_dir), greedy)
    unknown = r"override_generation_config: unknown key\(s\) \['seed'\]"
    with pytest.raises(ValueError, match=unknown):
        _llm(gen_model_dir, override_generation_config={"seed": 1})
    with pytest.raises(ValueError, match="override_generation_config: temperature must be"):
        _llm(gen_model_dir, override_generation_config={"temperature": -1})


def test_max_new_tokens_is_capped_by_max_model_len(gen_model_dir):
    override = {"temperature": 0.0, "max_new_tokens": 500}
    llm = _llm(gen_model_dir, override_generation_config=override)
    prompt_len = len(llm.get_tokenizer()(PROMPT)["input_ids"])
    out = llm.generate(PROMPT, use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 64 - prompt_len  # fits instead of being refused
    # An explicit max_tokens that does not fit is still refused.
    with pytest.raises(ValueError, match="exceeds max_model_len"):
        llm.generate(PROMPT, SamplingParams(max_tokens=500), use_tqdm=False)


def test_invalid_generation_config_is_refused_at_start_up(llama_model_dir, tmp_path):
    bad = write_generation_config(llama_model_dir, tmp_path / "bad", top_p=0.0)
    with pytest.raises(ValueError, match=r"generation_config.json: top_p must be"):
        _llm(bad)
