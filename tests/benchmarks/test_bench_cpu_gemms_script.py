"""scripts/bench_cpu_gemms.py once on the tiny shape: every format this CPU runs comes
out with finite figures for every row count, in the return value and the JSON (no
timing assertions)."""

from __future__ import annotations

import importlib.util
import json
import math
import os

import pytest

from backplane.platforms.cpu.linear import bf16_gemm_supported

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__)))), "scripts", "bench_cpu_gemms.py")

pytestmark = pytest.mark.skipif(not bf16_gemm_supported(),
                                reason="no GEMM kernel (AVX512-BF16 or AVX2) on this CPU")


def _script():
    spec = importlib.util.spec_from_file_location("bench_cpu_gemms", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_format_on_the_tiny_shape(tmp_path, capsys):
    script = _script()
    assert script.decoder_linear_shapes("tiny") == [(256, 128), (128, 128), (512, 128),
                                                    (128, 256)]
    out = tmp_path / "gemms.json"
    results = script.main(["--shape", "tiny", "--rows", "1,3,17", "--repeats", "1",
                           "--group", "32", "--json", str(out)])
    assert json.loads(out.read_text())["formats"].keys() == results["formats"].keys()
    expected = [f for f in script.FORMATS if script.supported(f)]
    assert list(results["formats"]) == expected and "bf16" in expected
    for fmt, entry in results["formats"].items():
        # 2 layers x (256 + 128 + 512) x 128 + 128 x 256 weights at the format's width
        weights = 2 * (256 * 128 + 128 * 128 + 512 * 128 + 128 * 256)
        width = {"bf16": 2, "w8a16": 1, "w8a8": 1, "fp8": 1, "int4": 0.5}[fmt]
        assert entry["weight_bytes"] == weights * width, fmt
        assert sorted(entry["rows"]) == [1, 3, 17]
        for figures in entry["rows"].values():
            assert all(math.isfinite(v) and v > 0 for v in figures.values()), (fmt, figures)
    printed = capsys.readouterr().out
    assert all(f"{fmt:6s} rows   17" in printed for fmt in expected)


def test_unknown_formats_are_refused():
    with pytest.raises(SystemExit):
        _script().main(["--shape", "tiny", "--formats", "bf16,int3"])
