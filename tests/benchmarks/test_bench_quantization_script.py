"""scripts/bench_quantization.py once on tiny models: one speed round and the accuracy part.

No timing assertions: every variant must come out of both parts with finite figures,
in the JSON and in the printed table.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys

import pytest

from backplane.benchmarks.make_model import make_model
from backplane.platforms.cpu.int4 import int4_kernel_supported
from backplane.platforms.cpu.linear import bf16_gemm_supported

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__)))), "scripts", "bench_quantization.py")

pytestmark = pytest.mark.skipif(not (bf16_gemm_supported() and int4_kernel_supported()),
                                reason="no int8 / int4 kernel (AVX512-BF16 or AVX2) on this CPU")


def _script():
    spec = importlib.util.spec_from_file_location("bench_quantization", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


def test_speed_round_and_accuracy_on_tiny_models(bench_tiny_model, tmp_path, capsys):
    script = _script()
    gptq, int8 = str(tmp_path / "gptq"), str(tmp_path / "int8")
    make_model(gptq, shape="tiny", dtype="bfloat16", quantize="gptq-int4")
    make_model(int8, shape="tiny", dtype="bfloat16", quantize="int8")
    out = tmp_path / "result.json"
    assert script.main([
        "--model", bench_tiny_model, "--gptq-model", gptq, "--int8-model", int8,
        "--rounds", "1", "--b1-input-len", "8", "--b1-output-len", "4", "--b1-iters", "1",
        "--num-prompts", "4", "--input-len-range", "4", "12", "--output-len", "4",
        "--acc-models", "fixture", "--acc-prompts", "3", "--acc-tokens", "6",
        "--acc-dir", str(tmp_path / "acc"), "--json", str(out),
    ]) == 0
    table = capsys.readouterr().out
    result = json.loads(out.read_text())
    names = [v.name for v in script.VARIANTS]
    assert result["variants"] == names
    speed = result["speed"]["variants"]
    accuracy = result["accuracy"]["fixture"]
    assert accuracy["positions"] == 3 * 6
    for name in names:
        for key in ("b1_ms_per_token", "b1_tok_s", "batch_tok_s", "b1_speedup_vs_bf16",
                    "batch_speedup_vs_bf16"):
            assert math.isfinite(speed[name][key]["median"]) and speed[name][key]["median"] > 0
        acc = accuracy["variants"][name]
        assert math.isfinite(acc["mean_abs_dlogprob"]) and acc["mean_abs_dlogprob"] >= 0
        assert 0 <= acc["top1_agreement_pct"] <= 100
        row = next(line for line in table.splitlines() if line.startswith(f"| {name} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == 8 and "n/a" not in cells, row
        assert all(math.isfinite(float(c.split()[0])) for c in cells[1:]), row
    assert speed["bf16"]["b1_speedup_vs_bf16"]["median"] == 1.0
    assert accuracy["variants"]["bf16"] == {"mean_abs_dlogprob": 0.0, "max_abs_dlogprob": 0.0,
                                            "top1_agreement_pct": 100.0}
    assert "gptq-int4 batch-1 decode" in table and "tiny fixture Llama" in table


def test_each_round_starts_at_another_variant(monkeypatch):
    # A fixed order would hand any cost of a position (the first run of the process,
    # the one after llama.cpp's) to the same variant every round.
    script = _script()
    order: list[str] = []

    def fake_speed_once(variant, models, opts, seed):
        order.append(variant.name)
        return {"b1_ms_per_token": 10.0, "b1_tok_s": 100.0, "batch_tok_s": 50.0,
                "batch_seconds": 1.0}

    monkeypatch.setattr(script, "speed_once", fake_speed_once)
    variants = script.VARIANTS[:3]
    names = [v.name for v in variants]
    result = script.run_speed(variants, {}, script.SpeedOptions(rounds=3), progress=lambda _: None)
    assert order == names + names[1:] + names[:1] + names[2:] + names[:2]
    # The ratios still pair each variant with the bf16 run of the same round.
    assert all(len(result["variants"][n]["runs"]) == 3 for n in names)
    assert result["variants"]["int8-w8a16"]["b1_speedup_vs_bf16"]["median"] == 1.0
