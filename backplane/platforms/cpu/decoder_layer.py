"""A decode step's decoder layer in one C call (kernels/cpu_ops.c,
``decoder_layer_decode``).

Called from Python, one layer of a decode step is nine kernel calls (two norms,
four GEMMs, rotary, attention, SiLU-and-mul) plus the residual add, each behind
a module call, dtype and layout checks, an output allocation and ctypes'
argument conversion. On the qwen2-0.5b shape at batch 1 (2-core Zen 4) that
host work was ~190 us a layer, 4.5-6 ms of a 37-40 ms step, 13-15% of it;
with every GEMM replaced by a preallocated output the step still took 5.8 ms.
Here the same kernels run in the same order from C, on per-layer arguments
prepared at load and per-step arguments prepared once by the step's first
layer, so the output is bit-identical to the module path.

The runner (`DecoderLayerRunner`) is given to every plain pre-norm decoder layer
(``layer.block()``, plugins_sdk.decoder_block) whose parts are this platform's:
fused bf16 norms, rotary and SiLU-and-mul, and linear layers with a C GEMM
(bf16, int8 W8A16 / W8A8, fp8, GPTQ / AWQ int4 without act-order, and the
quantized checkpoint layers running them). It declines (the modules run) every
step that is not a pure decode batch on the ``cpu_paged`` backend:
prefills and mixed batches, per-layer backends, the KV-scale calibration step.
BACKPLANE_CPU_DECODER_LAYER=0 turns it off.

When every decoder layer of the model has a runner, the model gets a
`DecoderStackRunner` too (``model.set_stack_runner``): a decode step's layers
then run in one ``decoder_stack_decode`` call, which calls
``decoder_layer_decode`` layer after layer, so the Python between the layers
(~0.5-0.8 ms of a qwen2-0.5b batch-1 step) goes as well.
BACKPLANE_CPU_DECODER_STACK=0 keeps one call per layer.
"""

from __future__ import annotations

import ctypes
import os

import torch
from torch import nn

from backplane.platforms.cpu.fused_layers import FusedRMSNorm, FusedRotary, FusedSiluAndMul, cpu_ops
from backplane.platforms.cpu.linear import NativeGemm
from backplane.platforms.cpu.native import check_status
from backplane.platforms.cpu.paged_attention import (
    UNIT_KV_SCALES,
    CpuPagedAttentionBackend,
    CpuPagedAttentionMetadata,
)
from backplane.plugins_sdk import DecoderBlock

_P, _I64, _I32, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_float


class _Gemm(ctypes.Structure):  # cpu_ops.c: native_gemm
    _fields_ = [("kind", _I64), ("fn", _P), ("packed", _P), ("scales", _P), ("zeros", _P),
                ("offsets", _P), ("bias", _P), ("n", _I64), ("k", _I64), ("group", _I64)]


_MAX_PARTS = 3  # cpu_ops.c: MAX_PARTS
_KINDS = {"bf16": 0, "scaled": 1, "int4": 2}


class _Linear(ctypes.Structure):  # cpu_ops.c: native_linear
    _fields_ = [("parts", _I64), ("part", _Gemm * _MAX_PARTS)]


class _Layer(ctypes.Structure):  # cpu_ops.c: decoder_layer
    _fields_ = [("hidden", _I64), ("num_heads", _I64), ("num_kv_heads", _I64),
                ("head_size", _I64), ("intermediate", _I64), ("input_eps", _F32),
                ("post_eps", _F32), ("scale", _F32), ("input_norm", _P), ("post_norm", _P),
                ("qkv", _Linear), ("o", _Linear), ("gate_up", _Linear), ("down", _Linear),
                ("key_cache", _P), ("value_cache", _P), ("num_blocks", _I64),
                ("kv_scales", _P), ("gate_up_silu", _P)]


class _Step(ctypes.Structure):  # cpu_ops.c: decode_step
    _fields_ = [("attention", _P), ("tokens", _I64), ("cos", _P), ("sin", _P), ("slots", _P),
                ("block_table", _P), ("block_table_stride", _I64), ("seq_lens", _P),
                ("window", _I32), ("soft_cap", _F32)]


def _linear(parts: list[NativeGemm]) -> _Linear:
    linear = _Linear(parts=len(parts))
    for i, g in enumerate(parts):
        slot = linear.part[i]
        slot.kind, slot.fn, slot.packed, slot.bias = _KINDS[g.kind], g.function, g.packed, g.bias
        slot.scales, slot.zeros, slot.offsets = g.scales, g.zeros, g.offsets
        slot.n, slot.k, slot.group = g.out_features, g.in_features, g.group
    return linear


def fused_gate_up_function(parts: list[NativeGemm]) -> int | None:
    """The gate/up GEMM with SiLU-and-mul in its store, when the layer's kernel has one
    (bit-identical to the two steps; BACKPLANE_CPU_FUSED_GATE_UP=0: the two steps)."""
    if len(parts) != 1 or os.environ.get("BACKPLANE_CPU_FUSED_GATE_UP", "1") == "0":
        return None
    return parts[0].silu_function


def native_gemms(module: nn.Module) -> list[NativeGemm] | None:
    """The GEMMs of a linear layer whose kernels C can call, side by side in its output:
    the platform's own linear layers, and quantized checkpoint layers (``layer_kind``
    ``"quantized_linear"``) through their platform kernels (a 4-bit fused q/k/v has one
    per part). None when one of them has no C entry point."""
    if getattr(type(module), "layer_kind", None) == "quantized_linear":
        kernels = getattr(module, "kernels", None)
        if kernels is None or not 0 < len(kernels) <= _MAX_PARTS:
            return None
        parts = [native_gemms(kernel) for kernel in kernels]
        return None if any(p is None for p in parts) else [g for p in parts for g in p]
    native = getattr(module, "native_gemm", None)
    gemm = native() if native is not None else None
    return None if gemm is None else [gemm]


class DecodeStepPlan:
    """The per-step C arguments, shared by the layers of one model: built by the first
    layer of each step and reused by the others. Also owns the scratch memory the layers
    share (they run one after another)."""

    def __init__(self) -> None:
        self.step = _Step()
        self.address = ctypes.addressof(self.step)
        self._key: tuple[object, object] | None = None  # (metadata, cos) of the built step
        self._keep: tuple[torch.Tensor, ...] = ()  # the step's tensors the struct points into
        self.accepted = False
        self.backend: CpuPagedAttentionBackend | None = None
        self._workspace = torch.empty(0, dtype=torch.bfloat16)

    def prepare(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx,
                half_rotary: int) -> bool:
        """Whether this step runs in C; builds its arguments on the step's first call."""
        if self._key is not None and self._key[0] is ctx.metadata and self._key[1] is cos:
            return self.accepted
        self._key = (ctx.metadata, cos)
        self._keep = (sin, x)
        self.accepted = self._build(x, cos, sin, ctx, half_rotary)
        return self.accepted

    def _build(self, x, cos, sin, ctx, half_rotary: int) -> bool:
        backend, metadata = ctx.backend, ctx.metadata
        if (not isinstance(backend, CpuPagedAttentionBackend)
                or not isinstance(metadata, CpuPagedAttentionMetadata)
                or not metadata.decode_only or ctx.layer_backends is not None
                or ctx.observe_kv_scales is not None
                or (ctx.kv_scales is not None) != backend.quantized_cache):
            return False
        n = metadata.num_actual_tokens
        if (x.dtype != torch.bfloat16 or x.dim() != 2 or not x.is_contiguous()
                or x.shape[0] != n):
            return False
        # the rotary kernel's layout: whole heads rotated, one [half] row per token
        if not all(t.dtype == torch.bfloat16 and t.is_contiguous() and t.shape[-1] == half_rotary
                   and t.numel() == n * half_rotary for t in (cos, sin)):
            return False
        attention, window, soft_cap = backend.decode_kernel()
        table, table_stride, _, seq_lens = metadata.attention_args
        step = self.step
        step.attention, step.tokens, step.cos, step.sin = attention, n, cos.data_ptr(), sin.data_ptr()
        step.slots = metadata.slot_mapping.data_ptr()
        step.block_table, step.block_table_stride, step.seq_lens = table, table_stride, seq_lens
        step.window, step.soft_cap = window, soft_cap
        self.backend = backend
        return True

    def workspace(self, elements: int) -> int:
        """Address of at least ``elements`` bf16 of scratch (grown, never shrunk)."""
        if self._workspace.numel() < elements:
            self._workspace = torch.empty(elements, dtype=torch.bfloat16)
        return self._workspace.data_ptr()


class DecoderLayerRunner:
    """A decoder layer's block runner (``layer.set_block_runner``): the whole layer in
    one ``decoder_layer_decode`` call for decode steps, None (the modules run) for
    anything else."""

    def __init__(self, block: DecoderBlock, gemms: dict[str, list[NativeGemm]],
                 plan: DecodeStepPlan) -> None:
        self._plan = plan
        self._block = block  # keeps the weights whose addresses the struct holds alive
        self._layer_idx = block.layer_idx
        self.half_rotary = block.head_size // 2
        self.hidden = block.input_norm.hidden_size
        norm_in, norm_post = block.input_norm, block.post_attention_norm
        self._layer = _Layer(
            hidden=self.hidden, num_heads=block.num_heads, num_kv_heads=block.num_kv_heads,
            head_size=block.head_size, intermediate=block.down_proj.in_features,
            input_eps=norm_in.eps, post_eps=norm_post.eps, scale=block.scale,
            input_norm=norm_in.weight.data_ptr(), post_norm=norm_post.weight.data_ptr(),
            qkv=_linear(gemms["qkv"]), o=_linear(gemms["o"]),
            gate_up=_linear(gemms["gate_up"]), down=_linear(gemms["down"]),
            gate_up_silu=fused_gate_up_function(gemms["gate_up"]))
        self.address = ctypes.addressof(self._layer)  # the struct, for DecoderStackRunner
        self._lib = cpu_ops()
        self._call = self._lib.decoder_layer_decode
        self._workspace_per_token = self._lib.decoder_layer_workspace(self.address, 1)
        self._kv: torch.Tensor | None = None  # the cache tensor the struct points at
        self._kv_scales: torch.Tensor | None = None

    @classmethod
    def for_block(cls, block: DecoderBlock, plan: DecodeStepPlan) -> DecoderLayerRunner | None:
        """A runner for ``block``, or None when one of its parts has no C kernel here."""
        if not (isinstance(block.input_norm, FusedRMSNorm)
                and isinstance(block.post_attention_norm, FusedRMSNorm)
                and isinstance(block.rotary, FusedRotary)
                and isinstance(block.activation, FusedSiluAndMul)
                and block.input_norm.weight.dtype == torch.bfloat16
                and block.post_attention_norm.weight.dtype == torch.bfloat16):
            return None
        gemms = {}
        for name, module in (("qkv", block.qkv_proj), ("o", block.o_proj),
                             ("gate_up", block.gate_up_proj), ("down", block.down_proj)):
            gemms[name] = native_gemms(module)
            if gemms[name] is None:
                return None
        hidden = block.input_norm.hidden_size
        q, kv = block.num_heads * block.head_size, block.num_kv_heads * block.head_size
        inter = block.down_proj.in_features
        expected = {"qkv": (q + 2 * kv, hidden), "o": (hidden, q), "gate_up": (2 * inter, hidden),
                    "down": (hidden, inter)}
        for name, parts in gemms.items():
            width, depth = expected[name]
            if (sum(g.out_features for g in parts) != width
                    or any(g.in_features != depth for g in parts)):
                return None
        return cls(block, gemms, plan)

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx
                 ) -> torch.Tensor | None:
        plan = self._plan
        if not plan.prepare(x, cos, sin, ctx, self.half_rotary) or not self.bind(ctx):
            return None
        m = x.shape[0]
        workspace = plan.workspace(m * self._workspace_per_token)
        out = torch.empty(m, self.hidden, dtype=torch.bfloat16)
        check_status(self._call(self.address, plan.address, x.data_ptr(), out.data_ptr(),
                                workspace), "decoder layer's GEMM")
        return out

    def bind(self, ctx) -> bool:
        """Point the struct at this step's cache (and fp8 scales) of the layer, after the
        plan accepted the step; False for ones the backend would refuse."""
        kv = ctx.kv_caches[self._layer_idx]
        if kv is not self._kv and not self._bind_cache(kv, self._plan.backend):
            return False
        if ctx.kv_scales is not None:
            scales = ctx.kv_scales[self._layer_idx]
            if scales is not self._kv_scales and not self._bind_scales(scales):
                return False
        return True

    def _bind_cache(self, kv: torch.Tensor, backend: CpuPagedAttentionBackend) -> bool:
        """Point the struct at this layer's cache (once per cache tensor); False for a
        cache the backend would refuse (its forward then says why)."""
        if kv.dtype != backend.cache_dtype or not kv.is_contiguous():
            return False
        layer = self._layer
        layer.key_cache = kv.data_ptr()
        layer.value_cache = kv.data_ptr() + kv.stride(0) * kv.element_size()
        layer.num_blocks = kv.shape[2]
        layer.kv_scales = UNIT_KV_SCALES.data_ptr()
        self._kv, self._kv_scales = kv, None  # an fp8 cache's scales are bound next
        return True

    def _bind_scales(self, scales: torch.Tensor) -> bool:
        if (scales.dtype != torch.float32 or scales.numel() != 2
                or not scales.is_contiguous()):
            return False
        self._layer.kv_scales = scales.data_ptr()
        self._kv_scales = scales
        return True


class DecoderStackRunner:
    """A model's stack runner (``model.set_stack_runner``): every decoder layer of a
    decode step in one ``decoder_stack_decode`` call, the layers' `DecoderLayerRunner`
    structs in order; None (the layers run one by one) for a step they decline."""

    def __init__(self, runners: list[DecoderLayerRunner], plan: DecodeStepPlan) -> None:
        self._runners = runners
        self._plan = plan
        self._half = runners[0].half_rotary
        self._hidden = runners[0].hidden
        self._count = len(runners)
        self._layers = (ctypes.c_void_p * self._count)(*(r.address for r in runners))
        self._lib = cpu_ops()
        self._call = self._lib.decoder_stack_decode
        self._workspace_per_token = self._lib.decoder_stack_workspace(self._layers,
                                                                      self._count, 1)

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx
                 ) -> torch.Tensor | None:
        plan = self._plan
        if not plan.prepare(x, cos, sin, ctx, self._half):
            return None
        for runner in self._runners:
            if not runner.bind(ctx):
                return None
        m = x.shape[0]
        workspace = plan.workspace(m * self._workspace_per_token)
        out = torch.empty(m, self._hidden, dtype=torch.bfloat16)
        check_status(self._call(self._layers, self._count, plan.address, x.data_ptr(),
                                out.data_ptr(), workspace), "decoder layers' GEMMs")
        return out


def set_decoder_layer_runners(model: nn.Module) -> int:
    """Give every plain decoder layer of ``model`` whose parts run in C a
    `DecoderLayerRunner` (one shared `DecodeStepPlan`), and a model whose decoder
    layers all have one a `DecoderStackRunner` over them; returns how many layers.
    BACKPLANE_CPU_DECODER_LAYER=0: none; BACKPLANE_CPU_DECODER_STACK=0: no stack
    runner (one C call per layer)."""
    if os.environ.get("BACKPLANE_CPU_DECODER_LAYER", "1") == "0":
        return 0
    plan, count = DecodeStepPlan(), 0
    for module in model.modules():
        if getattr(type(module), "layer_kind", None) != "decoder_layer":
            continue
        block = module.block()
        runner = None if block is None else DecoderLayerRunner.for_block(block, plan)
        if runner is not None:
            module.set_block_runner(runner)
            count += 1
    if os.environ.get("BACKPLANE_CPU_DECODER_STACK", "1") != "0":
        for module in model.modules():
            if getattr(type(module), "layer_kind", None) != "decoder_stack":
                continue
            runners = [getattr(layer, "block_runner", None) for layer in module.layers]
            if runners and all(isinstance(r, DecoderLayerRunner) for r in runners):
                module.set_stack_runner(DecoderStackRunner(runners, plan))
    return count
