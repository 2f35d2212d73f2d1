"""Engine options from vLLM that change behaviour: hf_overrides, max_logprobs,
tokenizer_mode and seed (each shown by its effect)."""

from __future__ import annotations

import pytest

from backplane import LLM, SamplingParams


def _llm(model_dir, **kwargs) -> LLM:
    kwargs.setdefault("max_model_len", 64)
    return LLM(model=model_dir, num_kv_blocks=32, block_size=4, **kwargs)


def test_hf_overrides_change_the_model_config(llama_model_dir):
    llm = _llm(llama_model_dir, max_model_len=None, hf_overrides={"max_position_embeddings": 96})
    assert llm.llm_engine.config.model_config.hf_config.max_position_embeddings == 96
    assert llm.llm_engine.max_model_len == 96  # the default follows the overridden limit
    with pytest.raises(ValueError, match="hf_overrides: the model config has no attribute 'nope'"):
        _llm(llama_model_dir, hf_overrides={"nope": 1})


def test_max_logprobs_bounds_requests(llama_model_dir):
    prompt = "In the beginning"
    default = _llm(llama_model_dir)
    with pytest.raises(ValueError, match=r"logprobs \(25\) exceeds the maximum of 20"):
        default.generate(prompt, SamplingParams(max_tokens=2, logprobs=25), use_tqdm=False)
    wide = _llm(llama_model_dir, max_logprobs=30)
    out = wide.generate(prompt, SamplingParams(max_tokens=2, logprobs=25), use_tqdm=False)
    assert all(len(entry) >= 25 for entry in out[0].outputs[0].logprobs)


def test_slow_tokenizer_mode_is_refused_when_there_is_none(llama_model_dir):
    # The fixture ships only tokenizer.json (a fast tokenizer), so "slow" cannot be honoured.
    with pytest.raises(ValueError, match="tokenizer_mode 'slow'"):
        _llm(llama_model_dir, tokenizer_mode="slow")


def test_seed_makes_unseeded_sampling_repeatable(llama_model_dir):
    params = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)

    def sample(seed):
        llm = _llm(llama_model_dir, seed=seed)
        return llm.generate("In the beginning", params, use_tqdm=False)[0].outputs[0].token_ids

    first = sample(7)
    assert sample(7) == first
    assert sample(8) != first


def test_kv_cache_memory_bytes_and_num_kv_blocks_size_the_cache(llama_model_dir):
    llm = LLM(model=llama_model_dir, max_model_len=64, block_size=4, kv_cache_memory_bytes=2**20)
    spec = llm.llm_engine.config.model_spec
    runner = llm.llm_engine.engine_core.model_runner
    assert runner.num_blocks == 2**20 // spec.kv_bytes_per_block
    assert runner.kv_cache_bytes == runner.num_blocks * spec.kv_bytes_per_block
    fixed = _llm(llama_model_dir, kv_cache_memory_bytes=2**20)  # num_kv_blocks=32 wins
    assert fixed.llm_engine.engine_core.model_runner.num_blocks == 32


def test_trust_remote_code_reaches_transformers(llama_model_dir, monkeypatch):
    import transformers

    seen = []
    real = transformers.AutoConfig.from_pretrained

    def recording(*args, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", recording)
    _llm(llama_model_dir, trust_remote_code=True)
    assert seen and all(flag is True for flag in seen)


def test_load_format_auto_and_safetensors_load_others_are_refused(llama_model_dir):
    assert _llm(llama_model_dir, load_format="auto").generate(
        "In", SamplingParams(max_tokens=1), use_tqdm=False)
    with pytest.raises(ValueError, match="load_format \\('pt'\\) is not one of"):
        _llm(llama_model_dir, load_format="pt")


def test_separate_tokenizer_directory_is_used(llama_model_dir, tmp_path):
    import os
    import shutil

    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        src = f"{llama_model_dir}/{name}"
        if os.path.exists(src):
            shutil.copy(src, tok_dir / name)
    llm = _llm(llama_model_dir, tokenizer=str(tok_dir))
    assert llm.get_tokenizer().name_or_path == str(tok_dir)
    with pytest.raises((FileNotFoundError, ValueError), match="tokenizer"):
        _llm(llama_model_dir, tokenizer=str(tmp_path))


def test_memory_utilization_sizes_the_cache_from_available_memory(llama_model_dir, monkeypatch):
    from backplane.platforms.cpu.runtime import CpuRuntime

    monkeypatch.setattr(CpuRuntime, "available_memory", lambda self, index=0: 8 * 2**20)
    llm = LLM(model=llama_model_dir, max_model_len=64, block_size=4, max_num_seqs=256,
              memory_utilization=0.25)
    spec = llm.llm_engine.config.model_spec
    assert llm.llm_engine.engine_core.model_runner.num_blocks == 2 * 2**20 // spec.kv_bytes_per_block
    # Unset on the cpu: a fixed-size cache, not a share of host memory.
    default = LLM(model=llama_model_dir, max_model_len=64, block_size=4, max_num_seqs=1)
    assert default.llm_engine.config.cache_config.kv_cache_memory_bytes == 4 * 2**30
