"""EAGLE-1 / EAGLE-3 draft heads and the target's auxiliary hidden states.

The heads run through the CPU platform's paged attention backend and are
checked against a small dense, pure-torch reference written here from the
published formulas (SafeAILab/EAGLE), over the same checkpoint tensors.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from backplane.config.configs import ModelConfig
from backplane.core.loader import load_model
from backplane.core.models.base import CausalLM, KVCacheShape, WeightShapeError
from backplane.core.models.eagle import (
    Eagle1Head,
    Eagle3Head,
    default_aux_layer_ids,
    load_eagle_head,
)
from backplane.platforms.cpu.attention import CpuSdpaAttentionBackend
from tests.fixtures.paged import PagedBatch
from tests.fixtures.tiny_eagle import make_tiny_eagle

ATOL = 1e-5
AUX_IDS = [0, 1, 2]  # the tiny target has 2 layers: embeddings, after layer 0, after layer 1


@pytest.fixture(scope="module")
def target_dir(tiny_model_factory) -> str:
    return tiny_model_factory("llama")


@pytest.fixture(scope="module")
def target(target_dir):
    return load_model(ModelConfig(model=target_dir), "cpu")


@pytest.fixture(scope="module")
def heads_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("eagle_heads")


def _make(heads_dir, target_dir, name, method, **kw) -> str:
    path = os.path.join(heads_dir, name)
    if method == "eagle3":
        kw.setdefault("aux_layer_ids", AUX_IDS)
    return make_tiny_eagle(path, target_dir, method, **kw)


# --------------------------------------------------------------------------- reference


def _rms(x, w, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x, positions, theta, head_dim):
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = positions[:, None].double() * inv[None]
    cos, sin = angles.cos().float()[:, None], angles.sin().float()[:, None]
    half = head_dim // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def _dense_attention(x, w, prefix, positions, cfg):
    """Causal GQA attention over one sequence, ``x`` [n, d_in]."""
    n = x.shape[0]
    heads, kv_heads, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    theta = cfg.get("rope_theta") or cfg.get("rope_parameters", {}).get("rope_theta", 10000.0)
    q = (x @ w[f"{prefix}.q_proj.weight"].T).view(n, heads, hd)
    k = (x @ w[f"{prefix}.k_proj.weight"].T).view(n, kv_heads, hd)
    v = (x @ w[f"{prefix}.v_proj.weight"].T).view(n, kv_heads, hd)
    q, k = _rope(q, positions, theta, hd), _rope(k, positions, theta, hd)
    rep = heads // kv_heads
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * hd**-0.5
    mask = torch.ones(n, n, dtype=torch.bool).tril()
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    out = torch.einsum("hqk,khd->qhd", probs, v).reshape(n, heads * hd)
    return out @ w[f"{prefix}.o_proj.weight"].T


def _mlp(x, w, prefix):
    gate, up = x @ w[f"{prefix}.gate_proj.weight"].T, x @ w[f"{prefix}.up_proj.weight"].T
    return (F.silu(gate) * up) @ w[f"{prefix}.down_proj.weight"].T


def _load(path):
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    return cfg, load_file(os.path.join(path, "model.safetensors"))


def _ref_eagle1(head_dir, target_dir, tokens, hidden_in):
    """Per token: fc(cat(embed, hidden)), layers (layer 0 without input norm); target lm_head."""
    cfg, w = _load(head_dir)
    _, tw = _load(target_dir)
    positions = torch.arange(len(tokens))
    x = torch.cat((tw["model.embed_tokens.weight"][tokens], hidden_in), -1)
    x = x @ w["fc.weight"].T + w["fc.bias"]
    for i in range(cfg["num_hidden_layers"]):
        h = x if i == 0 else _rms(x, w[f"layers.{i}.input_layernorm.weight"])
        x = x + _dense_attention(h, w, f"layers.{i}.self_attn", positions, cfg)
        x = x + _mlp(_rms(x, w[f"layers.{i}.post_attention_layernorm.weight"]), w,
                     f"layers.{i}.mlp")
    return x, x @ tw["lm_head.weight"].T


def _ref_eagle3(head_dir, target_dir, tokens, g):
    """Per token (``g``: the fused hidden state): midlayer, norm, draft lm_head, d2t scatter."""
    cfg, w = _load(head_dir)
    _, tw = _load(target_dir)
    positions = torch.arange(len(tokens))
    emb = tw["model.embed_tokens.weight"][tokens]
    m = "midlayer"
    x = torch.cat((_rms(emb, w[f"{m}.input_layernorm.weight"]),
                   _rms(g, w[f"{m}.hidden_norm.weight"])), -1)
    x = g + _dense_attention(x, w, f"{m}.self_attn", positions, cfg)
    x = x + _mlp(_rms(x, w[f"{m}.post_attention_layernorm.weight"]), w, f"{m}.mlp")
    draft_logits = _rms(x, w["norm.weight"]) @ w["lm_head.weight"].T
    logits = torch.full((len(tokens), cfg["vocab_size"]), float("-inf"))
    for d in range(cfg["draft_vocab_size"]):
        logits[:, d + int(w["d2t"][d])] = draft_logits[:, d]
    return x, logits


def _tokens(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(6, 480, (n,), generator=g)


# --------------------------------------------------------------------------- loading


@pytest.mark.parametrize("method", ["eagle", "eagle3"])
@pytest.mark.parametrize("prefix", [False, True])
@pytest.mark.parametrize("embed", [False, True])
def test_loads_published_layouts(method, prefix, embed, heads_dir, target_dir, target):
    path = _make(heads_dir, target_dir, f"{method}-p{prefix}-e{embed}", method,
                 model_prefix=prefix, include_embed=embed)
    head = load_eagle_head(path, target, torch.float32, "cpu")
    assert head.method == method
    assert isinstance(head, Eagle1Head if method == "eagle" else Eagle3Head)
    assert (head.embed_tokens is target.model.embed_tokens) is not embed
    _, w = _load(path)
    key = "model.embed_tokens.weight" if prefix else "embed_tokens.weight"
    if embed:
        torch.testing.assert_close(head.embed_tokens.weight, w[key], atol=0, rtol=0)
    fc = w["model.fc.weight" if prefix else "fc.weight"]
    torch.testing.assert_close(head.fc.weight, fc, atol=0, rtol=0)
    # No target parameter is registered in the head.
    names = {n for n, _ in head.named_parameters()}
    assert not any(n.startswith(("model.", "_target")) for n in names)
    assert head.kv_cache_shape() == KVCacheShape(1, 4, 2, 16)
    if method == "eagle":
        assert head.aux_layer_ids == ()
        assert head.fc.weight.shape == (64, 128)
    else:
        assert head.aux_layer_ids == tuple(AUX_IDS)
        assert head.fc.weight.shape == (64, 192)
        assert head.lm_head.weight.shape == (256, 64)
        torch.testing.assert_close(head.d2t, w["d2t"], atol=0, rtol=0)


def test_eagle1_two_layers_and_no_fc_bias(heads_dir, target_dir, target):
    path = _make(heads_dir, target_dir, "eagle-2l-nobias", "eagle", num_layers=2, fc_bias=False)
    head = load_eagle_head(path, target, torch.float32, "cpu")
    assert head.fc.bias is None and head.kv_cache_shape().num_layers == 2
    assert isinstance(head.layers[0].input_layernorm, torch.nn.Identity)
    assert [m.self_attn.attn.layer_idx for m in head.layers] == [0, 1]


def test_eagle3_aux_ids_sorted_and_default(heads_dir, target_dir, target, tiny_model_factory):
    path = _make(heads_dir, target_dir, "eagle3-unsorted", "eagle3", aux_layer_ids=[2, 0, 1])
    assert load_eagle_head(path, target, torch.float32, "cpu").aux_layer_ids == (0, 1, 2)
    assert default_aux_layer_ids(32) == (2, 16, 29)
    # The 2-layer target is too shallow for the default (2, 1, -1).
    path = _make(heads_dir, target_dir, "eagle3-noids", "eagle3", aux_layer_ids=None)
    with pytest.raises(ValueError, match="3 distinct target layers"):
        load_eagle_head(path, target, torch.float32, "cpu")


def test_hidden_size_mismatch(heads_dir, target_dir, target):
    path = _make(heads_dir, target_dir, "bad-hidden", "eagle",
                 config_overrides={"hidden_size": 32})
    with pytest.raises(ValueError, match=r"config\.json: hidden_size 32 does not match the "
                                         r"target model's hidden_size 64"):
        load_eagle_head(path, target, torch.float32, "cpu")


def test_vocab_mismatch(heads_dir, target_dir, target):
    path = _make(heads_dir, target_dir, "bad-vocab", "eagle3",
                 config_overrides={"vocab_size": 1000})
    with pytest.raises(ValueError, match="vocab_size 1000 does not match"):
        load_eagle_head(path, target, torch.float32, "cpu")


def test_shape_errors(heads_dir, target_dir, target):
    # An EAGLE-3 checkpoint labelled as EAGLE-1: fc has 3H inputs, not 2H.
    path = _make(heads_dir, target_dir, "mislabelled", "eagle3",
                 config_overrides={"architectures": ["LlamaForCausalLM"]})
    with pytest.raises(WeightShapeError, match="'fc.weight' has shape \\[64, 192\\]"):
        load_eagle_head(path, target, torch.float32, "cpu")
    path = _make(heads_dir, target_dir, "bad-inter", "eagle",
                 config_overrides={"intermediate_size": 96})
    with pytest.raises(WeightShapeError, match="mlp"):
        load_eagle_head(path, target, torch.float32, "cpu")


def test_not_an_eagle_head(heads_dir, target_dir, target):
    # A plain Llama checkpoint has the EAGLE-1 architecture name but no fc.
    with pytest.raises(ValueError, match="no 'fc.weight'"):
        load_eagle_head(target_dir, target, torch.float32, "cpu")
    path = _make(heads_dir, target_dir, "medusa", "eagle",
                 config_overrides={"architectures": ["MedusaModel"]})
    with pytest.raises(ValueError, match=r"config\.json: architectures \['MedusaModel'\]"):
        load_eagle_head(path, target, torch.float32, "cpu")


# --------------------------------------------------------------------------- numerics


def _run_two_steps(head, tokens, first_hidden):
    """Prefill all but the last token, then one decode step fed the head's own hidden."""
    batch = PagedBatch(head, CpuSdpaAttentionBackend, num_reqs=1, max_len=32)
    ids, pos, ctx = batch.step([0], [tokens[:-1].tolist()])
    out1, feed1 = head(ids, pos, first_hidden, ctx)
    ids, pos, ctx = batch.step([0], [tokens[-1:].tolist()])
    out2, feed2 = head(ids, pos, feed1[-1:], ctx)
    return torch.cat((out1, out2)), torch.cat((feed1, feed2))


@pytest.mark.parametrize("num_layers", [1, 2])
@torch.inference_mode()
def test_eagle1_matches_reference(num_layers, heads_dir, target_dir, target):
    path = _make(heads_dir, target_dir, f"eagle-ref-{num_layers}", "eagle",
                 num_layers=num_layers)
    head = load_eagle_head(path, target, torch.float32, "cpu")
    tokens = _tokens(9, seed=1)
    target_hidden = torch.randn(8, 64, generator=torch.Generator().manual_seed(2))
    out, feed = _run_two_steps(head, tokens, target_hidden)
    assert torch.equal(out, feed)
    ref_in = torch.cat((target_hidden, feed[7:8]))
    ref_hidden, ref_logits = _ref_eagle1(path, target_dir, tokens, ref_in)
    torch.testing.assert_close(out, ref_hidden, atol=ATOL, rtol=0)
    logits = head.compute_logits(out)
    assert logits.dtype == torch.float32 and logits.shape == (9, 512)
    torch.testing.assert_close(logits, ref_logits, atol=ATOL, rtol=0)


@torch.inference_mode()
def test_eagle3_matches_reference(heads_dir, target_dir, target):
    path = _make(heads_dir, target_dir, "eagle3-ref", "eagle3")
    head = load_eagle_head(path, target, torch.float32, "cpu")
    _, w = _load(path)
    tokens = _tokens(9, seed=3)
    aux = torch.randn(8, 192, generator=torch.Generator().manual_seed(4))
    out, feed = _run_two_steps(head, tokens, aux)
    g = torch.cat((aux @ w["fc.weight"].T, feed[7:8]))
    ref_feed, ref_logits = _ref_eagle3(path, target_dir, tokens, g)
    torch.testing.assert_close(feed, ref_feed, atol=ATOL, rtol=0)
    logits = head.compute_logits(out)
    assert logits.dtype == torch.float32 and logits.shape == (9, 512)
    finite = torch.isfinite(logits)
    assert finite.sum(-1).tolist() == [256] * 9
    assert torch.equal(finite, torch.isfinite(ref_logits))
    torch.testing.assert_close(logits[finite], ref_logits[finite], atol=ATOL, rtol=0)
    # The best draft token maps to a target id the draft vocabulary contains.
    assert set(logits.argmax(-1).tolist()) <= set(head.draft_to_target.tolist())


# --------------------------------------------------------------------------- target side


@torch.inference_mode()
def test_target_aux_hidden_states(target_dir, target):
    from transformers import AutoModelForCausalLM

    tokens = _tokens(11, seed=5)
    plain = PagedBatch(target, CpuSdpaAttentionBackend, num_reqs=1, max_len=32)
    ids, pos, ctx = plain.step([0], [tokens.tolist()])
    expected = target(ids, pos, ctx)

    target.set_aux_hidden_layers([2, 0, 1])
    try:
        batch = PagedBatch(target, CpuSdpaAttentionBackend, num_reqs=1, max_len=32)
        ids, pos, ctx = batch.step([0], [tokens.tolist()])
        out = target(ids, pos, ctx)
        aux = target.aux_hidden_states()
    finally:
        target.set_aux_hidden_layers(())
    assert torch.equal(out, expected)  # capturing does not change the output
    assert aux.shape == (11, 3 * 64)
    ref = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    states = ref(tokens[None], output_hidden_states=True).hidden_states
    torch.testing.assert_close(aux[:, 64:128], states[0][0], atol=0, rtol=0)  # layer 0 input
    torch.testing.assert_close(aux[:, 128:], states[1][0], atol=1e-5, rtol=0)  # layer 1 input
    # Index num_layers: the last layer's output before the final norm.
    torch.testing.assert_close(target.model.norm(aux[:, :64]), out, atol=1e-6, rtol=0)
    # Off again: no capture, and asking for the states says so.
    assert target.model.aux_hidden_layers == ()
    with pytest.raises(RuntimeError, match="set_aux_hidden_layers"):
        target.aux_hidden_states()


def test_aux_layer_range_checked(target):
    with pytest.raises(ValueError, match=r"\[3\] are out of range"):
        target.set_aux_hidden_layers([0, 3])


def test_default_refuses_aux_hidden_states():
    class Other(CausalLM):
        def compute_logits(self, hidden):
            return hidden

        def kv_cache_shape(self):
            return KVCacheShape(1, 1, 1, 1)

    with pytest.raises(NotImplementedError, match="EAGLE-3 needs auxiliary hidden states, "
                                                  "which Other does not expose"):
        Other().set_aux_hidden_layers([1])
    with pytest.raises(NotImplementedError, match="which Other does not expose"):
        Other().aux_hidden_states()


def test_eagle3_layer_feeds_2h_into_qkv(heads_dir, target_dir, target):
    path = _make(heads_dir, target_dir, "eagle3-qkv", "eagle3")
    head = load_eagle_head(path, target, torch.float32, "cpu")
    assert head.midlayer.self_attn.qkv_proj.in_features == 128
    assert head.midlayer.self_attn.o_proj.out_features == 64
