"""PEFT LoRA adapters mapped onto Backplane's fused modules, with peft as the reference."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil

import pytest
import torch

pytest.importorskip("peft")

from peft import PeftModel  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from backplane.config import ModelConfig  # noqa: E402
from backplane.core.loader.model_loader import load_model  # noqa: E402
from backplane.lora import (  # noqa: E402
    LoRAAdapterError,
    LoRARequest,
    LoRATarget,
    LoRAWeights,
    check_adapter_config,
    load_lora_adapter,
    lora_targets,
)
from tests.fixtures.tiny_lora import make_tiny_lora  # noqa: E402
from tests.fixtures.tiny_models import make_tiny_model  # noqa: E402

# Backplane fused module -> (its parts, the HF module name of each part).
FUSED = {
    "self_attn.qkv_proj": {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj"},
    "mlp.gate_up_proj": {"gate": "mlp.gate_proj", "up": "mlp.up_proj"},
}
PLAIN = {"self_attn.o_proj": "self_attn.o_proj", "mlp.down_proj": "mlp.down_proj"}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("base"), "llama")


@pytest.fixture(scope="module")
def model(base_dir):
    return load_model(ModelConfig(model=base_dir), "cpu")


@pytest.fixture(scope="module")
def targets(model):
    return lora_targets(model)


@pytest.fixture(scope="module")
def full_adapter(tmp_path_factory, base_dir):
    return make_tiny_lora(tmp_path_factory.mktemp("full"), base_dir)


def _peft_reference(base_dir, adapter_dir):
    """The adapter as peft itself loads it: {hf module name: (scaling, lora_A, lora_B, module)}."""
    hf = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(hf, adapter_dir).eval()
    out = {}
    for name, module in peft_model.base_model.model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            out[name] = (module.scaling["default"], module.lora_A["default"].weight.detach(),
                         module.lora_B["default"].weight.detach(), module)
    return out


def _blocks(weights: LoRAWeights, target: LoRATarget, part: str):
    """(A rows, B block) part ``part`` of ``target`` uses."""
    a, b = weights.modules[target.module]
    p = list(target.parts).index(part)
    start = target.part_offsets()[part]
    r = weights.rank
    return a[p * r:(p + 1) * r], b[start:start + target.parts[part], p * r:(p + 1) * r]


def _check_layout(weights: LoRAWeights, target: LoRATarget) -> None:
    """B is zero outside each part's own (rows, ranks) block; A/B have the documented shapes."""
    a, b = weights.modules[target.module]
    n = len(target.parts)
    assert a.shape == (n * weights.rank, target.in_features)
    assert b.shape == (target.out_features, n * weights.rank)
    mask = torch.ones_like(b, dtype=torch.bool)
    for p, part in enumerate(target.parts):
        start = target.part_offsets()[part]
        mask[start:start + target.parts[part], p * weights.rank:(p + 1) * weights.rank] = False
    assert not b[mask].any()


# ---------------------------------------------------------------- LoRARequest


def test_request_vllm_compatible():
    positional = LoRARequest("sql", 1, "/adapters/sql")
    keyword = LoRARequest(lora_name="sql", lora_int_id=1, lora_path="/adapters/sql",
                          base_model_name="llama")
    assert (positional.name, positional.adapter_id, positional.path) == ("sql", 1, "/adapters/sql")
    assert keyword.base_model_name == "llama" and positional.base_model_name is None
    assert positional == keyword and hash(positional) == hash(keyword)
    assert LoRARequest("other", 1, "/x") != positional
    with pytest.raises(dataclasses.FrozenInstanceError):
        positional.lora_int_id = 2  # frozen


@pytest.mark.parametrize("bad", [0, -3, True, 1.5, "1"])
def test_request_rejects_bad_id(bad):
    with pytest.raises(ValueError, match="lora_int_id") as info:
        LoRARequest("sql", bad, "/adapters/sql")
    assert repr(bad) in str(info.value) or str(bad) in str(info.value)
    if bad in (0, -3):
        assert ">= 1" in str(info.value)


# ---------------------------------------------------------------- targets


def test_targets_of_llama(model, targets):
    dims = model.dims
    q, kv = dims.num_heads * dims.head_dim, dims.num_kv_heads * dims.head_dim
    inter = model.config.intermediate_size
    assert len(targets) == 4 * dims.num_layers
    for i in range(dims.num_layers):
        pre = f"model.layers.{i}."
        assert targets[pre + "self_attn.qkv_proj"] == LoRATarget(
            pre + "self_attn.qkv_proj", dims.hidden_size, {"q": q, "k": kv, "v": kv},
            {"q": "q_proj", "k": "k_proj", "v": "v_proj"})
        assert targets[pre + "self_attn.o_proj"].parts == {"": dims.hidden_size}
        assert targets[pre + "self_attn.o_proj"].in_features == q
        assert targets[pre + "mlp.gate_up_proj"].parts == {"gate": inter, "up": inter}
        assert targets[pre + "mlp.down_proj"].parts == {"": dims.hidden_size}
        assert targets[pre + "mlp.down_proj"].in_features == inter


def test_targets_refuse_models_without_projections():
    with pytest.raises(ValueError, match="no q/k/v/o/gate/up/down"):
        lora_targets(torch.nn.Sequential(torch.nn.Linear(4, 4)))


# ---------------------------------------------------------------- parity with peft


def _check_against_peft(weights, targets, reference, num_layers, exact=True):
    touched = set()
    for i in range(num_layers):
        pre = f"model.layers.{i}."
        for fused, parts in FUSED.items():
            target = targets[pre + fused]
            if target.module in weights.modules:
                _check_layout(weights, target)
            for part, hf_name in parts.items():
                ref = reference.get(pre + hf_name)
                if ref is None:
                    if target.module in weights.modules:
                        a, b = _blocks(weights, target, part)
                        assert not a.any() and not b.any(), f"{hf_name} should be untouched"
                    continue
                touched.add(pre + hf_name)
                scale, ref_a, ref_b, _ = ref
                a, b = _blocks(weights, target, part)
                if exact:
                    assert weights.scaling == scale
                    assert torch.equal(b @ a, ref_b @ ref_a), pre + hf_name
                else:
                    torch.testing.assert_close(weights.scaling * (b @ a), scale * (ref_b @ ref_a))
        for bp_name, hf_name in PLAIN.items():
            target = targets[pre + bp_name]
            ref = reference.get(pre + hf_name)
            if ref is None:
                assert target.module not in weights.modules
                continue
            touched.add(pre + hf_name)
            scale, ref_a, ref_b, _ = ref
            a, b = weights.modules[target.module]
            if exact:
                assert weights.scaling == scale
                assert torch.equal(b @ a, ref_b @ ref_a), pre + hf_name
            else:
                torch.testing.assert_close(weights.scaling * (b @ a), scale * (ref_b @ ref_a))
    assert touched == set(reference)


def test_full_adapter_matches_peft(base_dir, model, targets, full_adapter):
    weights = load_lora_adapter(full_adapter, targets, max_rank=16)
    assert weights.rank == 8 and weights.scaling == 16 / 8
    assert weights.name == os.path.basename(full_adapter)
    assert set(weights.modules) == set(targets)
    assert all(a.device.type == "cpu" for a, _ in weights.modules.values())
    reference = _peft_reference(base_dir, full_adapter)
    assert len(reference) == 7 * model.dims.num_layers
    _check_against_peft(weights, targets, reference, model.dims.num_layers)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_other_llama_family_archs_match_peft(tmp_path, arch):
    base = make_tiny_model(tmp_path / arch, arch)
    ours = load_model(ModelConfig(model=base), "cpu")
    path = make_tiny_lora(tmp_path / "ad", base, rank=4, alpha=4, seed=2)
    targets = lora_targets(ours)
    weights = load_lora_adapter(path, targets, max_rank=4)
    _check_against_peft(weights, targets, _peft_reference(base, path), ours.dims.num_layers)


def test_partial_targets_leave_other_parts_zero(tmp_path, base_dir, model, targets):
    path = make_tiny_lora(tmp_path / "qv", base_dir, targets=("q_proj", "v_proj"), seed=1)
    weights = load_lora_adapter(path, targets, max_rank=8, name="qv")
    assert weights.name == "qv"
    assert set(weights.modules) == {f"model.layers.{i}.self_attn.qkv_proj"
                                    for i in range(model.dims.num_layers)}
    target = targets["model.layers.0.self_attn.qkv_proj"]
    a_k, b_k = _blocks(weights, target, "k")
    assert not a_k.any() and not b_k.any()
    _check_against_peft(weights, targets, _peft_reference(base_dir, path), model.dims.num_layers)


def test_rslora_scaling(tmp_path, base_dir, targets):
    path = make_tiny_lora(tmp_path / "rs", base_dir, rank=4, alpha=8, use_rslora=True,
                          targets=("o_proj",))
    weights = load_lora_adapter(path, targets, max_rank=8)
    assert weights.rank == 4
    assert weights.scaling == pytest.approx(8 / math.sqrt(4))
    reference = _peft_reference(base_dir, path)
    assert next(iter(reference.values()))[0] == pytest.approx(weights.scaling)


def test_rank_and_alpha_patterns(tmp_path, base_dir, model, targets):
    path = make_tiny_lora(tmp_path / "pat", base_dir, rank=4, alpha=8,
                          targets=("q_proj", "v_proj", "down_proj"),
                          rank_pattern={"q_proj": 8}, alpha_pattern={"down_proj": 32})
    weights = load_lora_adapter(path, targets, max_rank=8)
    assert weights.rank == 8 and weights.scaling == 8 / 4
    _check_against_peft(weights, targets, _peft_reference(base_dir, path),
                        model.dims.num_layers, exact=False)


def test_fused_qkv_output_matches_peft(base_dir, model, targets, full_adapter):
    """``W x + scaling * B (A x)`` on Backplane's qkv_proj == peft's q/k/v modules' outputs."""
    weights = load_lora_adapter(full_adapter, targets, max_rank=8)
    reference = _peft_reference(base_dir, full_adapter)
    x = torch.randn(5, model.dims.hidden_size, generator=torch.Generator().manual_seed(0))
    for i in range(model.dims.num_layers):
        module = model.get_submodule(f"model.layers.{i}.self_attn.qkv_proj")
        a, b = weights.modules[module_name := f"model.layers.{i}.self_attn.qkv_proj"]
        with torch.no_grad():
            ours = module(x) + weights.scaling * ((x @ a.T) @ b.T)
        target = targets[module_name]
        for part, hf_name in FUSED["self_attn.qkv_proj"].items():
            start, size = target.part_offsets()[part], target.parts[part]
            with torch.no_grad():
                theirs = reference[f"model.layers.{i}.{hf_name}"][3](x)
            torch.testing.assert_close(ours[:, start:start + size], theirs, rtol=1e-5, atol=1e-5)
            # ... and the adapter really changes it.
            assert not torch.allclose(module(x).detach()[:, start:start + size], theirs)


# ---------------------------------------------------------------- refusals


def _variant(tmp_path, src, config=None, tensors=None, name="variant"):
    """A copy of adapter ``src`` with config fields updated and/or tensors rewritten."""
    dst = tmp_path / name
    shutil.copytree(src, dst)
    if config:
        with open(dst / "adapter_config.json") as f:
            data = json.load(f)
        data.update(config)
        with open(dst / "adapter_config.json", "w") as f:
            json.dump(data, f)
    if tensors is not None:
        data = tensors(load_file(dst / "adapter_model.safetensors"))
        save_file(data, dst / "adapter_model.safetensors")
    return str(dst)


def _refused(path, targets, *needles, max_rank=16):
    with pytest.raises(ValueError) as info:
        load_lora_adapter(path, targets, max_rank=max_rank)
    assert isinstance(info.value, LoRAAdapterError)
    message = str(info.value)
    assert str(path) in message
    for needle in needles:
        assert needle in message, message
    return message


def test_missing_directory_and_files(tmp_path, targets, full_adapter):
    _refused(str(tmp_path / "nope"), targets, "does not exist")
    no_config = _variant(tmp_path, full_adapter, name="noconfig")
    os.remove(os.path.join(no_config, "adapter_config.json"))
    _refused(no_config, targets, "adapter_config.json is missing")
    no_weights = _variant(tmp_path, full_adapter, name="noweights")
    os.remove(os.path.join(no_weights, "adapter_model.safetensors"))
    _refused(no_weights, targets, "adapter_model.safetensors is missing")


def test_bin_only_is_refused(tmp_path, targets, full_adapter):
    path = _variant(tmp_path, full_adapter)
    tensors = load_file(os.path.join(path, "adapter_model.safetensors"))
    torch.save(tensors, os.path.join(path, "adapter_model.bin"))
    os.remove(os.path.join(path, "adapter_model.safetensors"))
    _refused(path, targets, "adapter_model.bin", "adapter_model.safetensors is required")


def test_rank_above_max(targets, full_adapter):
    _refused(full_adapter, targets, "r 8", "max_lora_rank 4", max_rank=4)


def test_rank_pattern_above_max(tmp_path, base_dir, targets):
    path = make_tiny_lora(tmp_path / "pat", base_dir, rank=4, targets=("q_proj",),
                          rank_pattern={"q_proj": 16})
    _refused(path, targets, "rank_pattern['q_proj'] 16", "max_lora_rank 8", max_rank=8)


@pytest.mark.parametrize("config,needles", [
    ({"bias": "all"}, ("bias 'all'", "only 'none'")),
    ({"lora_bias": True}, ("lora_bias True",)),
    ({"use_dora": True}, ("use_dora True", "DoRA")),
    ({"fan_in_fan_out": True}, ("fan_in_fan_out True",)),
    ({"modules_to_save": ["lm_head"]}, ("modules_to_save ['lm_head']",
                                        "LoRA on embeddings/lm_head is not supported")),
    ({"modules_to_save": ["score"]}, ("modules_to_save ['score']",)),
    ({"target_modules": ["q_proj", "embed_tokens"]}, ("'embed_tokens'",
                                                      "LoRA on embeddings/lm_head is not supported")),
    ({"target_modules": ["q_proj", "c_attn"]}, ("target_modules entry 'c_attn'",)),
    ({"peft_type": "IA3"}, ("peft_type 'IA3'",)),
    ({"r": 0}, ("r 0",)),
])
def test_unsupported_config(tmp_path, targets, full_adapter, config, needles):
    _refused(_variant(tmp_path, full_adapter, config=config), targets, *needles)


def test_embedding_lora_is_refused(tmp_path, base_dir, targets):
    path = make_tiny_lora(tmp_path / "emb", base_dir, targets=("embed_tokens", "q_proj"))
    _refused(path, targets, "LoRA on embeddings/lm_head is not supported")


def test_dora_tensors_are_refused(tmp_path, targets, full_adapter):
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"

    def add_magnitude(t):
        return {**t, key: torch.ones(64)}

    path = _variant(tmp_path, full_adapter, config={"use_dora": False}, tensors=add_magnitude)
    _refused(path, targets, "DoRA", key)


def test_module_the_model_lacks(tmp_path, targets, full_adapter):
    def rename(t):
        return {k.replace("layers.1.self_attn.q_proj", "layers.1.self_attn.x_proj"): v
                for k, v in t.items()}

    _refused(_variant(tmp_path, full_adapter, tensors=rename), targets,
             "'model.layers.1.self_attn.x_proj'", "does not have")

    def extra_layer(t):
        return {**t, **{k.replace("layers.1.", "layers.7."): v.clone() for k, v in t.items()}}

    _refused(_variant(tmp_path, full_adapter, tensors=extra_layer, name="l7"), targets,
             "'model.layers.7.", "does not have")


def test_shapes_of_another_base_model(tmp_path, targets, full_adapter):
    def narrow_hidden(t):  # as if trained on a model with hidden size 32
        return {k: (v[:, :32].contiguous() if k.endswith("q_proj.lora_A.weight") else v) for k, v in t.items()}

    _refused(_variant(tmp_path, full_adapter, tensors=narrow_hidden), targets,
             "'model.layers.0.self_attn.q_proj'", "[8, 32]", "[r, 64]", "different base model")

    def short_b(t):
        return {k: (v[:16].contiguous() if k.endswith("k_proj.lora_B.weight") else v) for k, v in t.items()}

    _refused(_variant(tmp_path, full_adapter, tensors=short_b, name="b"), targets,
             "k_proj", "[16, 8]", "[32, r]")


def test_missing_half_of_a_pair(tmp_path, targets, full_adapter):
    def drop_b(t):
        return {k: v for k, v in t.items() if "layers.0.mlp.up_proj.lora_B" not in k}

    _refused(_variant(tmp_path, full_adapter, tensors=drop_b), targets,
             "'model.layers.0.mlp.up_proj'", "lora_B")


def test_no_lora_tensors(tmp_path, targets, full_adapter):
    _refused(_variant(tmp_path, full_adapter, tensors=lambda t: {}), targets, "no LoRA tensors")
    _refused(_variant(tmp_path, full_adapter, name="other",
                      tensors=lambda t: {"base_model.model.lm_head.weight": torch.zeros(2, 2)}),
             targets, "LoRA on embeddings/lm_head is not supported")
    _refused(_variant(tmp_path, full_adapter, name="other2",
                      tensors=lambda t: {"base_model.model.score.weight": torch.zeros(2, 2)}),
             targets, "is not a LoRA tensor")


def test_checkpoint_fused_modules_phi3(tmp_path):
    """Phi-3's adapters target qkv_proj / gate_up_proj whole: each part gets A and its rows of B."""
    from tests.fixtures.tiny_phi3 import make_tiny_phi3

    base = make_tiny_phi3(tmp_path / "phi3", longrope=False)
    phi3 = load_model(ModelConfig(model=base), "cpu")
    targets = lora_targets(phi3)
    assert targets["model.layers.0.self_attn.qkv_proj"].parts.keys() == {"q", "k", "v"}
    path = make_tiny_lora(tmp_path / "ad", base, rank=4, alpha=8,
                          targets=("qkv_proj", "o_proj", "gate_up_proj", "down_proj"))
    weights = load_lora_adapter(path, targets, max_rank=4)
    reference = _peft_reference(base, path)
    assert set(weights.modules) == set(reference) == set(targets)
    for module_name, (scale, ref_a, ref_b, _) in reference.items():
        target = targets[module_name]
        _check_layout(weights, target)
        assert weights.scaling == scale
        a, b = weights.modules[module_name]
        # All parts together: B @ A equals peft's delta (each part's rows from its own block).
        torch.testing.assert_close(b @ a, ref_b @ ref_a)
        for part in target.parts:
            a_p, b_p = _blocks(weights, target, part)
            start, size = target.part_offsets()[part], target.parts[part]
            assert torch.equal(a_p, ref_a)
            assert torch.equal(b_p, ref_b[start:start + size])


def test_check_adapter_config_reads_no_weights(tmp_path, full_adapter):
    config = check_adapter_config(full_adapter, max_rank=8)
    assert config["r"] == 8 and config["peft_type"] == "LORA"
    with pytest.raises(LoRAAdapterError, match="r 8 is above max_lora_rank 4"):
        check_adapter_config(full_adapter, max_rank=4)
    with pytest.raises(LoRAAdapterError, match="LoRA on embeddings/lm_head is not supported"):
        check_adapter_config(_variant(tmp_path, full_adapter, config={
            "target_modules": ["lm_head"]}), max_rank=8)
    with pytest.raises(LoRAAdapterError, match="does not exist"):
        check_adapter_config(str(tmp_path / "missing"), max_rank=8)
    # Tensors are not read: a broken weights file passes this check ...
    broken = _variant(tmp_path, full_adapter, name="broken")
    with open(os.path.join(broken, "adapter_model.safetensors"), "wb") as f:
        f.write(b"not safetensors")
    check_adapter_config(broken, max_rank=8)


def test_unreadable_weights(tmp_path, targets, full_adapter):
    broken = _variant(tmp_path, full_adapter)
    with open(os.path.join(broken, "adapter_model.safetensors"), "wb") as f:
        f.write(b"not safetensors")
    _refused(broken, targets, "adapter_model.safetensors cannot be read")
