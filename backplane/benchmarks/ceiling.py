"""The floors of a decode step: the model's matmuls alone, and the machine's limits.

`physical_floors` gives what the hardware allows: the step's bytes at the
streaming read bandwidth and its FLOPs at the best GEMM rate, both measured in
the same run. The rest of this module is the older diagnostic, the
linear-layer ceiling:

A decode step of a dense decoder must at least multiply every layer's weight
matrices by a [batch, in] activation: q/k/v/o, gate/up/down, then the
lm_head for one row per sequence. Timing exactly those `F.linear` calls on
weights of the real shapes and dtype, one distinct tensor per layer so that
they stream from memory as in a real step rather than staying in cache,
gives the floor a decode step cannot beat on this machine with these
kernels. An engine's decode step time divided into this is its fraction of
the ceiling.

Layouts timed: separate projections and fused qkv / gate_up with plain
`F.linear`, and, when the engine's platform has a `prepare_model` hook (the
CPU plugin prepacks bf16 weights for oneDNN there), the fused layout as
`nn.Linear` modules passed through that hook, i.e. with the platform's own
linear kernels. The fastest layout is the ceiling, so an engine using the
platform's kernels is compared with the best those kernels can do.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from backplane.config.configs import parse_dtype


@dataclass
class LayerShapes:
    """Matmul shapes of one decoder layer and the lm_head."""

    hidden: int
    q_out: int
    kv_out: int
    intermediate: int
    vocab: int
    num_layers: int
    qkv_bias: bool

    @classmethod
    def from_hf_config(cls, hf_config) -> LayerShapes:
        get = getattr(hf_config, "get_text_config", None)
        cfg = get() if callable(get) else hf_config
        heads = cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        return cls(
            hidden=cfg.hidden_size,
            q_out=heads * head_dim,
            kv_out=kv_heads * head_dim,
            intermediate=cfg.intermediate_size,
            vocab=cfg.vocab_size,
            num_layers=cfg.num_hidden_layers,
            qkv_bias=bool(getattr(cfg, "attention_bias", False)) or cfg.model_type == "qwen2",
        )


class _Weights:
    """Fused per-layer weights; the separate layout uses contiguous row slices of them."""

    def __init__(self, shapes: LayerShapes, dtype: torch.dtype) -> None:
        s = shapes
        qkv_out = s.q_out + 2 * s.kv_out

        def mat(rows: int, cols: int) -> torch.Tensor:
            # Values do not change matmul speed, but uninitialised memory may hold
            # denormals or NaNs that do on some CPUs.
            return torch.empty(rows, cols, dtype=dtype).uniform_(-0.02, 0.02)

        self.layers = []
        for _ in range(s.num_layers):
            qkv = mat(qkv_out, s.hidden)
            bias = torch.zeros(qkv_out, dtype=dtype) if s.qkv_bias else None
            self.layers.append(
                {
                    "qkv": qkv,
                    "qkv_bias": bias,
                    "o": mat(s.hidden, s.q_out),
                    "gate_up": mat(2 * s.intermediate, s.hidden),
                    "down": mat(s.hidden, s.intermediate),
                }
            )
        self.lm_head = mat(s.vocab, s.hidden)
        self.shapes = s

    def bytes(self) -> int:
        total = self.lm_head.numel() * self.lm_head.element_size()
        for layer in self.layers:
            for t in layer.values():
                if t is not None:
                    total += t.numel() * t.element_size()
        return total


def _step_separate(w: _Weights, x_h, x_q, x_i, lm_head: bool = True) -> None:
    s = w.shapes
    for layer in w.layers:
        qkv, b = layer["qkv"], layer["qkv_bias"]
        q_end, k_end = s.q_out, s.q_out + s.kv_out
        F.linear(x_h, qkv[:q_end], None if b is None else b[:q_end])
        F.linear(x_h, qkv[q_end:k_end], None if b is None else b[q_end:k_end])
        F.linear(x_h, qkv[k_end:], None if b is None else b[k_end:])
        F.linear(x_q, layer["o"])
        F.linear(x_h, layer["gate_up"][: s.intermediate])
        F.linear(x_h, layer["gate_up"][s.intermediate :])
        F.linear(x_i, layer["down"])
    if lm_head:
        F.linear(x_h, w.lm_head)


def _step_fused(w: _Weights, x_h, x_q, x_i, lm_head: bool = True) -> None:
    for layer in w.layers:
        F.linear(x_h, layer["qkv"], layer["qkv_bias"])
        F.linear(x_q, layer["o"])
        F.linear(x_h, layer["gate_up"])
        F.linear(x_i, layer["down"])
    if lm_head:
        F.linear(x_h, w.lm_head)


class _ModuleStack(torch.nn.Module):
    """The fused layout as nn.Linear modules sharing the weights, for a platform hook."""

    def __init__(self, w: _Weights) -> None:
        super().__init__()

        def linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.nn.Linear:
            mod = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                                  device="meta", dtype=weight.dtype)
            mod.weight = torch.nn.Parameter(weight, requires_grad=False)
            if bias is not None:
                mod.bias = torch.nn.Parameter(bias, requires_grad=False)
            return mod

        self.layers = torch.nn.ModuleList(
            torch.nn.ModuleDict({
                "qkv": linear(layer["qkv"], layer["qkv_bias"]),
                "o": linear(layer["o"]),
                "gate_up": linear(layer["gate_up"]),
                "down": linear(layer["down"]),
            })
            for layer in w.layers
        )
        self.lm_head = linear(w.lm_head)


def _step_modules(stack: torch.nn.Module, x_h, x_q, x_i, lm_head: bool = True) -> None:
    for layer in stack.layers:
        layer["qkv"](x_h)
        layer["o"](x_q)
        layer["gate_up"](x_h)
        layer["down"](x_i)
    if lm_head:
        stack.lm_head(x_h)


def _time(fn, min_iters: int, min_seconds: float) -> tuple[float, float]:
    """Median wall and median process-CPU seconds of ``fn()`` after one warm-up call."""
    fn()  # warm-up: first-call kernel selection and page faults
    walls: list[float] = []
    cpus: list[float] = []
    start = time.perf_counter()
    while len(walls) < min_iters or time.perf_counter() - start < min_seconds:
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
        if len(walls) >= 200:
            break
    return statistics.median(walls), statistics.median(cpus)


def platform_model_hook(engine) -> Callable[[torch.nn.Module], torch.nn.Module] | None:
    """The engine platform's ``prepare_model`` bound to the engine's config, if it has one."""
    platform = getattr(engine, "platform", None)
    hook = getattr(platform, "prepare_model", None)
    if hook is None:
        return None
    config = engine.config
    return lambda model: hook(model, config)


def measure_ceiling(
    hf_config,
    dtype: str,
    batch_sizes: list[int],
    min_iters: int = 5,
    min_seconds: float = 0.5,
    prepare_model: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
    lm_head: bool = True,
) -> dict[int, dict]:
    """Median seconds of one decode step's linear layers at each batch size.

    ``prepare_model`` is the engine platform's model hook (e.g. weight
    prepacking); when given, a third layout runs through it. ``lm_head=False``
    leaves out the output projection: the floor of a prefill chunk of ``batch``
    tokens, of which only the last rows need logits.

    Returns {batch: {"step_s", "step_cpu_s", "separate_s", "fused_s",
    ["platform_s"], "layout", "per_token_s", "weight_bytes", "gb_per_s",
    "cpu_util"}} where ``step_s`` is the fastest layout's median wall time,
    ``step_cpu_s`` its median process CPU time (all threads), and
    ``cpu_util`` = CPU / (wall x threads): well below 1 means the cores were
    shared with other processes (or the kernels ran on fewer threads).
    """
    torch_dtype = parse_dtype(dtype)
    shapes = LayerShapes.from_hf_config(hf_config)
    weights = _Weights(shapes, torch_dtype)
    weight_bytes = weights.bytes()
    stack = None
    if prepare_model is not None:
        stack = prepare_model(_ModuleStack(weights).eval())
    results: dict[int, dict] = {}
    with torch.inference_mode():
        for batch in sorted(set(batch_sizes)):
            if batch < 1:
                raise ValueError(f"batch size ({batch}) must be at least 1")
            x_h = torch.randn(batch, shapes.hidden, dtype=torch_dtype)
            x_q = torch.randn(batch, shapes.q_out, dtype=torch_dtype)
            x_i = torch.randn(batch, shapes.intermediate, dtype=torch_dtype)
            timed = {
                "separate": _time(partial(_step_separate, weights, x_h, x_q, x_i, lm_head),
                                  min_iters, min_seconds),
                "fused": _time(partial(_step_fused, weights, x_h, x_q, x_i, lm_head),
                               min_iters, min_seconds),
            }
            if stack is not None:
                timed["platform"] = _time(partial(_step_modules, stack, x_h, x_q, x_i, lm_head),
                                          min_iters, min_seconds)
            layout = min(timed, key=lambda name: timed[name][0])
            best, best_cpu = timed[layout]
            cpu_util = best_cpu / (best * torch.get_num_threads())
            results[batch] = {
                "step_s": best,
                "step_cpu_s": best_cpu,
                **{f"{name}_s": wall for name, (wall, _) in timed.items()},
                "layout": layout,
                "per_token_s": best / batch,
                "weight_bytes": weight_bytes,
                "gb_per_s": weight_bytes / best / 1e9,
                "cpu_util": cpu_util,
            }
    return results


# Bytes streamed to measure read bandwidth: well past any cache on these machines.
_STREAM_BYTES = 512 * 2**20


def measure_stream_bandwidth(repeats: int = 5) -> float:
    """Bytes per second the cores read from memory: a float32 sum over a buffer far
    larger than the caches (the best of ``repeats``), on torch's threads."""
    buffer = torch.ones(_STREAM_BYTES // 4, dtype=torch.float32)
    buffer.sum()  # fault the pages in before timing
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - start)
    return _STREAM_BYTES / best


def measure_gemm_flops(dtype: torch.dtype, stack: torch.nn.Module | None = None,
                       shapes: LayerShapes | None = None, size: int = 1024,
                       batch: int = 256) -> float:
    """The best matmul FLOP/s this machine reaches in ``dtype``: torch's own GEMM on
    square matrices, and (given) the platform's prepared layers at a large batch."""
    a = torch.empty(size, size, dtype=dtype).uniform_(-1, 1)
    b = torch.empty(size, size, dtype=dtype).uniform_(-1, 1)
    seconds, _ = _time(lambda: a @ b, 3, 0.3)
    best = 2 * size**3 / seconds
    if stack is not None and shapes is not None:
        s = shapes
        x_h = torch.randn(batch, s.hidden, dtype=dtype)
        x_q = torch.randn(batch, s.q_out, dtype=dtype)
        x_i = torch.randn(batch, s.intermediate, dtype=dtype)
        with torch.inference_mode():
            seconds, _ = _time(partial(_step_modules, stack, x_h, x_q, x_i, False), 2, 0.3)
        best = max(best, 2 * batch * _linear_params(s, lm_head=False) / seconds)
    return best


def _linear_params(s: LayerShapes, lm_head: bool) -> int:
    per_layer = (s.hidden * (s.q_out + 2 * s.kv_out) + s.q_out * s.hidden
                 + 3 * s.hidden * s.intermediate)
    return s.num_layers * per_layer + (s.vocab * s.hidden if lm_head else 0)


def physical_floors(hf_config, dtype: str, batch_sizes: list[int], context_tokens: int,
                    prepare_model: Callable[[torch.nn.Module], torch.nn.Module] | None = None
                    ) -> dict:
    """What the hardware itself allows for a decode step at each batch size.

    Bandwidth floor: the bytes a step must read (every weight once, plus each
    sequence's KV cache of ``context_tokens``) at the streaming bandwidth measured
    now. Compute floor: the step's matmul FLOPs at the best GEMM rate measured now.
    A step cannot beat the larger of the two, whatever its kernels.
    """
    torch_dtype = parse_dtype(dtype)
    shapes = LayerShapes.from_hf_config(hf_config)
    get = getattr(hf_config, "get_text_config", None)
    cfg = get() if callable(get) else hf_config
    itemsize = torch.empty((), dtype=torch_dtype).element_size()
    weight_bytes = _linear_params(shapes, lm_head=True) * itemsize
    kv_per_token = 2 * shapes.num_layers * shapes.kv_out * itemsize
    stack = None
    if prepare_model is not None:
        stack = prepare_model(_ModuleStack(_Weights(shapes, torch_dtype)).eval())
    bandwidth = measure_stream_bandwidth()
    flops_rate = measure_gemm_flops(torch_dtype, stack, shapes)
    del stack
    floors = {"stream_gb_per_s": bandwidth / 1e9, "gemm_gflops": flops_rate / 1e9,
              "model": getattr(cfg, "model_type", None), "batches": {}}
    for batch in sorted(set(batch_sizes)):
        read = weight_bytes + batch * context_tokens * kv_per_token
        bandwidth_s = read / bandwidth
        compute_s = 2 * batch * _linear_params(shapes, lm_head=True) / flops_rate
        floors["batches"][batch] = {
            "bytes_read": read, "bandwidth_floor_s": bandwidth_s,
            "compute_floor_s": compute_s, "floor_s": max(bandwidth_s, compute_s),
            "bound": "bandwidth" if bandwidth_s >= compute_s else "compute",
        }
    return floors


def compare_with_engine(entry: dict, engine_decode: dict) -> None:
    """Add the engine's fraction of the ceiling to a ceiling ``entry`` (in place).

    ``engine_fraction_of_ceiling`` compares wall times; ``..._cpu`` compares
    process CPU times, which stay meaningful when other processes share the
    cores (a descheduled process accrues no CPU time).
    """
    entry["engine_step_s"] = engine_decode["median_step_s"]
    entry["engine_fraction_of_ceiling"] = entry["step_s"] / engine_decode["median_step_s"]
    if engine_decode.get("median_cpu_s"):
        entry["engine_step_cpu_s"] = engine_decode["median_cpu_s"]
        entry["engine_fraction_of_ceiling_cpu"] = entry["step_cpu_s"] / engine_decode["median_cpu_s"]
