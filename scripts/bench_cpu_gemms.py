"""The cpu platform's GEMM kernels alone, on a bench shape's decoder linear layers.

Builds every decoder linear layer of a `bench make-model` shape (fused q/k/v, o,
fused gate/up, down; each layer its own random weights, so they stream from
memory as in a decode step rather than from cache) for each weight format, and
calls them back to back at the given row counts, as a model step would:

    python scripts/bench_cpu_gemms.py --shape qwen2-0.5b --rows 1,4,64

Prints, per format and row count, the best time of the whole chain over
``--repeats``, the weight bytes streamed per second and the GFLOP/s. What the rest
of a decode step costs is the engine's time minus this (docs/benchmarks.md).
Formats: bf16 (the platform's bf16 GEMM), w8a16 / w8a8 (`--quantization
int8_weight_only` / `int8`), fp8 (`--quantization fp8`), int4 (a GPTQ checkpoint's
layers: symmetric, round-to-nearest, ``--group`` columns per scale).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from torch import nn

from backplane.benchmarks.make_model import SHAPES
from backplane.core.quantization.packing import quantize_rtn
from backplane.platforms.cpu.fp8 import Fp8Linear, fp8_kernel_supported
from backplane.platforms.cpu.int4 import Int4Linear, int4_kernel_supported
from backplane.platforms.cpu.linear import BlockedBf16Linear, Int8Linear, bf16_gemm_supported
from backplane.plugins_sdk.quantization import Int4Weights

FORMATS = ("bf16", "w8a16", "w8a8", "fp8", "int4")


def decoder_linear_shapes(shape: str) -> list[tuple[int, int]]:
    """``(out_features, in_features)`` of one decoder layer's linear layers, in call order."""
    cfg = SHAPES[shape].config
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    heads, kv_heads = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg[
        "num_attention_heads"]
    head_dim = cfg.get("head_dim") or hidden // heads
    return [((heads + 2 * kv_heads) * head_dim, hidden), (hidden, heads * head_dim),
            (2 * inter, hidden), (hidden, inter)]


def make_layer(fmt: str, weight: torch.Tensor, group: int) -> nn.Module:
    """One linear layer of ``weight [N, K]`` (float32) in format ``fmt``."""
    if fmt == "bf16":
        return BlockedBf16Linear(weight.bfloat16(), None, float_output=False)
    if fmt in ("w8a16", "w8a8"):
        return Int8Linear(weight.bfloat16(), None, float_output=False,
                          activations="int8" if fmt == "w8a8" else "bf16")
    if fmt == "fp8":
        return Fp8Linear(weight, None)
    if fmt == "int4":
        q, zeros, scales = quantize_rtn(weight, group, sym=True)
        return Int4Linear(Int4Weights(q, scales, zeros, group))
    raise ValueError(f"format {fmt!r} is not one of {FORMATS}")


def supported(fmt: str) -> bool:
    return {"fp8": fp8_kernel_supported, "int4": int4_kernel_supported}.get(
        fmt, bf16_gemm_supported)()


def weight_bytes(layer: nn.Module) -> int:
    return sum(b.numel() * b.element_size() for name, b in layer.named_buffers()
               if name in ("packed_weight",))


def run(shape: str, layers: int | None, rows: list[int], formats: list[str], group: int,
        repeats: int, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    per_layer = decoder_linear_shapes(shape)
    count = layers or SHAPES[shape].config["num_hidden_layers"]
    results: dict = {"shape": shape, "layers": count, "threads": torch.get_num_threads(),
                     "formats": {}}
    for fmt in formats:
        if not supported(fmt):
            print(f"{fmt}: no kernel on this CPU, skipped", flush=True)
            continue
        chain = [make_layer(fmt, torch.randn(n, k, generator=gen) * 0.05, group)
                 for _ in range(count) for n, k in per_layer]
        nbytes = sum(weight_bytes(layer) for layer in chain)
        entry = results["formats"][fmt] = {"weight_bytes": nbytes, "rows": {}}
        for m in rows:
            inputs = {k: torch.randn(m, k, generator=gen).bfloat16() for _, k in per_layer}
            best = float("inf")
            for _ in range(repeats + 1):  # the first pass warms the kernels up
                start = time.perf_counter()
                for layer in chain:
                    layer(inputs[layer.in_features])
                best = min(best, time.perf_counter() - start)
            flops = 2 * m * sum(layer.in_features * layer.out_features for layer in chain)
            entry["rows"][m] = {"ms": best * 1e3, "gb_per_s": nbytes / best / 1e9,
                                "gflop_per_s": flops / best / 1e9}
            print(f"{fmt:6s} rows {m:4d}: {best * 1e3:8.2f} ms  {nbytes / best / 1e9:6.1f} GB/s "
                  f"of weights  {flops / best / 1e9:7.1f} GFLOP/s", flush=True)
        del chain
    return results


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="qwen2-0.5b", choices=sorted(SHAPES))
    p.add_argument("--layers", type=int, default=None,
                   help="decoder layers to build (default: the shape's)")
    p.add_argument("--rows", default="1,4,64", help="comma list of activation row counts")
    p.add_argument("--formats", default=",".join(FORMATS), help=f"comma list of {FORMATS}")
    p.add_argument("--group", type=int, default=128, help="int4 columns per scale")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default=None, help="write the figures here")
    args = p.parse_args(argv)
    formats = args.formats.split(",")
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        p.error(f"--formats: {unknown} not in {FORMATS}")
    results = run(args.shape, args.layers, [int(r) for r in args.rows.split(",")], formats,
                  args.group, args.repeats)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
