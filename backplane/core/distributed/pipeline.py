"""Pipeline parallelism: which decoder layers a stage holds, and the hops between stages.

The layer stack is cut into ``pipeline_parallel_size`` contiguous runs. Stage 0
also holds the embedding, the final norm and the output head, so the driver
(rank 0) samples as it does without a pipeline: the activations go 0 -> 1 ->
... -> last -> 0 each step, through the pipeline group's communicator
(``send``/``recv`` of the platform). Stage 0 doing both ends is why the
remainder layers of an uneven split go to the later stages.
"""

from __future__ import annotations

import torch

from backplane.core.distributed.parallel_state import GroupCoordinator


def stage_layers(num_layers: int, num_stages: int, stage: int) -> range:
    """The decoder layers of ``stage``: an even share, the remainder to the last stages."""
    if num_stages > num_layers:
        raise ValueError(f"pipeline_parallel_size ({num_stages}) exceeds num_hidden_layers "
                         f"({num_layers})")
    per, extra = divmod(num_layers, num_stages)
    first_with_extra = num_stages - extra
    start = stage * per + max(0, stage - first_with_extra)
    return range(start, start + per + (1 if stage >= first_with_extra else 0))


def receive_activations(pp: GroupCoordinator, shape: tuple[int, ...], dtype: torch.dtype,
                        device: torch.device) -> torch.Tensor:
    """The previous stage's activations (stage 0 receives the last stage's)."""
    buffer = torch.empty(shape, dtype=dtype, device=device)
    return pp.recv(buffer, src=(pp.rank - 1) % pp.size)


def send_activations(pp: GroupCoordinator, hidden: torch.Tensor) -> None:
    """To the next stage (the last stage sends back to stage 0)."""
    pp.send(hidden.contiguous(), dst=(pp.rank + 1) % pp.size)
