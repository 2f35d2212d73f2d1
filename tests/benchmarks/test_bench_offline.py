"""`backplane bench make-model | throughput | latency` run once each on the tiny shape.

No timing assertions: these prove the tools run end to end and report every field.
"""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer

from backplane.entrypoints.cli.main import main


def _numel(shape) -> int:
    total = 1
    for dim in shape:
        total *= dim
    return total


def test_make_model_tiny(tmp_path):
    out = tmp_path / "m"
    summary_path = tmp_path / "summary.json"
    assert main(["bench", "make-model", str(out), "--shape", "tiny", "--dtype", "bfloat16",
                 "--json", str(summary_path)]) == 0
    summary = json.loads(summary_path.read_text())
    assert summary["architecture"] == "Qwen2ForCausalLM"
    assert summary["dtype"] == "bfloat16"
    config = AutoConfig.from_pretrained(out)
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (128, 2, 1024)
    assert config.tie_word_embeddings
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        embed = f.get_tensor("model.embed_tokens.weight")
        stored = sum(_numel(f.get_slice(n).get_shape()) for n in names)
    assert summary["num_parameters"] == stored
    assert "lm_head.weight" not in names  # tied: stored once
    assert 0.015 < embed.float().std().item() < 0.025  # the normal(0, 0.02) init
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok.encode("the quick brown fox")
    assert tok.decode(ids) == "the quick brown fox"
    assert tok.eos_token_id == config.eos_token_id
    assert "<|im_start|>assistant" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)


def test_throughput_tiny_with_baseline_ceiling_and_prefix_compare(bench_tiny_model, tmp_path):
    path = tmp_path / "throughput.json"
    code = main([
        "bench", "throughput", "--model", bench_tiny_model, "--num-prompts", "4",
        "--input-len-range", "8", "24", "--prefix-len", "16", "--output-len", "6",
        "--baseline", "transformers", "--baseline-batch-sizes", "2,4", "--ceiling",
        "--compare-prefix-caching", "--num-kv-blocks", "64", "--max-model-len", "256", "--no-progress",
        "--json", str(path),
    ])
    assert code == 0
    result = json.loads(path.read_text())
    bp = result["backplane"]
    for key in ("requests_per_s", "output_tokens_per_s", "total_tokens_per_s"):
        assert bp[key]["median"] > 0
    assert result["workload"]["num_prompts"] == 4
    assert result["num_steps"] >= 6
    assert result["decode_steps"], "no decode-only steps were recognised"
    decode = next(iter(result["decode_steps"].values()))
    assert decode["median_step_s"] > 0 and 0 <= decode["overhead_pct"] <= 100
    assert set(result["transformers"]["sweep"]) == {"2", "4"}
    assert result["speedup_over_transformers"]["median"] > 0
    ceiling = next(iter(result["ceiling"].values()))
    assert ceiling["step_s"] > 0 and ceiling["engine_fraction_of_ceiling"] > 0
    assert ceiling["layout"] in {"separate", "fused", "platform"}
    assert "platform_s" in ceiling  # the CPU platform's prepare_model hook was timed
    assert ceiling["engine_fraction_of_ceiling_cpu"] > 0 and decode["cpu_util"] > 0
    floor = result["workload_floor"]
    # The floor leaves out everything but the matmuls; whether the engine stays above it
    # is a timing comparison (two measurements taken seconds apart), which a loaded
    # machine can invert, so the test checks that it is computed, not how it compares.
    assert 0 < floor["prefill_s_per_token"] and 0 < floor["decode_s_per_token"]
    assert 0 < floor["seconds"]["median"] and bp["seconds"]["median"] > 0
    assert floor["max_speedup_over_transformers"]["median"] > 0
    pc = result["prefix_caching"]
    assert pc["on"]["output_tokens_per_s"]["median"] > 0
    assert pc["speedup_on_over_off"]["median"] > 0
    # 64 blocks x 16 tokens of KV, and the prefix cache saw the shared 16-token prefix.
    assert result["memory"]["kv_cache_tokens"] == 1024
    assert result["engine_stats"]["prefix_cache_hits"] > 0
    assert result["memory"]["peak_rss_bytes"] > result["memory"]["weight_bytes"]


def test_throughput_structured_json(bench_tiny_model, tmp_path):
    """--structured-json: every request is constrained, and still makes exactly
    --output-len tokens (the schema's array never ends early)."""
    path = tmp_path / "throughput.json"
    code = main([
        "bench", "throughput", "--model", bench_tiny_model, "--num-prompts", "3",
        "--input-len", "8", "--output-len", "20", "--structured-json", "--num-kv-blocks", "64",
        "--max-model-len", "256", "--no-progress", "--json", str(path),
    ])
    assert code == 0
    result = json.loads(path.read_text())
    assert result["structured_json"]["type"] == "array"
    bp = result["backplane"]
    tokens = bp["output_tokens_per_s"]["median"] * bp["seconds"]["median"]
    assert abs(tokens - 3 * 20) < 0.5, tokens


def test_latency_tiny(bench_tiny_model, capsys):
    code = main([
        "bench", "latency", "--model", bench_tiny_model, "--batch-sizes", "1,2",
        "--input-len", "8", "--output-len", "5", "--input-lens", "8,16", "--num-iters", "1",
        "--ceiling", "--num-kv-blocks", "64", "--max-model-len", "256", "--no-progress", "--json",
    ])
    assert code == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)  # stdout is pure JSON; the table went to stderr
    assert "backplane bench latency" in captured.err
    assert set(result["decode"]) == {"1", "2"}
    for entry in result["decode"].values():
        assert entry["median_step_s"] > 0 and entry["median_per_token_s"] > 0
    assert set(result["prefill"]) == {"8", "16"}
    assert all(p["median_s"] > 0 for p in result["prefill"].values())
    assert set(result["ceiling"]) == {"1", "2"}
    # The physical floors: measured bandwidth and GEMM rate, and each step's fraction.
    floors = result["floors"]
    assert floors["stream_gb_per_s"] > 0 and floors["gemm_gflops"] > 0
    assert set(floors["batches"]) == {"1", "2"}
    for entry in floors["batches"].values():
        assert entry["floor_s"] == max(entry["bandwidth_floor_s"], entry["compute_floor_s"])
        assert 0 < entry["engine_fraction_of_floor"] and entry["bound"] in {"bandwidth",
                                                                            "compute"}
    assert "fraction of floor" in captured.err


def test_speculative_bench_and_make_draft(bench_tiny_model, tmp_path, capsys):
    """bench make-draft cuts a working draft; bench speculative runs the same requests
    without and with each config and reports acceptance and the break-even length."""
    draft = tmp_path / "draft"
    assert main(["bench", "make-draft", bench_tiny_model, str(draft), "--num-layers", "1"]) == 0
    assert json.loads((draft / "config.json").read_text())["num_hidden_layers"] == 1
    path = tmp_path / "spec.json"
    code = main([
        "bench", "speculative", "--model", bench_tiny_model, "--num-prompts", "2",
        "--output-len", "16", "--max-model-len", "256", "--num-kv-blocks", "64",
        "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3}',
        "--extra-speculative-config",
        json.dumps({"method": "draft_model", "model": str(draft), "num_speculative_tokens": 2}),
        "--no-progress", "--json", str(path),
    ])
    assert code == 0
    result = json.loads(path.read_text())
    base, ngram, drafted = result["results"]
    assert base["config"] == "no speculation" and "speedup" not in base
    for row in (ngram, drafted):
        assert row["output_tokens"] == base["output_tokens"] == 2 * 16
        assert 0.0 <= row["acceptance_rate"] <= 1.0
        assert row["mean_accepted_length"] >= 1.0
        assert row["speedup"] > 0 and row["break_even_length"] > 0
    assert "acceptance_rate" in capsys.readouterr().out
    with pytest.raises(ValueError, match="num_layers"):
        main(["bench", "make-draft", bench_tiny_model, str(tmp_path / "bad"), "--num-layers",
              "9"])


def test_make_lora_and_throughput_with_a_lora_mix(bench_tiny_model, tmp_path):
    """bench make-lora writes PEFT-layout adapters; bench throughput --lora-mix spreads the
    requests over them (every request still makes --output-len tokens)."""
    paths = []
    for seed in range(2):
        out = tmp_path / f"lora{seed}"
        assert main(["bench", "make-lora", bench_tiny_model, str(out), "--rank", "4",
                     "--seed", str(seed)]) == 0
        assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
        paths.append(f"a{seed}={out}")
    path = tmp_path / "throughput.json"
    code = main([
        "bench", "throughput", "--model", bench_tiny_model, "--num-prompts", "4",
        "--input-len", "8", "--output-len", "6", "--num-kv-blocks", "64",
        "--max-model-len", "256", "--enable-lora", "--max-loras", "2", "--max-lora-rank", "4",
        "--lora-modules", *paths, "--lora-mix", "2", "--no-progress", "--json", str(path),
    ])
    assert code == 0
    result = json.loads(path.read_text())
    assert result["lora_mix"] == ["a0", "a1"]
    bp = result["backplane"]
    assert abs(bp["output_tokens_per_s"]["median"] * bp["seconds"]["median"] - 4 * 6) < 0.5


def test_latency_tiny_tensor_parallel_reports_collective_time(bench_tiny_model, capsys):
    code = main([
        "bench", "latency", "--model", bench_tiny_model, "--batch-sizes", "1,2",
        "--input-len", "8", "--output-len", "4", "--input-lens", "8", "--num-iters", "1",
        "--num-kv-blocks", "64", "--max-model-len", "256", "--no-progress", "--json",
        "-tp", "2",
    ])
    assert code == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    for entry in result["decode"].values():
        assert 0 < entry["median_comm_s"] < entry["median_step_s"]
    assert "collectives ms (rank 0)" in captured.err
