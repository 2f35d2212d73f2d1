"""Random paged-attention inputs and a dense reference, for the conformance suite.

`PagedAttentionHarness` plays the core's role for one attention layer: it owns
a KV cache shaped by the backend, hands out non-contiguous random blocks,
builds `CommonAttentionMetadata` for a step (optionally with padding tokens
whose ``slot_mapping`` is -1), runs the backend (with the harness's softmax
``scale``, and the spec's sliding window and soft cap), and computes what the output must
be with `reference_attention`, which works on plain per-request K/V
tensors and so does not depend on the backend's cache layout.

With an fp8 ``spec.kv_cache_dtype`` the harness passes ``kv_scales`` (the
layer's ``[k_scale, v_scale]``) to ``forward``, and the reference attends over
the keys and values as the SDK's contract says the cache holds them:
``quantize_kv_fp8(x, scale)`` dequantized (``stored * scale``). Only the
backend's arithmetic then differs from the reference, so the tolerance is the
compute dtype's, not fp8's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from backplane.plugins_sdk.attention import (
    FP8_KV_CACHE_DTYPES,
    AttentionBackend,
    AttentionSpec,
    CommonAttentionMetadata,
    kv_cache_torch_dtype,
    quantize_kv_fp8,
)

# Default [k_scale, v_scale] of an fp8 case: far from 1 (a backend that ignores a
# scale fails), and small enough for k_scale that the largest random keys
# (|k| > 0.006 * 448 = 2.7) saturate in e4m3, so saturation is checked too.
DEFAULT_FP8_KV_SCALES = (0.006, 0.02)


def reference_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float,
    sliding_window: int | None = None,
    logits_soft_cap: float | None = None,
) -> torch.Tensor:
    """Causal attention of one request's new queries over all its keys, in float64.

    Args:
        query: [q_len, num_heads, head_size], the last q_len positions of the request.
        keys, values: [seq_len, num_kv_heads, head_size], every position so far.
        scale: softmax scale: softmax(scale * q.k) weights the values.
        sliding_window: when set, the query at position p sees only the keys at
            positions p - sliding_window + 1 .. p (`AttentionSpec.sliding_window`).
        logits_soft_cap: when set, scaled scores s become cap * tanh(s / cap)
            before the mask and softmax (`AttentionSpec.logits_soft_cap`).
    Returns:
        [q_len, num_heads, head_size] float64.
    """
    q_len, num_heads, _ = query.shape
    seq_len, num_kv_heads, _ = keys.shape
    group = num_heads // num_kv_heads
    q = query.double().cpu()
    k = keys.double().cpu().repeat_interleave(group, dim=1)  # [L, H, D]
    v = values.double().cpu().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    if logits_soft_cap is not None:
        scores = torch.tanh(scores / logits_soft_cap) * logits_soft_cap
    query_pos = torch.arange(seq_len - q_len, seq_len)
    key_pos = torch.arange(seq_len)[None, :]
    allowed = key_pos <= query_pos[:, None]  # [q, L]
    if sliding_window is not None:
        allowed &= key_pos > query_pos[:, None] - sliding_window
    scores = scores.masked_fill(~allowed[None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), v)


@dataclass
class _Request:
    blocks: list[int]
    keys: list[torch.Tensor] = field(default_factory=list)  # per step [n, kv_heads, D] on CPU
    values: list[torch.Tensor] = field(default_factory=list)

    @property
    def length(self) -> int:
        return sum(k.shape[0] for k in self.keys)


@dataclass
class StepResult:
    """Backend output and reference for the real tokens of one step."""

    output: torch.Tensor  # [num_actual_tokens, H, D] on CPU, float64
    expected: torch.Tensor  # same shape


class PagedAttentionHarness:
    """Drives one backend through steps on random paged inputs (see module docstring)."""

    def __init__(
        self,
        backend_cls: type[AttentionBackend],
        spec: AttentionSpec,
        device: torch.device,
        max_seq_lens: list[int],
        seed: int = 0,
        spare_blocks: int = 3,
        scale: float | None = None,
        kv_scales: tuple[float, float] = DEFAULT_FP8_KV_SCALES,
    ) -> None:
        self.spec = spec
        self.device = device
        self.backend = backend_cls(spec)
        self.generator = torch.Generator().manual_seed(seed)
        bs = spec.block_size
        needed = [math.ceil(n / bs) for n in max_seq_lens]
        self.num_blocks = sum(needed) + spare_blocks
        # Random, non-contiguous block ids. The highest id becomes the first block of the
        # longest request, whose last slot is then in use: a backend that writes padding
        # tokens (slot -1, i.e. the cache's last slot) corrupts a real key and is caught.
        order = torch.randperm(self.num_blocks, generator=self.generator).tolist()
        order.remove(self.num_blocks - 1)
        longest = max(range(len(needed)), key=lambda i: max_seq_lens[i])
        self.requests, start = [], 0
        for i, n in enumerate(needed):
            if i == longest:
                blocks, start = [self.num_blocks - 1, *order[start : start + n - 1]], start + n - 1
            else:
                blocks, start = order[start : start + n], start + n
            self.requests.append(_Request(blocks))
        shape = backend_cls.kv_cache_shape(self.num_blocks, bs, spec.num_kv_heads, spec.head_size)
        # Through the backend's own allocator, which must give zeros of that shape.
        cache_dtype = kv_cache_torch_dtype(spec.kv_cache_dtype, spec.dtype)
        self.kv_cache = backend_cls.allocate_kv_cache(shape, cache_dtype, torch.device(device))
        if tuple(self.kv_cache.shape) != tuple(shape) or self.kv_cache.dtype != cache_dtype:
            raise AssertionError(
                f"{backend_cls.name}.allocate_kv_cache returned {tuple(self.kv_cache.shape)} "
                f"{self.kv_cache.dtype}, expected {tuple(shape)} {cache_dtype}")
        # fp8: the layer's scales as the core hands them over (float32 on the device).
        self.fp8_dtype = FP8_KV_CACHE_DTYPES.get(spec.kv_cache_dtype)
        self.kv_scales = None
        if self.fp8_dtype is not None:
            self.kv_scales = torch.tensor(kv_scales, dtype=torch.float32, device=device)
        # (torch has no count_nonzero for fp8 dtypes: count the bytes.)
        raw = self.kv_cache.view(torch.uint8) if self.kv_cache.element_size() == 1 else None
        if (self.kv_cache if raw is None else raw).count_nonzero():
            raise AssertionError(f"{backend_cls.name}.allocate_kv_cache did not zero the cache")
        if self.kv_cache.is_floating_point():
            # Garbage in unused slots: a backend that reads past a request's length fails.
            self.kv_cache.copy_(torch.randn(shape, generator=self.generator) * 8)
        # The models' usual softmax scale unless the case asks for another.
        self.scale = 1.0 / math.sqrt(spec.head_size) if scale is None else scale

    def _randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.generator)

    def step(self, query_lens: dict[int, int], num_padding: int = 0) -> StepResult:
        """Advance the requests in ``query_lens`` ({request index: new tokens}) by one step."""
        spec, bs = self.spec, self.spec.block_size
        rows = sorted(query_lens)
        n = sum(query_lens[r] for r in rows)
        total = n + num_padding
        query = self._randn(total, spec.num_heads, spec.head_size)
        key = self._randn(total, spec.num_kv_heads, spec.head_size)
        value = self._randn(total, spec.num_kv_heads, spec.head_size)
        qsl, seq_lens, slots, expected = [0], [], [], []
        max_blocks = max(len(self.requests[r].blocks) for r in rows)
        block_table = torch.zeros(len(rows), max_blocks, dtype=torch.int32)
        for i, r in enumerate(rows):
            req, q_len, start = self.requests[r], query_lens[r], qsl[-1]
            context = req.length
            seq_len = context + q_len
            if seq_len > len(req.blocks) * bs:
                raise ValueError(f"request {r} grows to {seq_len} tokens, past its blocks")
            block_table[i, : len(req.blocks)] = torch.tensor(req.blocks, dtype=torch.int32)
            for pos in range(context, seq_len):
                slots.append(req.blocks[pos // bs] * bs + pos % bs)
            req.keys.append(self._as_cached(key[start : start + q_len], 0))
            req.values.append(self._as_cached(value[start : start + q_len], 1))
            expected.append(reference_attention(
                query[start : start + q_len].to(spec.dtype), torch.cat(req.keys),
                torch.cat(req.values), self.scale, spec.sliding_window,
                getattr(spec, "logits_soft_cap", None)))
            qsl.append(start + q_len)
            seq_lens.append(seq_len)
        slots += [-1] * num_padding
        dev = self.device
        qsl_t = torch.tensor(qsl, dtype=torch.int32)
        seq_t = torch.tensor(seq_lens, dtype=torch.int32)
        common = CommonAttentionMetadata(
            num_reqs=len(rows),
            num_actual_tokens=n,
            max_query_len=max(query_lens[r] for r in rows),
            max_seq_len=max(seq_lens),
            query_start_loc=qsl_t.to(dev),
            seq_lens=seq_t.to(dev),
            block_table=block_table.to(dev),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            query_start_loc_cpu=qsl_t,
            seq_lens_cpu=seq_t,
        )
        metadata = self.backend.build_metadata(common)
        args = (query.to(dev, spec.dtype), key.to(dev, spec.dtype), value.to(dev, spec.dtype),
                self.kv_cache, metadata, self.scale)
        if self.kv_scales is None:
            out = self.backend.forward(*args)
        else:
            out = self.backend.forward(*args, kv_scales=self.kv_scales)
        if tuple(out.shape[1:]) != (spec.num_heads, spec.head_size) or out.shape[0] < n:
            raise AssertionError(
                f"{self.backend.name}.forward returned shape {tuple(out.shape)}, expected "
                f"[>= {n}, {spec.num_heads}, {spec.head_size}]")
        return StepResult(out[:n].double().cpu(), torch.cat(expected))


    def _as_cached(self, x: torch.Tensor, which: int) -> torch.Tensor:
        """``x`` as the cache holds it: in the spec's dtype, or fp8 per the contract and
        dequantized (``which`` 0 keys, 1 values) for the reference."""
        x = x.to(self.spec.dtype)
        if self.fp8_dtype is None:
            return x
        scale = float(self.kv_scales[which])
        return quantize_kv_fp8(x, scale, self.fp8_dtype).double() * scale


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    """atol/rtol for comparing a backend in ``dtype`` with the float64 reference."""
    if dtype == torch.float32:
        return {"atol": 2e-4, "rtol": 2e-4}
    if dtype == torch.float16:
        return {"atol": 1e-2, "rtol": 1e-2}
    return {"atol": 4e-2, "rtol": 4e-2}  # bfloat16 and anything coarser
