"""Pipeline parallelism: which decoder layers a stage holds, and the hops between stages.

The layer stack is cut into ``pipeline_parallel_size`` contiguous runs. Stage 0
also holds the embedding, the final norm and the output head, so the driver
(rank 0) samples as it does without a pipeline: the activations go 0 -> 1 ->
... -> last -> 0 each step, through the pipeline group's communicator
(``isend``/``recv`` of the platform). Stage 0 doing both ends is why the
remainder layers of an uneven split go to the later stages.

Several batches are in flight at once (up to one per stage, see the engine
core's pipelined step): stage 0 starts batch B while batch A is still in the
later stages, and takes A's activations back later. Every hop is a
non-blocking send, so no stage waits for its successor to be ready; each link
carries the batches in the order they were started.
"""

from __future__ import annotations

import torch

from backplane.core.distributed.parallel_state import GroupCoordinator


def stage_layers(num_layers: int, num_stages: int, stage: int,
                 first_stage_extra: float = 0.0) -> range:
    """The decoder layers of ``stage``.

    ``first_stage_extra``: the work stage 0 does besides its layers (the output
    head), in layers' worth; stage 0 takes that much fewer layers (at least one,
    at most an even share), and the others share the rest evenly, the
    remainder to the last stages. With no extra work every stage gets an even
    share, the remainder to the last stages.
    """
    if num_stages > num_layers:
        raise ValueError(f"pipeline_parallel_size ({num_stages}) exceeds num_hidden_layers "
                         f"({num_layers})")
    even = num_layers // num_stages
    first = max(1, min(even, round((num_layers + first_stage_extra) / num_stages
                                   - first_stage_extra)))
    if stage == 0:
        return range(first)
    others = num_stages - 1
    per, extra = divmod(num_layers - first, others)
    first_with_extra = others - extra  # among stages 1.., counted from 0
    k = stage - 1
    start = first + k * per + max(0, k - first_with_extra)
    return range(start, start + per + (1 if k >= first_with_extra else 0))


def head_cost_in_layers(vocab_size: int, hidden_size: int, intermediate_size: int,
                        num_heads: int, num_kv_heads: int, head_dim: int) -> float:
    """The output head's weight bytes over one decoder layer's: what each decode step
    reads for it, in layers (the embedding lookup reads only the tokens' rows)."""
    attention = 2 * hidden_size * num_heads * head_dim + 2 * hidden_size * num_kv_heads * head_dim
    layer = attention + 3 * hidden_size * intermediate_size
    return vocab_size * hidden_size / layer


def receive_activations(pp: GroupCoordinator, shape: tuple[int, ...], dtype: torch.dtype,
                        device: torch.device) -> torch.Tensor:
    """The previous stage's activations (stage 0 receives the last stage's)."""
    buffer = torch.empty(shape, dtype=dtype, device=device)
    return pp.recv(buffer, src=(pp.rank - 1) % pp.size)


def send_activations(pp: GroupCoordinator, hidden: torch.Tensor) -> None:
    """To the next stage (the last stage sends back to stage 0), without waiting for it."""
    pp.isend(hidden.contiguous(), dst=(pp.rank + 1) % pp.size)
