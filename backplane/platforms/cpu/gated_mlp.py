"""A gated MLP's gate/up projection and SiLU-and-mul in one GEMM, for the steps the
decoder-layer runner declines (prefills and mixed batches).

Decode steps already fuse them inside ``decoder_layer_decode``; the module path ran
the gate/up GEMM into a ``[tokens, 2 x intermediate]`` bf16 product and then the
activation over it. At a 2048-token prefill chunk on the qwen2-0.5b shape that
product is 40 MB a layer, written by the GEMM and read back by the activation, whose
pass was 2.3% of a prefill's samples. ``gemm_bf16_silu`` (kernels/gemm_bf16.c)
writes the activation straight from the GEMM's accumulators, bit-identical to the
two steps, so the hook (``mlp.set_gate_up_activation``, plugins_sdk.decoder_block)
changes no result. BACKPLANE_CPU_FUSED_GATE_UP=0 turns it off with the decode one.
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from backplane.platforms.cpu.decoder_layer import fused_gate_up_function, native_gemms
from backplane.platforms.cpu.fused_layers import FusedSiluAndMul
from backplane.platforms.cpu.linear import NativeGemm
from backplane.platforms.cpu.native import check_status

_P, _I64 = ctypes.c_void_p, ctypes.c_int64
# gemm_bf16_silu(x, xs, m, packed, d, k, bias, act, act_stride) -> 0, or -1 (refused)
_SILU_GEMM = ctypes.CFUNCTYPE(ctypes.c_int, _P, _I64, _I64, _P, _I64, _I64, _P, _P, _I64)


class FusedGateUpSilu:
    """``act(gate_up_proj(x))`` of one gated MLP in one C call, for bf16 row-major
    ``x`` of two or more rows; None otherwise (the modules then run). One row keeps
    the two steps: there the GEMM is a single weight stream, faster than the fused
    kernel's two (decoder_layer_decode makes the same choice)."""

    def __init__(self, mlp: nn.Module, gemm: NativeGemm) -> None:
        """``gemm``: the MLP's gate/up projection as C calls it, with a ``silu_function``."""
        self._mlp = mlp
        self._proj = mlp.gate_up_proj  # also keeps the packed weight alive
        self._gemm = gemm
        self._call = _SILU_GEMM(gemm.silu_function)

    def __call__(self, x: torch.Tensor) -> torch.Tensor | None:
        g = self._gemm
        # A projection replaced since (a LoRA wrapper, say) must run as itself.
        if (self._mlp.gate_up_proj is not self._proj or x.dtype != torch.bfloat16
                or x.dim() != 2 or x.shape[0] < 2 or x.stride(1) != 1
                or x.shape[1] != g.in_features):
            return None
        m, d = x.shape[0], g.out_features // 2
        act = torch.empty(m, d, dtype=torch.bfloat16)
        check_status(self._call(x.data_ptr(), x.stride(0), m, g.packed, d, g.in_features,
                                g.bias, act.data_ptr(), d), "gate/up GEMM with SiLU")
        return act


def set_gate_up_activations(model: nn.Module) -> int:
    """Give every gated MLP of ``model`` whose gate/up GEMM has a SiLU-fused kernel
    and whose activation is the platform's SiLU-and-mul a `FusedGateUpSilu`;
    returns how many."""
    count = 0
    for module in model.modules():
        if getattr(type(module), "layer_kind", None) != "gated_mlp":
            continue
        if not isinstance(getattr(module, "act", None), FusedSiluAndMul):
            continue
        parts = native_gemms(module.gate_up_proj)
        if parts is None or fused_gate_up_function(parts) is None:
            continue
        module.set_gate_up_activation(FusedGateUpSilu(module, parts[0]))
        count += 1
    return count
