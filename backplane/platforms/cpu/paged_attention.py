"""Paged attention for the CPU from a compiled C kernel (kernels/paged_attention.c).

The torch backend (attention.py) has to gather each request's blocks into a
contiguous copy before its matmuls; measured at batch 64 with ~450-token
contexts (qwen2-0.5b shape, bf16) the gathers alone took 38 ms of a 275 ms
decode step and the matmuls another 33 ms. This kernel reads the blocks in
place with an online softmax, one (token, KV head) pair per work item on
torch's OpenMP threads, so a decode token and a prefill token (seeing its
causal prefix) are the same work and a step needs one call per layer.

Cache layout: ``[2, kv_heads, num_blocks, block_size, head_size]`` as
allocated, but each key block is stored transposed (``[head_size, block_size]``)
so that q.K over a block is block-wide vector FMAs; value blocks are row-major.
The cache is private to this backend: only its ``forward`` writes or reads it.

fp8 KV cache (``kv_cache_dtype`` fp8 / fp8_e4m3 / fp8_e5m2): the cache tensor
is torch's fp8 dtype, one byte per element in the same layout; ``write_kv``
quantises with the layer's K and V scale and the attention loop decodes the
bytes in registers (see the kernel's header). The scales are read from the
``kv_scales`` tensor by the kernel at each call.
"""

from __future__ import annotations

import ctypes
import functools
import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from backplane.platforms.cpu.huge_pages import HeadMajorCpuCache
from backplane.platforms.cpu.linear import cpu_flags, function_address, gemm_isa
from backplane.platforms.cpu.native import KernelBuildError, load_gemm_kernel
from backplane.plugins_sdk import AttentionSpec, CommonAttentionMetadata
from backplane.plugins_sdk.attention import FP8_KV_CACHE_DTYPES, kv_cache_torch_dtype

_SCALAR_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
# The kernel's CACHE_KIND: 0 the cache holds the scalar type, else the fp8 format.
_CACHE_KINDS = {torch.float8_e4m3fn: 1, torch.float8_e5m2: 2}
# kv_scales of an unquantized cache: the kernel's scale arguments are then 1.
UNIT_KV_SCALES = torch.ones(2, dtype=torch.float32)
_P, _I64, _I32, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_float


@functools.lru_cache(maxsize=None)
def _kernel(dtype: torch.dtype, head_size: int, block_size: int, group: int,
            cache_kind: int = 0, isa: str | None = None, portable: bool = False) -> ctypes.CDLL:
    """The kernel for this geometry; ``isa == "amx"``: its build with q.K on AMX tiles
    (bf16 cache, head size 64 or 128, up to 16 query heads per KV head); ``portable``:
    the plain C loop even where the CPU has the AVX2 one (tests compare the two)."""
    lib = load_gemm_kernel("paged_attention.c", isa, (
        ("SCALAR_KIND", _SCALAR_KINDS[dtype]), ("HEAD_SIZE", head_size),
        ("BLOCK_SIZE", block_size), ("GROUP", group), ("CACHE_KIND", cache_kind),
        *((("BACKPLANE_PORTABLE_ATTENTION", 1),) if portable else ())))
    lib.paged_attention.argtypes = [_P, _I64, _P, _P, _I64, _P, _I64, _P, _P, _I64, _I64,
                                    _I32, _F32, _F32, _P, _P, _I64]
    lib.paged_attention.restype = None
    lib.decode_attention.argtypes = [_P, _I64, _P, _I64, _P, _I64, _P, _P, _P, _I64, _P, _I64,
                                     _P, _I64, _I64, _I32, _F32, _F32, _P, _P, _I64]
    lib.decode_attention.restype = None
    lib.write_kv.argtypes = [_P, _I64, _P, _I64, _P, _I64, _I64, _I64, _P, _P, _P]
    lib.write_kv.restype = None
    lib.pair_layout.argtypes = []
    lib.pair_layout.restype = ctypes.c_int
    lib.avx2_loop.argtypes = []
    lib.avx2_loop.restype = ctypes.c_int
    return lib


def _cache_dtype(spec: AttentionSpec) -> torch.dtype:
    return kv_cache_torch_dtype(spec.kv_cache_dtype, spec.dtype)


def _kernel_for(spec: AttentionSpec) -> ctypes.CDLL:
    # The tiles where the GEMMs use them (BACKPLANE_CPU_AMX=0 turns both off).
    return _kernel(spec.dtype, spec.head_size, spec.block_size,
                   spec.num_heads // spec.num_kv_heads, _CACHE_KINDS.get(_cache_dtype(spec), 0),
                   gemm_isa())


@dataclass(frozen=True)
class CpuPagedAttentionMetadata:
    """Per-step inputs of the kernel, shared by every layer (frozen: the kernel
    arguments derived from the tensors are computed once, here, not per layer)."""

    num_actual_tokens: int
    slot_mapping: torch.Tensor  # [tokens] int64
    block_table: torch.Tensor  # [requests, max_blocks] int32, contiguous
    token_reqs: torch.Tensor  # [tokens] int32: the request of each token
    token_seq_lens: torch.Tensor  # [tokens] int32: keys each token sees (0: skipped)
    # Token ranges [start, end) of whole prompts (no cached prefix, not chunked) long
    # enough for torch's attention (`_whole_prompt_ranges`); the kernel skips them.
    whole_prompts: tuple[tuple[int, int], ...] = ()
    # One query token per request, request i's token at row i: the kernel stores each
    # token's key and value as it attends (decode_attention), no separate write pass.
    decode_only: bool = False
    # (block_table, its row stride, token_reqs, token_seq_lens) as the kernel takes them
    attention_args: tuple[int, int, int, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "attention_args", (
            self.block_table.data_ptr(), self.block_table.stride(0),
            self.token_reqs.data_ptr(), self.token_seq_lens.data_ptr()))


def _rows(t: torch.Tensor, n: int, heads: int, head_size: int) -> tuple[torch.Tensor, int]:
    """The first ``n`` tokens of ``t`` ([tokens, heads, head_size] or [tokens, heads *
    head_size]) as rows the kernel addresses by a token stride: (tensor, stride).
    A view whose heads are contiguous inside each token is used as it is."""
    if t.dim() == 3 and t.stride(2) == 1 and t.stride(1) == head_size:
        return t, t.stride(0)
    if t.dim() == 2 and t.stride(1) == 1:
        return t, t.stride(0)
    rows = t[:n].reshape(n, heads * head_size).contiguous()
    return rows, rows.stride(0)


# Prompts of at least this many tokens, attended in one piece (no cached prefix), go
# through torch's scaled_dot_product_attention instead of the kernel (bf16 caches
# without window or soft cap) where `sdpa_prefill_enabled` says so. The kernel runs
# one query token per work item in vector code; torch's flash attention multiplies
# blocks of queries and keys (with oneDNN, on AMX tiles where the CPU has them). Engine
# prefill of the qwen2-0.5b shape on a 2-core AMX Xeon, kernel -> torch: 256 tokens
# 188-196 -> 193-200 ms (no gain), 512: 415-424 -> 353-406, 1024: 981-1039 -> 757-778,
# 2048: 2596-2828 -> 1930-1987.
SDPA_PREFILL_MIN_TOKENS = 384


def sdpa_prefill_enabled() -> bool:
    """Whether long whole bf16 prompts take torch's flash attention: BACKPLANE_CPU_SDPA_
    PREFILL=1 / 0 forces it on / off; by default on, except on CPUs with AVX512-BF16 but
    no AMX tiles. There torch's bf16 flash attention spends most of its time in MKL's
    float32 sgemm, and the kernel prefilled faster at every length tried (2-core Zen 4,
    qwen2-0.5b shape, alternated runs, tok/s kernel vs torch: 8 x 512 tokens 464-473 vs
    407-426, 2 x 1024 410-435 vs 377, 1 x 2048 402 vs 343). AVX2-only CPUs keep torch's
    (not measured against the kernel there)."""
    forced = os.environ.get("BACKPLANE_CPU_SDPA_PREFILL")
    if forced is not None:
        return forced != "0"
    flags = cpu_flags()
    return "avx512_bf16" not in flags or "amx_bf16" in flags


def _whole_prompt_ranges(qsl: np.ndarray, seq_lens: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each request whose query is its whole sequence and at least
    SDPA_PREFILL_MIN_TOKENS long."""
    q_lens = np.diff(qsl)
    whole = np.nonzero((q_lens == seq_lens) & (q_lens >= SDPA_PREFILL_MIN_TOKENS))[0]
    return [(int(qsl[r]), int(qsl[r + 1])) for r in whole]


class CpuPagedAttentionBackend(HeadMajorCpuCache):
    """Compiled paged attention: no gathers, prefill and decode in one call."""

    name = "cpu_paged"
    supports_sliding_window = True
    supports_logits_soft_cap = True
    supported_kv_cache_dtypes = ("auto", *FP8_KV_CACHE_DTYPES)

    @classmethod
    def unsupported_reasons(cls, spec: AttentionSpec) -> list[str]:
        reasons = super().unsupported_reasons(spec)
        if not reasons:
            try:
                _kernel_for(spec)
            except KernelBuildError as exc:
                reasons.append(f"kernel not built: {exc}")
        return reasons

    def __init__(self, spec: AttentionSpec) -> None:
        super().__init__(spec)
        self._lib = _kernel_for(spec)
        self._cache_dtype = _cache_dtype(spec)
        self._fp8 = self._cache_dtype in _CACHE_KINDS
        self._window, self._soft_cap = spec.sliding_window or 0, float(spec.logits_soft_cap or 0.0)
        self._sdpa_prefill = (spec.dtype == torch.bfloat16 and not self._fp8
                              and not self._window and not self._soft_cap
                              and sdpa_prefill_enabled())

    @property
    def cache_dtype(self) -> torch.dtype:
        """The dtype of the KV cache tensors `forward` takes (fp8 or the model's)."""
        return self._cache_dtype

    @property
    def quantized_cache(self) -> bool:
        """An fp8 cache: `forward` needs each layer's ``kv_scales``."""
        return self._fp8

    def decode_kernel(self) -> tuple[int, int, float]:
        """For C callers of this backend's decode step (decoder_layer.py): the address of
        the kernel's ``decode_attention`` (paged_attention.c), the sliding window (0:
        none) and the logits soft cap (0: none)."""
        return function_address(self._lib.decode_attention), self._window, self._soft_cap

    def build_metadata(self, common: CommonAttentionMetadata) -> CpuPagedAttentionMetadata:
        n, num_reqs = common.num_actual_tokens, common.num_reqs
        # numpy: torch.repeat_interleave took ~1.7 ms a step here for 64 requests.
        qsl = common.query_start_loc_cpu[: num_reqs + 1].numpy().astype(np.int64)
        seq_lens = common.seq_lens_cpu[:num_reqs].numpy().astype(np.int64)
        token_reqs = np.repeat(np.arange(num_reqs, dtype=np.int64), np.diff(qsl))
        # Token t of a request whose query ends at e sees seq_len - (e - 1 - t) keys.
        token_seq_lens = seq_lens[token_reqs] - qsl[1:][token_reqs] + np.arange(n) + 1
        whole = _whole_prompt_ranges(qsl, seq_lens) if self._sdpa_prefill else []
        for start, end in whole:
            token_seq_lens[start:end] = 0  # the kernel writes zeros there; forward fills them
        return CpuPagedAttentionMetadata(
            num_actual_tokens=n,
            slot_mapping=common.slot_mapping[:n].to("cpu", torch.int64).contiguous(),
            block_table=common.block_table[:num_reqs].to("cpu", torch.int32).contiguous(),
            token_reqs=torch.from_numpy(token_reqs.astype(np.int32)),
            token_seq_lens=torch.from_numpy(token_seq_lens.astype(np.int32)),
            whole_prompts=tuple(whole),
            decode_only=n == num_reqs,
        )

    def forward(self, query, key, value, kv_cache, metadata: CpuPagedAttentionMetadata, scale,
                *, kv_scales: torch.Tensor | None = None):
        spec = self.spec
        n = metadata.num_actual_tokens
        if kv_cache.dtype != self._cache_dtype or not kv_cache.is_contiguous():
            raise ValueError(f"cpu_paged needs a contiguous {self._cache_dtype} KV cache, got "
                             f"{kv_cache.dtype} (contiguous={kv_cache.is_contiguous()})")
        if self._fp8 and (kv_scales is None or kv_scales.dtype != torch.float32
                          or kv_scales.numel() != 2 or not kv_scales.is_contiguous()):
            got = None if kv_scales is None else (kv_scales.dtype, tuple(kv_scales.shape))
            raise ValueError(f"cpu_paged with kv_cache_dtype {spec.kv_cache_dtype!r} needs "
                             f"kv_scales, a contiguous float32 [k_scale, v_scale]; got {got}")
        scales = kv_scales if self._fp8 else UNIT_KV_SCALES
        q, q_stride = _rows(query, n, spec.num_heads, spec.head_size)
        k, k_stride = _rows(key, n, spec.num_kv_heads, spec.head_size)
        v, v_stride = _rows(value, n, spec.num_kv_heads, spec.head_size)
        # The key and value halves of the cache by address: no views per layer.
        key_cache = kv_cache.data_ptr()
        value_cache = key_cache + kv_cache.stride(0) * kv_cache.element_size()
        num_blocks = kv_cache.shape[2]
        out = torch.empty(query.shape[0], spec.num_heads, spec.head_size, dtype=query.dtype)
        table, table_stride, token_reqs, token_seq_lens = metadata.attention_args
        if metadata.decode_only:
            self._lib.decode_attention(
                q.data_ptr(), q_stride, k.data_ptr(), k_stride, v.data_ptr(), v_stride,
                metadata.slot_mapping.data_ptr(), key_cache, value_cache, num_blocks, table,
                table_stride, token_seq_lens, n, spec.num_kv_heads, self._window,
                float(scale), self._soft_cap, scales.data_ptr(), out.data_ptr(),
                spec.num_heads * spec.head_size)
            return out
        self._lib.write_kv(
            k.data_ptr(), k_stride, v.data_ptr(), v_stride, metadata.slot_mapping.data_ptr(),
            n, spec.num_kv_heads, num_blocks, scales.data_ptr(), key_cache, value_cache)
        self._lib.paged_attention(
            q.data_ptr(), q_stride, key_cache, value_cache, num_blocks, table, table_stride,
            token_reqs, token_seq_lens, n, spec.num_kv_heads, self._window, float(scale),
            self._soft_cap, scales.data_ptr(), out.data_ptr(), spec.num_heads * spec.head_size)
        for start, end in metadata.whole_prompts:
            out[start:end] = self._whole_prompt(query[start:end], key[start:end],
                                                value[start:end], scale)
        return out

    def _whole_prompt(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      scale: float) -> torch.Tensor:
        """Causal attention of one prompt over its own keys: [tokens, heads, head_size]."""
        spec, n = self.spec, q.shape[0]
        group = spec.num_heads // spec.num_kv_heads
        q = q.reshape(n, spec.num_heads, spec.head_size)
        k = k.reshape(n, spec.num_kv_heads, spec.head_size).transpose(0, 1)
        v = v.reshape(n, spec.num_kv_heads, spec.head_size).transpose(0, 1)
        if group > 1:  # torch's flash kernel wants as many key as query heads
            k, v = k.repeat_interleave(group, dim=0), v.repeat_interleave(group, dim=0)
        o = F.scaled_dot_product_attention(q.transpose(0, 1).unsqueeze(0), k.unsqueeze(0),
                                           v.unsqueeze(0), is_causal=True, scale=scale)
        return o[0].transpose(0, 1)
