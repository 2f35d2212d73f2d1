"""The fused-MoE contract: the SDK's grouped default and the Triton kernels vs a naive loop."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from backplane.plugins_sdk import Platform, fused_moe_torch

REPO_ROOT = Path(__file__).resolve().parents[3]


def make_moe_inputs(n, hidden, inter, experts, top_k, dtype=torch.float32, seed=0):
    """Random ``(hidden, w13, w2, topk_weights, topk_ids)`` routed like a softmax router."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, hidden, generator=gen).to(dtype)
    w13 = (torch.randn(experts, 2 * inter, hidden, generator=gen) * hidden**-0.5).to(dtype)
    w2 = (torch.randn(experts, hidden, inter, generator=gen) * inter**-0.5).to(dtype)
    logits = torch.randn(n, experts, generator=gen)
    weights, ids = torch.topk(torch.softmax(logits, -1), top_k, dim=-1)
    return x, w13, w2, weights, ids


def naive_fused_moe(x, w13, w2, topk_weights, topk_ids, activation="silu"):
    """The contract token by token, slot by slot, in float64."""
    inter = w2.shape[2]
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(topk_ids.shape[1]):
            e = int(topk_ids[t, j])
            gate_up = w13[e].double() @ x[t].double()
            h = F.silu(gate_up[:inter]) * gate_up[inter:]
            out[t] += float(topk_weights[t, j]) * (w2[e].double() @ h)
    return out.to(x.dtype)


@pytest.mark.parametrize(
    ("n", "hidden", "inter", "experts", "top_k"),
    [(1, 16, 8, 4, 1), (13, 32, 24, 8, 2), (40, 16, 16, 6, 3), (5, 16, 8, 16, 2)],
)
def test_sdk_default_matches_naive_reference(n, hidden, inter, experts, top_k):
    args = make_moe_inputs(n, hidden, inter, experts, top_k, seed=n)
    before = [a.clone() for a in args]
    got = fused_moe_torch(*args)
    torch.testing.assert_close(got, naive_fused_moe(*args), rtol=1e-5, atol=1e-5)
    for a, b in zip(args, before, strict=True):
        assert torch.equal(a, b), "fused_moe changed an input"


def test_sdk_default_bfloat16_and_empty_batch():
    args = make_moe_inputs(9, 32, 16, 4, 2, dtype=torch.bfloat16, seed=3)
    got = fused_moe_torch(*args)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), naive_fused_moe(*args).float(), rtol=3e-2, atol=3e-2)
    empty = fused_moe_torch(args[0][:0], *args[1:3], args[3][:0], args[4][:0])
    assert empty.shape == (0, 32)


def test_platform_default_is_the_sdk_op_and_refuses_other_activations():
    class Bare(Platform):
        pass

    platform = Bare.__new__(Bare)  # the method needs no platform state
    args = make_moe_inputs(6, 16, 8, 4, 2, seed=1)
    torch.testing.assert_close(platform.fused_moe(*args), fused_moe_torch(*args))
    with pytest.raises(ValueError, match="gelu"):
        platform.fused_moe(*args, activation="gelu")


def test_moe_layers_use_the_op_they_are_bound_to():
    from backplane.core.layers.fused_moe import FusedMoE, bind_fused_moe

    layer = FusedMoE(4, 16, 8, top_k=2, renormalize=True)
    torch.nn.init.normal_(layer.w13)
    torch.nn.init.normal_(layer.w2)
    calls = []

    def op(*args):
        calls.append(args[4].shape)
        return fused_moe_torch(*args)

    assert bind_fused_moe(torch.nn.Sequential(layer), op) == 1
    x, logits = torch.randn(3, 16), torch.randn(3, 4)
    out = layer(x, logits)
    assert calls == [(3, 2)] and out.shape == (3, 16)
    weights, ids = torch.topk(torch.softmax(logits, -1), 2, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    torch.testing.assert_close(out, naive_fused_moe(x, layer.w13, layer.w2, weights, ids))


@pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                    reason="triton is not installed (pip install triton) - Triton MoE not tested")
def test_triton_fused_moe_matches_reference_interpreted():
    from tests.core.layers import moe_interpret_runner

    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "tests.core.layers.moe_interpret_runner"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"interpreter run failed:\n{proc.stderr[-4000:]}"
    results = json.loads(proc.stdout)
    for case_id in moe_interpret_runner.case_ids():
        assert results.get(case_id) == "ok", f"{case_id}: {results.get(case_id)}"
