"""The cuda platform on a real NVIDIA GPU: runtime, attention backends, CUDA graphs, a model.

Every test here needs a CUDA device and is skipped cleanly without one; run
them with ``python -m pytest -q tests/platforms/gpu -m gpu`` on a GPU machine.
"""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch

from backplane.platforms.cuda import descriptor
from backplane.platforms.cuda.triton_attention import (
    TritonAttentionMetadata,
    TritonPagedAttentionBackend,
)
from backplane.plugins_sdk import CommonAttentionMetadata, TorchSdpaPagedAttentionBackend
from tests.platforms.gpu.paged_cases import CASES, CaseSpec, check_backend_on_case, make_case

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible"),
]
needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed"
)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(scope="module")
def platform():
    probe = descriptor.probe()
    assert probe.available, probe.reason
    return descriptor.load()


def test_runtime_reports_the_device(platform):
    rt = platform.runtime
    assert rt.device_count() >= 1
    assert rt.device_name(0)
    total, free = rt.total_memory(0), rt.available_memory(0)
    assert 0 < free <= total
    assert rt.device(0) == torch.device("cuda", 0)
    rt.seed_everything(3)
    a = torch.randn(4, device="cuda")
    rt.seed_everything(3)
    torch.testing.assert_close(a, torch.randn(4, device="cuda"))
    rt.synchronize()
    rt.empty_cache()
    major, _ = torch.cuda.get_device_capability(0)
    assert (torch.bfloat16 in rt.supported_dtypes) == (major >= 8)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("spec", CASES, ids=lambda s: s.name)
def test_triton_backend_on_gpu(spec, dtype):
    case = make_case(dataclasses.replace(spec, dtype=dtype)).to("cuda")
    check_backend_on_case(TritonPagedAttentionBackend, case)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("spec", CASES, ids=lambda s: s.name)
def test_torch_sdpa_backend_on_gpu(spec, dtype):
    case = make_case(dataclasses.replace(spec, dtype=dtype)).to("cuda")
    check_backend_on_case(TorchSdpaPagedAttentionBackend, case)


def test_graph_replay_equals_eager(platform):
    runner = platform.make_graph_runner()
    weight = torch.randn(16, 16, device="cuda")

    def fn(x, y):
        return torch.relu(x @ weight) + y

    for size in (8, 4):
        runner.capture(fn, [torch.zeros(size, 16, device="cuda")] * 2, size)
    assert runner.captured_sizes() == [4, 8]
    assert runner.padded_size(5) == 8 and runner.padded_size(9) is None
    x, y = torch.randn(8, 16, device="cuda"), torch.randn(8, 16, device="cuda")
    torch.testing.assert_close(runner.replay([x, y], 8), fn(x, y))
    # Fewer rows than the captured size: the leading rows come back.
    torch.testing.assert_close(runner.replay([x[:5], y[:5]], 8), fn(x[:5], y[:5]))
    with pytest.raises(ValueError, match="replay input 0 has shape"):
        runner.replay([torch.zeros(8, 3, device="cuda"), y], 8)


def _padded_decode_inputs(case, seq_lens: list[int], pad_to: int, seed: int):
    """Flat decode inputs for ``case``'s requests at ``seq_lens``, padded to ``pad_to`` rows."""
    spec = case.spec
    g = torch.Generator().manual_seed(seed)
    num_reqs = len(seq_lens)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(spec.dtype).cuda()

    bs = spec.block_size
    table = torch.zeros(pad_to, case.common.block_table.shape[1], dtype=torch.int32)
    table[:num_reqs] = case.common.block_table.cpu()
    slots = [int(table[r, (s - 1) // bs]) * bs + (s - 1) % bs for r, s in enumerate(seq_lens)]
    pad = pad_to - num_reqs
    return [
        rand(pad_to, spec.num_heads, spec.head_size),
        rand(pad_to, spec.num_kv_heads, spec.head_size),
        rand(pad_to, spec.num_kv_heads, spec.head_size),
        torch.tensor(slots + [-1] * pad, dtype=torch.int64).cuda(),
        torch.tensor(list(range(num_reqs + 1)) + [num_reqs] * pad, dtype=torch.int32).cuda(),
        torch.tensor(seq_lens + [0] * pad, dtype=torch.int32).cuda(),
        table.cuda(),
    ]


@needs_triton
def test_triton_decode_graph_replay_equals_eager(platform):
    """A padded decode step captured once replays correctly for other lengths and inputs."""
    spec = CaseSpec("decode", (9, 33, 16), (1, 1, 1), num_heads=8, num_kv_heads=2,
                    head_size=64, dtype=torch.float16)
    case = make_case(spec).to("cuda")
    backend = TritonPagedAttentionBackend(case.attention_spec)
    pad_to = 4

    def step_on(kv_cache):
        def step(query, key, value, slot_mapping, query_start_loc, seq_lens, block_table):
            metadata = TritonAttentionMetadata(
                num_reqs=pad_to, num_actual_tokens=pad_to, max_query_len=1,
                query_start_loc=query_start_loc, seq_lens=seq_lens, block_table=block_table,
                slot_mapping=slot_mapping,
            )
            return backend.forward(query, key, value, kv_cache, metadata, case.scale)
        return step

    graph_cache = case.kv_cache.clone()
    runner = platform.make_graph_runner()
    runner.capture(step_on(graph_cache), _padded_decode_inputs(case, [10, 34, 16], pad_to, 0),
                   pad_to)
    for seed, lens in enumerate(([10, 34, 16], [3, 20, 16], [16, 1, 7]), start=1):
        inputs = _padded_decode_inputs(case, lens, pad_to, seed)
        eager_cache = graph_cache.clone()
        expected = step_on(eager_cache)(*inputs)
        got = runner.replay(inputs, pad_to)
        torch.testing.assert_close(got[:3], expected[:3], atol=1e-3, rtol=0)
        torch.testing.assert_close(graph_cache, eager_cache, atol=0, rtol=0)


class _CudaTriton(TritonPagedAttentionBackend):
    """The Triton backend fed by a CPU-built PagedBatch: moves the step's metadata to the GPU."""

    def build_metadata(self, common: CommonAttentionMetadata):
        return super().build_metadata(dataclasses.replace(
            common,
            query_start_loc=common.query_start_loc.cuda(),
            seq_lens=common.seq_lens.cuda(),
            block_table=common.block_table.cuda(),
            slot_mapping=common.slot_mapping.cuda(),
        ))


@needs_triton
@torch.inference_mode()
def test_tiny_llama_on_gpu_matches_transformers(request):
    """Prefill, then a step mixing a decode token with a prefill chunk, through triton_paged."""
    transformers = pytest.importorskip("transformers")
    try:
        tiny_model_factory = request.getfixturevalue("tiny_model_factory")
    except pytest.FixtureLookupError:
        pytest.skip("tests/conftest.py (tiny model fixtures) not loaded")

    from backplane.config.configs import ModelConfig
    from backplane.core.loader import load_model
    from tests.fixtures.paged import PagedBatch

    path = tiny_model_factory("llama")
    ours = load_model(ModelConfig(model=path), "cuda")
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(6, 480, (20,), generator=g).tolist(), torch.randint(
        6, 480, (45,), generator=g).tolist()
    batch = PagedBatch(ours, _CudaTriton, num_reqs=2, max_len=64)
    batch.kv_caches = [c.cuda() for c in batch.kv_caches]

    def run(req_ids, tokens):
        ids, pos, ctx = batch.step(req_ids, tokens)
        return ours.compute_logits(ours(ids.cuda(), pos.cuda(), ctx)).cpu()

    run([0, 1], [a[:-1], b[:30]])
    logits = run([0, 1], [a[-1:], b[30:]])
    ref_a = ref(torch.tensor([a])).logits[0]
    ref_b = ref(torch.tensor([b])).logits[0]
    torch.testing.assert_close(logits[0], ref_a[-1], atol=1e-3, rtol=0)
    torch.testing.assert_close(logits[1:], ref_b[30:], atol=1e-3, rtol=0)


def test_cuda_passes_the_conformance_kit(tmp_path):
    """The plugin conformance kit, run against cuda as a third-party plugin would run it."""
    from tests.plugins.kit_runner import failures, run_kit

    outcomes = run_kit(tmp_path, "backplane.platforms.cuda:descriptor")
    assert not failures(outcomes), failures(outcomes)
    passed = {name for name, o in outcomes.items() if o == "passed"}
    assert "test_graph_replay_equals_eager" in passed
    assert any(n.startswith("test_attention_matches_reference_float32[triton_paged-")
               for n in passed)


PROMPTS = ["The quick brown fox", "Once upon a time there lived", "Hello"]


def _installed_cuda_and_model(request) -> str:
    """The tiny Llama fixture, skipping unless the cuda platform is pip-installed."""
    from importlib.metadata import entry_points

    if "cuda" not in {ep.name for ep in entry_points(group="backplane.platforms")}:
        pytest.skip("backplane is not pip-installed here: no 'cuda' platform entry point")
    try:
        return request.getfixturevalue("llama_model_dir")
    except pytest.FixtureLookupError:
        pytest.skip("tests/conftest.py (tiny model fixtures) not loaded")


def _greedy(model_dir: str, device: str, **kwargs):
    from backplane import LLM, SamplingParams

    llm = LLM(model=model_dir, device=device, max_model_len=128, num_kv_blocks=32,
              dtype="float32", **kwargs)
    assert llm.llm_engine.platform.name == device
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=2)
    return [o.outputs[0] for o in llm.generate(PROMPTS, params, use_tqdm=False)]


def assert_same_greedy_up_to_ties(got, expected, tie_margin: float = 1e-3) -> None:
    """Token-for-token equality, except that a first divergence at a near-tie is accepted.

    Different devices round differently; when the reference's top two
    candidates are within ``tie_margin`` of each other either pick is correct,
    and everything after it legitimately differs.
    """
    for g, e in zip(got, expected, strict=True):
        if list(g.token_ids) == list(e.token_ids):
            continue
        i = next(k for k, (a, b) in enumerate(zip(g.token_ids, e.token_ids, strict=True))
                 if a != b)
        top = e.logprobs[i]
        assert g.token_ids[i] in top, (
            f"position {i}: picked {g.token_ids[i]}, not among the reference's top-2 {top}")
        gap = abs(top[g.token_ids[i]].logprob - top[e.token_ids[i]].logprob)
        assert gap < tie_margin, f"position {i}: diverged with a logprob gap of {gap:.3g}"


@needs_triton
def test_llm_generate_on_cuda_matches_cpu(request):
    """The whole engine on the cuda platform (triton_paged) gives the cpu platform's tokens."""
    model_dir = _installed_cuda_and_model(request)
    got = _greedy(model_dir, "cuda")
    assert all(len(o.token_ids) == 10 for o in got)
    assert_same_greedy_up_to_ties(got, _greedy(model_dir, "cpu"))


def test_piecewise_graphs_on_cuda_match_cpu(request):
    """O3 on cuda: prefill chunks (a 16-token budget) replay CUDA graphs of the pieces
    between attention calls; the tokens are the cpu platform's."""
    model_dir = _installed_cuda_and_model(request)
    got = _greedy(model_dir, "cuda", optimization_level=3, max_num_batched_tokens=16,
                  enable_chunked_prefill=True,
                  compilation_config={"compile": False, "piecewise_capture_sizes": [4, 8, 16]})
    assert_same_greedy_up_to_ties(got, _greedy(model_dir, "cpu"))
