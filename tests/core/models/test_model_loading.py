"""Loading checkpoints: layouts, dtypes, tying, and the errors users meet."""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from backplane.config.configs import ModelConfig
from backplane.core.loader import MissingWeightsError, load_model, load_tokenizer
from backplane.core.models import WeightShapeError, register_model, resolve_model_class
from backplane.core.models.llama import LlamaForCausalLM
from backplane.core.models.registry import _models
from backplane.platforms.cpu.attention import CpuSdpaAttentionBackend
from tests.fixtures.paged import PagedBatch

PROMPT = [1, 45, 74, 81, 81, 84, 17, 302, 325, 266, 269, 351, 36, 226, 275, 340, 78, 72, 80]


@torch.inference_mode()
def _logits(model, dtype=torch.float32) -> torch.Tensor:
    batch = PagedBatch(model, CpuSdpaAttentionBackend, num_reqs=1, max_len=32, dtype=dtype)
    ids, pos, ctx = batch.step([0], [PROMPT])
    return model.compute_logits(model(ids, pos, ctx))


@torch.inference_mode()
def _hf_logits(path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return ref(torch.tensor([PROMPT])).logits[0]


def _load(path, dtype: torch.dtype | None = None):
    config = ModelConfig(model=str(path))
    config.torch_dtype = dtype
    return load_model(config, "cpu")


def _copy(src, tmp_path, name="model") -> str:
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return str(dst)


def test_sharded_checkpoint_loads_like_single_file(tiny_model_factory):
    single = _load(tiny_model_factory("llama"))
    sharded_dir = tiny_model_factory("llama", sharded=True)
    assert os.path.isfile(os.path.join(sharded_dir, "model.safetensors.index.json"))
    sharded = _load(sharded_dir)
    torch.testing.assert_close(_logits(sharded), _logits(single), atol=0, rtol=0)


def test_tied_and_untied_embeddings(tiny_model_factory):
    untied = _load(tiny_model_factory("llama"))
    assert not untied.tie_word_embeddings
    assert not torch.equal(untied.lm_head.logits_weight, untied.model.embed_tokens.weight)

    tied_dir = tiny_model_factory("qwen2")
    tied = _load(tied_dir)
    assert tied.tie_word_embeddings
    assert "lm_head.weight" not in dict(tied.named_parameters())
    assert tied.lm_head.logits_weight.data_ptr() == tied.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(_logits(tied), _hf_logits(tied_dir), atol=1e-4, rtol=0)

    # A llama saved tied (no lm_head tensor in the checkpoint) loads tied too.
    llama_tied = tiny_model_factory("llama", tied=True)
    torch.testing.assert_close(
        _logits(_load(llama_tied)), _hf_logits(llama_tied), atol=1e-4, rtol=0
    )


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.bfloat16, 0.15), (torch.float16, 0.02)])
def test_half_precision_loads_and_runs(tiny_model_factory, dtype, tolerance):
    path = tiny_model_factory("qwen3", dtype="bfloat16")
    # dtype None: the checkpoint's own (bfloat16); float16 is a cast at load.
    model = _load(path, None if dtype == torch.bfloat16 else dtype)
    assert {p.dtype for p in model.parameters()} == {dtype}
    logits = _logits(model, dtype)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    # Against the float32 evaluation of the same (bfloat16-valued) weights.
    assert (logits - _hf_logits(path)).abs().max() < tolerance


def test_unknown_architecture_is_named(tiny_model_factory, tmp_path):
    path = _copy(tiny_model_factory("llama"), tmp_path)
    config_path = os.path.join(path, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    config["architectures"] = ["FancyNewForCausalLM"]
    with open(config_path, "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match="FancyNewForCausalLM") as err:
        _load(path)
    assert "LlamaForCausalLM" in str(err.value) and "Qwen3ForCausalLM" in str(err.value)


def test_missing_weight_is_named(tiny_model_factory, tmp_path):
    path = _copy(tiny_model_factory("qwen2"), tmp_path)
    weights_path = os.path.join(path, "model.safetensors")
    tensors = load_file(weights_path)
    del tensors["model.layers.1.self_attn.k_proj.bias"]
    save_file(tensors, weights_path, metadata={"format": "pt"})
    with pytest.raises(MissingWeightsError, match=r"model\.layers\.1\.self_attn\.k_proj\.bias"):
        _load(path)


def test_shape_mismatch_names_weight_and_shapes(tiny_model_factory, tmp_path):
    path = _copy(tiny_model_factory("llama"), tmp_path)
    config_path = os.path.join(path, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    config["intermediate_size"] = 96  # the checkpoint holds 128
    with open(config_path, "w") as f:
        json.dump(config, f)
    with pytest.raises(WeightShapeError) as err:
        _load(path)
    message = str(err.value)
    assert re.search(r"model\.layers\.0\.mlp\.(gate|up|down)_proj\.weight", message)
    expected, got = ("[96, 64]", "[128, 64]") if "down" not in message else ("[64, 96]", "[64, 128]")
    assert f"expects {expected}" in message and f"shape {got} in the checkpoint" in message


def test_missing_config_json_is_named(tiny_model_factory, tmp_path):
    path = _copy(tiny_model_factory("llama"), tmp_path)
    os.remove(os.path.join(path, "config.json"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        _load(path)


def test_missing_shard_file_is_named(tiny_model_factory, tmp_path):
    path = _copy(tiny_model_factory("llama", sharded=True), tmp_path)
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        shard = sorted(set(json.load(f)["weight_map"].values()))[1]
    os.remove(os.path.join(path, shard))
    with pytest.raises(FileNotFoundError, match=shard):
        _load(path)


def test_no_safetensors_at_all(tiny_model_factory, tmp_path):
    path = _copy(tiny_model_factory("llama"), tmp_path)
    os.remove(os.path.join(path, "model.safetensors"))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        _load(path)


def test_tokenizer_loads_and_missing_tokenizer_is_named(tiny_model_factory, tmp_path):
    path = tiny_model_factory("llama")
    tokenizer = load_tokenizer(path)
    assert tokenizer.decode(tokenizer("Hello there").input_ids, skip_special_tokens=True) == (
        "Hello there"
    )
    empty = tmp_path / "no_tokenizer"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no_tokenizer"):
        load_tokenizer(str(empty))


def test_register_model_for_a_new_architecture(tiny_model_factory, tmp_path, monkeypatch):
    class MyLlama(LlamaForCausalLM):
        """A plugin's model: the stock decoder under another architecture name."""

    monkeypatch.setitem(_models, "MyLlamaForCausalLM", _models["LlamaForCausalLM"])
    register_model("MyLlamaForCausalLM", MyLlama)
    path = _copy(tiny_model_factory("llama"), tmp_path)
    config_path = os.path.join(path, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    config["architectures"] = ["MyLlamaForCausalLM"]
    with open(config_path, "w") as f:
        json.dump(config, f)
    model = _load(path)
    assert type(model) is MyLlama
    with pytest.raises(TypeError, match="nn.Module"):
        register_model("Broken", object)


def test_lazy_registration_resolves_on_use(monkeypatch):
    from transformers import LlamaConfig

    monkeypatch.setitem(_models, "LazyForCausalLM", "backplane.core.models.qwen:Qwen3ForCausalLM")
    config = LlamaConfig(architectures=["LazyForCausalLM"])
    from backplane.core.models.qwen import Qwen3ForCausalLM

    assert resolve_model_class(config) is Qwen3ForCausalLM
    monkeypatch.setitem(_models, "GoneForCausalLM", "backplane.no_such_module:Model")
    with pytest.raises(ImportError, match="GoneForCausalLM"):
        resolve_model_class(LlamaConfig(architectures=["GoneForCausalLM"]))
