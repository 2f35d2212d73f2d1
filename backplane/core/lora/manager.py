"""Adapter slots on the device: which adapter sits where, and who is using it.

Slots are fixed buffers in every `LoRALinear` (``max_loras`` of them). A
request's adapter is written into a slot when the request enters the batch,
unless it is already resident; a slot is reused only when no running request
uses it (least recently used first). The scheduler admits at most
``max_loras`` distinct adapters among running requests, so a free slot always
exists when one is needed.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import numpy as np
import torch
from torch import nn

from backplane.core.lora.layers import LoRALinear, LoRAStepState

logger = logging.getLogger(__name__)


class LoRAManager:
    """Wraps a model's target linears and manages their adapter slots."""

    def __init__(self, model: nn.Module, targets: dict, max_loras: int, max_rank: int,
                 add_lora, dtype: torch.dtype, device: torch.device) -> None:
        """``targets``: `backplane.lora.lora_targets` of the model, taken before the
        platform prepared it (the prepared modules keep their names)."""
        self.max_loras = max_loras
        self.max_rank = max_rank
        self.device = device
        self.state = LoRAStepState(add_lora)
        self.targets = targets
        self.layers: dict[str, LoRALinear] = {}
        for name, target in targets.items():
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            layer = LoRALinear(getattr(parent, child), target.in_features,
                               tuple(target.parts.values()), max_loras, max_rank, self.state,
                               dtype, device)
            setattr(parent, child, layer)
            self.layers[name] = layer
        self._slot_of: dict[str, int] = {}
        self._users = [0] * max_loras
        self._keys: list[str | None] = [None] * max_loras
        self._recent: OrderedDict[int, None] = OrderedDict((s, None) for s in range(max_loras))
        logger.info("LoRA: %d layers wrapped, %d slots of rank %d", len(self.layers), max_loras,
                    max_rank)

    @property
    def resident(self) -> dict[str, int]:
        """{adapter key: slot} of the adapters on the device now."""
        return dict(self._slot_of)

    def acquire(self, key: str, weights) -> int:
        """The slot of adapter ``key`` for one more running request (written if needed)."""
        slot = self._slot_of.get(key)
        if slot is None:
            slot = next((s for s in self._recent if self._users[s] == 0), None)
            if slot is None:
                raise RuntimeError(f"no free LoRA slot for adapter {key!r}: all {self.max_loras} "
                                   "are in use (the scheduler should have held it back)")
            old = self._keys[slot]
            if old is not None:
                del self._slot_of[old]
            self._write(slot, weights)
            self._keys[slot] = key
            self._slot_of[key] = slot
        self._users[slot] += 1
        self._recent.move_to_end(slot)
        return slot

    def release(self, slot: int) -> None:
        """One running request of ``slot``'s adapter left the batch (it stays resident)."""
        self._users[slot] = max(0, self._users[slot] - 1)

    def drop(self, key: str) -> bool:
        """Forget adapter ``key`` (unloaded): its slot becomes free once unused."""
        slot = self._slot_of.get(key)
        if slot is None or self._users[slot]:
            return False
        del self._slot_of[key]
        self._keys[slot] = None
        return True

    @torch.no_grad()
    def _write(self, slot: int, weights) -> None:
        """Copy an adapter into ``slot``: each part's rank rows padded to max_rank,
        scaling folded into B; layers the adapter leaves alone get zeros."""
        rank, r_max = weights.rank, self.max_rank
        for name, layer in self.layers.items():
            a_slot, b_slot = layer.lora_a[slot], layer.lora_b[slot]
            a_slot.zero_()
            b_slot.zero_()
            pair = weights.modules.get(name)
            if pair is None:
                continue
            a, b = pair
            for part in range(len(layer.output_slices)):
                rows = slice(part * rank, (part + 1) * rank)
                dest = slice(part * r_max, part * r_max + rank)
                a_slot[dest].copy_(a[rows])
                b_slot[:, dest].copy_(b[:, rows] * weights.scaling)

    def begin_step(self, token_slots: np.ndarray | None) -> None:
        """Set the step's token-to-slot mapping (None, or all -1: base model only)."""
        if token_slots is None or not (token_slots >= 0).any():
            self.state.mapping = None
            return
        from backplane.plugins_sdk.lora import LoRAMapping

        self.state.mapping = LoRAMapping.build(torch.from_numpy(token_slots.astype(np.int32)),
                                               device=self.device)

    def end_step(self) -> None:
        self.state.mapping = None
