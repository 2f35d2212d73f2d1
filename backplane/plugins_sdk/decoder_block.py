"""The parts of a plain pre-norm decoder layer, for platforms that run a whole layer
in one call (SDK 1.1).

A core decoder layer (``layer_kind`` ``"decoder_layer"``) built as the plain
Llama/Qwen2/Mistral block answers ``layer.block()`` with a `DecoderBlock`; one
with anything else (q/k norms, post-norms, a residual multiplier, tensor
parallel shards) answers None. A platform's ``prepare_model`` may then give the
layer a runner with ``layer.set_block_runner(runner)``: the layer's forward
calls ``runner(x, cos, sin, ctx)`` first and uses its result unless it is None
(the runner declines a step it has no kernel for, e.g. a prefill, and the
layer's modules run as usual). A runner must return exactly what the modules
would (bit for bit is the aim: the same kernels in the same order), and it sees
the modules as they were when it was made, so a platform sets runners last and
not when something replaces modules afterwards (LoRA adapters do).

A model can go one step further: the core decoder model (``layer_kind``
``"decoder_stack"``) takes ``model.set_stack_runner(runner)``; its forward (a
single pipeline stage without auxiliary hidden states) then calls
``runner(hidden, cos, sin, ctx)`` for all its decoder layers at once, the
embedding's output in and the last layer's output out (before the final norm),
and runs the layers one by one (each trying its own runner) when that returns
None. The same rules hold: exactly what the layers give, and set last, not
under LoRA.

A smaller hook serves the steps a runner declines: a core gated MLP (``layer_kind``
``"gated_mlp"``: ``down_proj(act(gate_up_proj(x)))``, in the plain block and
elsewhere) takes ``mlp.set_gate_up_activation(fn)``; its forward then calls
``fn(x)`` for ``act(gate_up_proj(x))`` (one GEMM with the activation in its
store, say) and runs the two modules as usual when that returns None. The same
rules hold: exactly the modules' result, and set last, not under LoRA.

What the block computes, for hidden states ``x [tokens, hidden]``::

    qkv = qkv_proj(input_norm(x))                # [tokens, (heads + 2 kv_heads) * head_size]
    q, k = rotary(qkv[:, :(heads + kv_heads) * head_size] as [tokens, heads + kv_heads,
                  head_size], cos, sin) split at heads
    v = the rest of qkv
    o = o_proj(attention(q, k, v, ctx))          # attention: the core Attention layer
    h = x + o                                    # rounded to x.dtype
    out = h + down_proj(activation(gate_up_proj(post_attention_norm(h))))
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class DecoderBlock:
    """A decoder layer's modules (as the platform's ``prepare_model`` left them) and
    its attention geometry."""

    input_norm: nn.Module  # layer_kind "rms_norm" (or the platform's replacement)
    qkv_proj: nn.Module  # rows: q, then k, then v
    rotary: nn.Module  # layer_kind "rotary", applied to q and k together
    attention: nn.Module  # the core Attention layer: layer_idx, scale
    o_proj: nn.Module
    post_attention_norm: nn.Module  # layer_kind "rms_norm"
    gate_up_proj: nn.Module  # rows: gate, then up
    activation: nn.Module  # layer_kind "silu_and_mul"
    down_proj: nn.Module
    num_heads: int
    num_kv_heads: int
    head_size: int
    layer_idx: int
    scale: float
