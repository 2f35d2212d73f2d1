"""The compiled CPU attention kernel (cpu_paged) against the torch backend (cpu_sdpa).

Both backends are driven through the SDK surface the model runner uses: a first
step writes each request's context, a second mixes decode tokens and prefill
chunks over that context. The torch backend is the reference; the kernel must
agree to float32 rounding (float32) or to one rounding of the output (bf16/fp16).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from backplane.platforms.cpu import native
from backplane.platforms.cpu.attention import CpuSdpaAttentionBackend
from backplane.platforms.cpu.linear import gemm_isa
from backplane.platforms.cpu.paged_attention import CpuPagedAttentionBackend, _kernel
from backplane.plugins_sdk import AttentionSpec, CommonAttentionMetadata

needs_compiler = pytest.mark.skipif(native.compiler() is None, reason="no C compiler")

TOLERANCE = {torch.float32: 2e-6, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def _step(backend, cache, lens, table, block_size, q, k, v):
    """Run one step where request r has context ctx_r and query_r new tokens."""
    ctx, qlens = zip(*lens, strict=True)
    seqs = torch.tensor([c + n for c, n in lens], dtype=torch.int32)
    qsl = torch.tensor([0, *torch.tensor(qlens).cumsum(0).tolist()], dtype=torch.int32)
    slots = torch.tensor([int(table[r, p // block_size]) * block_size + p % block_size
                          for r, (c, n) in enumerate(lens) for p in range(c, c + n)])
    common = CommonAttentionMetadata(
        num_reqs=len(lens), num_actual_tokens=len(slots), max_query_len=max(qlens),
        max_seq_len=int(seqs.max()), query_start_loc=qsl, seq_lens=seqs, block_table=table,
        slot_mapping=slots, query_start_loc_cpu=qsl, seq_lens_cpu=seqs)
    return backend.forward(q, k, v, cache, backend.build_metadata(common), 0.125)


def _attend(backend_cls, spec, contexts, queries, num_blocks=200, seed=0):
    gen = torch.Generator().manual_seed(seed)
    bs, heads, kv_heads, d = spec.block_size, spec.num_heads, spec.num_kv_heads, spec.head_size
    per_req = max(-(-(c + n) // bs) for c, n in zip(contexts, queries, strict=True))
    table = (torch.randperm(num_blocks - 1, generator=gen)[: len(contexts) * per_req] + 1)
    table = table.view(len(contexts), per_req).to(torch.int32)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(spec.dtype)

    backend = backend_cls(spec)
    cache = torch.zeros(backend_cls.kv_cache_shape(num_blocks, bs, kv_heads, d), dtype=spec.dtype)
    first = [(0, c) for c in contexts]
    t = sum(contexts)
    _step(backend, cache, first, table, bs, rand(t, heads, d), rand(t, kv_heads, d),
          rand(t, kv_heads, d))
    t = sum(queries)
    return _step(backend, cache, list(zip(contexts, queries, strict=True)), table, bs,
                 rand(t, heads, d), rand(t, kv_heads, d), rand(t, kv_heads, d)).float()


def _on_isa(isa):
    """The paged backend with the kernel built for ``isa`` ("amx": q.K on tiles;
    "portable": the plain C loop even on an x86 CPU)."""

    class OnIsa(CpuPagedAttentionBackend):
        def __init__(self, spec):
            super().__init__(spec)
            self._lib = _kernel(spec.dtype, spec.head_size, spec.block_size,
                                spec.num_heads // spec.num_kv_heads, 0,
                                None if isa == "portable" else isa, isa == "portable")

    return OnIsa


KERNEL_ISAS = [*(["amx", "avx512_bf16"] if gemm_isa() == "amx" else [gemm_isa()]), "portable"]


@needs_compiler
@pytest.mark.parametrize("loop", ["default", "portable"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("heads", "kv_heads", "head_size", "block_size"),
                         [(14, 2, 64, 16), (4, 4, 32, 4), (8, 1, 128, 8)])
@pytest.mark.parametrize("window", [None, 7])
def test_kernel_matches_torch_backend(dtype, heads, kv_heads, head_size, block_size, window,
                                      loop):
    spec = AttentionSpec(heads, kv_heads, head_size, dtype, block_size, sliding_window=window)
    # decode tokens at several lengths, a prefill chunk over a context, a fresh prompt
    contexts, queries = [30, 1, 7, 100, 3, 16], [1, 1, 5, 1, 17, 1]
    expected = _attend(CpuSdpaAttentionBackend, spec, contexts, queries)
    backend = CpuPagedAttentionBackend if loop == "default" else _on_isa("portable")
    got = _attend(backend, spec, contexts, queries)
    scale = expected.abs().max().item()
    assert (got - expected).abs().max().item() <= TOLERANCE[dtype] * max(1.0, scale)


@needs_compiler
@pytest.mark.skipif(gemm_isa() is None, reason="needs an x86 CPU with AVX2 + FMA + F16C")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cache_kind", [0, 1, 2], ids=["plain", "fp8_e4m3", "fp8_e5m2"])
def test_x86_cpus_run_the_vector_loop_and_the_portable_build_does_not(dtype, cache_kind):
    """Every geometry the AVX2 loop covers runs it, except where the pair layout (bf16 on
    AVX512-BF16 CPUs) takes over; the tests' "portable" builds really are the plain C."""
    lib = _kernel(dtype, 64, 16, 7, cache_kind)
    assert lib.avx2_loop() == (0 if lib.pair_layout() else 1)
    assert _kernel(dtype, 64, 16, 7, cache_kind, None, True).avx2_loop() == 0
    assert _kernel(dtype, 32, 4, 1, cache_kind).avx2_loop() == 0  # blocks of 4 tokens


@needs_compiler
@pytest.mark.parametrize("isa", KERNEL_ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 300])
@pytest.mark.parametrize("queries", [[1, 1, 1, 1], [1, 3, 1, 2]], ids=["decode", "mixed"])
@pytest.mark.parametrize(("heads", "kv_heads", "head_size"), [(14, 2, 64), (8, 2, 128)])
def test_long_contexts_and_decode_steps_match_torch_backend(dtype, window, queries, heads,
                                                            kv_heads, head_size, isa):
    """Contexts past the kernel's 256-token softmax chunks (a window that starts inside
    one), in a decode-only step (each request's one token stores its key and value as
    it attends: decode_attention) and in a step with chunks (write_kv, then attention);
    on AMX CPUs with q.K on the tiles and without."""
    spec = AttentionSpec(heads, kv_heads, head_size, dtype, 16, sliding_window=window)
    contexts = [600, 257, 40, 511]
    expected = _attend(CpuSdpaAttentionBackend, spec, contexts, queries, num_blocks=200)
    got = _attend(_on_isa(isa), spec, contexts, queries, num_blocks=200)
    scale = expected.abs().max().item()
    assert (got - expected).abs().max().item() <= TOLERANCE[dtype] * max(1.0, scale)


def test_decode_steps_take_the_fused_write_and_others_do_not():
    spec = AttentionSpec(14, 2, 64, torch.bfloat16, 16)
    backend = CpuPagedAttentionBackend(spec)

    def metadata(qlens):
        qsl = torch.tensor([0, *np.cumsum(qlens)], dtype=torch.int32)
        seqs = torch.tensor([20 + n for n in qlens], dtype=torch.int32)
        common = CommonAttentionMetadata(
            num_reqs=len(qlens), num_actual_tokens=sum(qlens), max_query_len=max(qlens),
            max_seq_len=int(seqs.max()), query_start_loc=qsl, seq_lens=seqs,
            block_table=torch.arange(1, 1 + 2 * len(qlens), dtype=torch.int32).view(-1, 2),
            slot_mapping=torch.arange(sum(qlens)), query_start_loc_cpu=qsl, seq_lens_cpu=seqs)
        return backend.build_metadata(common)

    assert metadata([1, 1, 1]).decode_only
    assert not metadata([1, 2, 1]).decode_only


@needs_compiler
@pytest.mark.parametrize(("heads", "kv_heads", "head_size", "block_size"),
                         [(14, 2, 64, 16), (4, 4, 32, 4)])
def test_whole_long_prompts_go_through_torch_attention(heads, kv_heads, head_size,
                                                        block_size, monkeypatch):
    """bf16 prompts of SDPA_PREFILL_MIN_TOKENS+ tokens with no cached prefix are attended
    by torch's flash attention (the kernel skips them); in the same steps decode tokens,
    a continued chunk and a short prompt stay on the kernel, and every output agrees with
    the torch backend and with the kernel alone (BACKPLANE_CPU_SDPA_PREFILL=1 / 0)."""
    from backplane.platforms.cpu import paged_attention

    spec = AttentionSpec(heads, kv_heads, head_size, torch.bfloat16, block_size)
    long = paged_attention.SDPA_PREFILL_MIN_TOKENS
    steps = [[(0, long + 44), (0, 20)],                 # a long and a short prompt
             [(long + 44, 1), (20, 5), (0, long + 3)]]  # decode, a chunk, a long prompt
    gen = torch.Generator().manual_seed(7)
    per_req = -(-(2 * long) // block_size)
    table = (torch.randperm(3 * per_req, generator=gen) + 1).view(3, per_req).to(torch.int32)
    inputs = []
    for lens in steps:
        t = sum(n for _, n in lens)
        inputs.append([(torch.randn(t, h, head_size, generator=gen) * 2).to(torch.bfloat16)
                       for h in (heads, kv_heads, kv_heads)])

    def run(backend_cls):
        backend = backend_cls(spec)
        cache = torch.zeros(backend_cls.kv_cache_shape(4 * per_req, block_size, kv_heads,
                                                       head_size), dtype=torch.bfloat16)
        return [_step(backend, cache, lens, table, block_size, *qkv).float()
                for lens, qkv in zip(steps, inputs, strict=True)]

    def whole_prompts(lens):
        qsl = np.cumsum([0, *(n for _, n in lens)])
        return paged_attention._whole_prompt_ranges(qsl, np.array([c + n for c, n in lens]))

    assert [whole_prompts(lens) for lens in steps] == [[(0, long + 44)],
                                                       [(6, 6 + long + 3)]]
    expected = run(CpuSdpaAttentionBackend)
    monkeypatch.setenv("BACKPLANE_CPU_SDPA_PREFILL", "1")
    with_torch = run(CpuPagedAttentionBackend)
    monkeypatch.setenv("BACKPLANE_CPU_SDPA_PREFILL", "0")
    kernel_only = run(CpuPagedAttentionBackend)
    for want, got, alone in zip(expected, with_torch, kernel_only, strict=True):
        scale = max(1.0, want.abs().max().item())
        assert (got - want).abs().max().item() <= TOLERANCE[torch.bfloat16] * scale
        assert (alone - want).abs().max().item() <= TOLERANCE[torch.bfloat16] * scale
        assert not torch.equal(got, alone)  # the long prompts really took the other path


def test_torch_attention_for_long_prompts_is_the_default_except_on_avx512_bf16_without_amx(
        monkeypatch):
    """Where torch's bf16 flash attention has no AMX tiles but AVX512-BF16 CPUs run the
    kernel's bf16 products, the kernel keeps long prompts; the variable overrides."""
    from backplane.platforms.cpu import paged_attention

    monkeypatch.delenv("BACKPLANE_CPU_SDPA_PREFILL", raising=False)
    for flags, default in (({"avx512_bf16", "avx512f"}, False),
                           ({"avx512_bf16", "amx_tile", "amx_bf16"}, True),
                           ({"avx2", "fma", "f16c"}, True)):
        monkeypatch.setattr(paged_attention, "cpu_flags", lambda f=flags: frozenset(f))
        assert paged_attention.sdpa_prefill_enabled() is default
        for forced in ("0", "1"):
            monkeypatch.setenv("BACKPLANE_CPU_SDPA_PREFILL", forced)
            assert paged_attention.sdpa_prefill_enabled() is (forced == "1")
        monkeypatch.delenv("BACKPLANE_CPU_SDPA_PREFILL")


@needs_compiler
def test_padding_slots_are_not_written():
    spec = AttentionSpec(4, 2, 32, torch.float32, 4)
    backend = CpuPagedAttentionBackend(spec)
    cache = torch.zeros(CpuPagedAttentionBackend.kv_cache_shape(8, 4, 2, 32))
    qsl = torch.tensor([0, 1], dtype=torch.int32)
    seqs = torch.tensor([1], dtype=torch.int32)
    table = torch.tensor([[3]], dtype=torch.int32)
    common = CommonAttentionMetadata(1, 2, 1, 1, qsl, seqs, table, torch.tensor([12, -1]),
                                     qsl, seqs)
    # a padded row rides along with slot -1
    metadata = dataclasses.replace(
        backend.build_metadata(common), num_actual_tokens=2, slot_mapping=torch.tensor([12, -1]),
        token_reqs=torch.tensor([0, 0], dtype=torch.int32),
        token_seq_lens=torch.tensor([1, 1], dtype=torch.int32))
    q = torch.randn(2, 4, 32)
    kv = torch.ones(2, 2, 32)
    out = backend.forward(q, kv, kv, cache, metadata, 0.125)
    written = (cache != 0).nonzero()
    assert set(written[:, 2].tolist()) == {3}, "only block 3 (slot 12) may be written"
    # one key per head, so attention returns its value exactly
    assert torch.allclose(out[0], torch.ones(4, 32))


def test_without_a_compiler_the_platform_falls_back_to_torch(monkeypatch, tmp_path):
    from backplane.platforms.cpu.platform import CpuPlatform

    monkeypatch.setattr(native, "compiler", lambda: None)
    native.load_kernel.cache_clear()
    _kernel.cache_clear()
    try:
        spec = AttentionSpec(4, 2, 32, torch.float32, 16)
        reasons = CpuPagedAttentionBackend.unsupported_reasons(spec)
        assert any("no C compiler" in r for r in reasons), reasons
        chosen = CpuPlatform().select_attention_backend(spec)
        assert chosen is CpuSdpaAttentionBackend
    finally:
        native.load_kernel.cache_clear()
        _kernel.cache_clear()


@needs_compiler
def test_build_is_cached_under_backplane_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("BACKPLANE_CACHE_DIR", str(tmp_path))
    native.load_kernel.cache_clear()
    try:
        native.load_kernel("paged_attention.c", (("SCALAR_KIND", 0), ("HEAD_SIZE", 16),
                                                 ("BLOCK_SIZE", 4), ("GROUP", 3)))
        built = list((tmp_path / "cpu_kernels").glob("paged_attention-*.so"))
        assert len(built) == 1
        stamp = built[0].stat().st_mtime_ns
        native.load_kernel.cache_clear()
        native.load_kernel("paged_attention.c", (("SCALAR_KIND", 0), ("HEAD_SIZE", 16),
                                                 ("BLOCK_SIZE", 4), ("GROUP", 3)))
        assert built[0].stat().st_mtime_ns == stamp, "a cached build was compiled again"
    finally:
        native.load_kernel.cache_clear()


def test_a_compiler_error_is_reported_with_its_output(monkeypatch, tmp_path):
    monkeypatch.setenv("BACKPLANE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native, "compiler", lambda: "false")  # exits 1, prints nothing
    native.load_kernel.cache_clear()
    native._machine_fingerprint.cache_clear()
    try:
        with pytest.raises(native.KernelBuildError, match="exited with 1"):
            native.load_kernel("paged_attention.c", (("SCALAR_KIND", 0),))
        assert not list((tmp_path / "cpu_kernels").glob("*.so")), "a failed build left a file"
    finally:
        native.load_kernel.cache_clear()
        native._machine_fingerprint.cache_clear()


@needs_compiler
def test_an_unwritable_cache_dir_falls_back_to_the_temp_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("BACKPLANE_CACHE_DIR", str(tmp_path / "read-only"))  # nothing built there
    monkeypatch.setattr(native, "_writable", lambda directory: False)
    monkeypatch.setattr(native.tempfile, "gettempdir", lambda: str(tmp_path))
    native.load_kernel.cache_clear()
    try:
        native.load_kernel("paged_attention.c", (("SCALAR_KIND", 0), ("HEAD_SIZE", 16),
                                                 ("BLOCK_SIZE", 4), ("GROUP", 2)))
        assert list(tmp_path.glob("backplane-*/paged_attention-*.so"))
    finally:
        native.load_kernel.cache_clear()
