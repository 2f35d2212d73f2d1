"""Random paged-attention inputs and a plain-torch reference for the GPU platform tests.

A case is a flat varlen step: each request has ``context`` tokens already in the
paged cache and ``query`` new tokens whose K/V the backend must write at
``slot_mapping`` before attending. Blocks are handed out in a shuffled order so
that a kernel reading the block table wrongly cannot pass by accident, and
padding tokens (slot -1) carry junk K/V that must never reach the cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from backplane.plugins_sdk import AttentionSpec, CommonAttentionMetadata


@dataclass(frozen=True)
class CaseSpec:
    """Shape of one test step."""

    name: str
    context_lens: tuple[int, ...]
    query_lens: tuple[int, ...]
    num_heads: int = 4
    num_kv_heads: int = 4
    head_size: int = 16
    block_size: int = 16
    num_pad_tokens: int = 0
    dtype: torch.dtype = torch.float32
    sliding_window: int | None = None


# Tiny on purpose: the Triton interpreter runs every program instance in numpy.
CASES = [
    CaseSpec("prefill_no_context", (0, 0), (7, 19)),
    CaseSpec("prefill_with_prefix", (16, 21), (5, 12)),
    CaseSpec("decode", (9, 33, 16), (1, 1, 1)),
    CaseSpec("mixed", (40, 0, 3), (1, 18, 1)),
    CaseSpec("gqa", (17, 5), (1, 9), num_heads=4, num_kv_heads=2),
    CaseSpec("gqa_group3", (20, 0, 7), (3, 17, 1), num_heads=6, num_kv_heads=2),
    CaseSpec("mqa_block32", (35, 0), (1, 20), num_heads=4, num_kv_heads=1, block_size=32),
    CaseSpec("block32_mixed", (31, 64), (2, 1), block_size=32),
    CaseSpec("padded_slots", (12, 4), (1, 6), num_pad_tokens=3),
    CaseSpec("head_size_24", (10,), (5,), head_size=24, num_heads=2, num_kv_heads=2),
    CaseSpec("sliding_window", (40, 30, 0), (1, 9, 26), num_heads=4, num_kv_heads=2,
             sliding_window=11),
]


@dataclass
class PagedCase:
    """Concrete tensors of a case plus what a correct backend must produce."""

    spec: CaseSpec
    query: torch.Tensor  # [tokens, heads, head]
    key: torch.Tensor  # [tokens, kv_heads, head]
    value: torch.Tensor
    kv_cache: torch.Tensor  # [2, blocks, block_size, kv_heads, head] with context filled
    common: CommonAttentionMetadata
    scale: float
    expected_out: torch.Tensor  # [actual tokens, heads, head] (float64 reference)
    expected_cache: torch.Tensor  # kv_cache after the write

    @property
    def attention_spec(self) -> AttentionSpec:
        s = self.spec
        return AttentionSpec(
            num_heads=s.num_heads,
            num_kv_heads=s.num_kv_heads,
            head_size=s.head_size,
            dtype=s.dtype,
            block_size=s.block_size,
            sliding_window=s.sliding_window,
        )

    def to(self, device: str | torch.device) -> PagedCase:
        """The same case with every device tensor on ``device`` (``_cpu`` copies stay)."""
        c = self.common
        common = CommonAttentionMetadata(
            num_reqs=c.num_reqs,
            num_actual_tokens=c.num_actual_tokens,
            max_query_len=c.max_query_len,
            max_seq_len=c.max_seq_len,
            query_start_loc=c.query_start_loc.to(device),
            seq_lens=c.seq_lens.to(device),
            block_table=c.block_table.to(device),
            slot_mapping=c.slot_mapping.to(device),
            query_start_loc_cpu=c.query_start_loc_cpu,
            seq_lens_cpu=c.seq_lens_cpu,
        )
        return PagedCase(
            spec=self.spec,
            query=self.query.to(device),
            key=self.key.to(device),
            value=self.value.to(device),
            kv_cache=self.kv_cache.to(device),
            common=common,
            scale=self.scale,
            expected_out=self.expected_out,
            expected_cache=self.expected_cache,
        )


def reference_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, context_len: int,
    scale: float, window: int | None = None,
) -> torch.Tensor:
    """Causal attention of one request in float64: query i sees keys 0..context_len + i.

    With ``window``, only the last ``window`` of those keys (transformers' convention).
    """
    q_len, num_heads, _ = query.shape
    group = num_heads // keys.shape[1]
    k = keys.double().repeat_interleave(group, dim=1)  # [L, H, D]
    v = values.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", query.double(), k) * scale
    key_pos = torch.arange(keys.shape[0])
    query_pos = torch.arange(context_len, context_len + q_len)
    hidden = key_pos[None, :] > query_pos[:, None]
    if window is not None:
        hidden |= key_pos[None, :] <= query_pos[:, None] - window
    scores = scores.masked_fill(hidden[None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def make_case(spec: CaseSpec, seed: int = 0) -> PagedCase:
    """Build ``spec`` on the CPU with a fixed seed."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(spec.dtype)

    bs, kvh, hd = spec.block_size, spec.num_kv_heads, spec.head_size
    seq_lens = [c + q for c, q in zip(spec.context_lens, spec.query_lens, strict=True)]
    blocks_per_req = [math.ceil(s / bs) for s in seq_lens]
    num_blocks = sum(blocks_per_req) + 3  # spare blocks stay untouched
    order = torch.randperm(num_blocks, generator=gen).tolist()
    max_blocks = max(blocks_per_req)
    block_table = torch.zeros(len(seq_lens), max_blocks + 1, dtype=torch.int32)
    kv_cache = rand(2, num_blocks, bs, kvh, hd)  # junk everywhere, context overwritten below
    expected_cache = kv_cache.clone()

    queries, keys, values, slots, outs = [], [], [], [], []
    for r, (ctx, q_len) in enumerate(zip(spec.context_lens, spec.query_lens, strict=True)):
        req_blocks = [order.pop() for _ in range(blocks_per_req[r])]
        block_table[r, : len(req_blocks)] = torch.tensor(req_blocks, dtype=torch.int32)
        seq = ctx + q_len
        all_k, all_v = rand(seq, kvh, hd), rand(seq, kvh, hd)
        positions = torch.arange(seq)
        req_slots = torch.tensor(req_blocks)[positions // bs] * bs + positions % bs
        flat_k = kv_cache[0].view(-1, kvh, hd)
        flat_v = kv_cache[1].view(-1, kvh, hd)
        flat_k[req_slots[:ctx]] = all_k[:ctx]
        flat_v[req_slots[:ctx]] = all_v[:ctx]
        expected_cache[0].view(-1, kvh, hd)[req_slots] = all_k
        expected_cache[1].view(-1, kvh, hd)[req_slots] = all_v
        q = rand(q_len, spec.num_heads, hd)
        queries.append(q)
        keys.append(all_k[ctx:])
        values.append(all_v[ctx:])
        slots.append(req_slots[ctx:])
        outs.append(reference_attention(q, all_k, all_v, ctx, hd**-0.5, spec.sliding_window))

    pad = spec.num_pad_tokens
    query = torch.cat(queries + [rand(pad, spec.num_heads, hd)])
    key = torch.cat(keys + [rand(pad, kvh, hd)])
    value = torch.cat(values + [rand(pad, kvh, hd)])
    slot_mapping = torch.cat(slots + [torch.full((pad,), -1)]).to(torch.int64)
    query_start_loc = torch.tensor([0, *torch.tensor(spec.query_lens).cumsum(0).tolist()],
                                   dtype=torch.int32)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32)
    common = CommonAttentionMetadata(
        num_reqs=len(seq_lens),
        num_actual_tokens=sum(spec.query_lens),
        max_query_len=max(spec.query_lens),
        max_seq_len=max(seq_lens),
        query_start_loc=query_start_loc,
        seq_lens=seq_lens_t,
        block_table=block_table,
        slot_mapping=slot_mapping,
        query_start_loc_cpu=query_start_loc.clone(),
        seq_lens_cpu=seq_lens_t.clone(),
    )
    return PagedCase(
        spec=spec,
        query=query,
        key=key,
        value=value,
        kv_cache=kv_cache,
        common=common,
        scale=hd**-0.5,
        expected_out=torch.cat(outs),
        expected_cache=expected_cache,
    )


def tolerance(dtype: torch.dtype) -> float:
    """Absolute tolerance for comparing a backend to the float64 reference."""
    return {torch.float32: 2e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]


def check_backend_on_case(backend_cls, case: PagedCase) -> None:
    """Run ``backend_cls`` on ``case`` and assert output and cache match the reference."""
    backend = backend_cls(case.attention_spec)
    metadata = backend.build_metadata(case.common)
    kv_cache = case.kv_cache.clone()
    out = backend.forward(case.query, case.key, case.value, kv_cache, metadata, case.scale)
    n = case.common.num_actual_tokens
    torch.testing.assert_close(
        kv_cache.cpu(), case.expected_cache, rtol=0, atol=0, msg="KV cache after write differs"
    )
    torch.testing.assert_close(
        out[:n].cpu().double(), case.expected_out, rtol=0, atol=tolerance(case.spec.dtype),
        msg=lambda m: f"{case.spec.name}: attention output differs from reference\n{m}",
    )
