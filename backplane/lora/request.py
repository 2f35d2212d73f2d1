"""`LoRARequest`: which LoRA adapter a request runs with (vLLM-compatible)."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True, eq=False)
class LoRARequest:
    """A LoRA adapter a request asks for, as vLLM spells it.

    Built as ``LoRARequest(lora_name, lora_int_id, lora_path)`` (positionally or
    by keyword), like vLLM's class. As in vLLM, two requests are equal (and
    hash alike) when their ``lora_name`` is the same.

    Attributes:
        lora_name: the adapter's name (what the server reports and matches on).
        lora_int_id: a unique integer id, >= 1 (0 means "no adapter" inside the engine).
        lora_path: local directory of the PEFT adapter.
        base_model_name: the base model the adapter was trained for, if known.
    """

    lora_name: str
    lora_int_id: int
    lora_path: str
    base_model_name: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise ValueError(f"LoRARequest.lora_name must be a non-empty string, got {self.lora_name!r}")
        if isinstance(self.lora_int_id, bool) or not isinstance(self.lora_int_id, int):
            raise ValueError(
                f"LoRARequest.lora_int_id must be an integer >= 1, got {self.lora_int_id!r} "
                f"({type(self.lora_int_id).__name__})"
            )
        if self.lora_int_id < 1:
            raise ValueError(f"LoRARequest.lora_int_id must be >= 1, got {self.lora_int_id}")
        if isinstance(self.lora_path, os.PathLike):
            object.__setattr__(self, "lora_path", os.fspath(self.lora_path))
        if not isinstance(self.lora_path, str):
            raise ValueError(f"LoRARequest.lora_path must be a string path, got {self.lora_path!r}")
        if self.base_model_name is not None and not isinstance(self.base_model_name, str):
            raise ValueError(
                f"LoRARequest.base_model_name must be a string or None, got {self.base_model_name!r}"
            )

    @property
    def adapter_id(self) -> int:
        return self.lora_int_id

    @property
    def name(self) -> str:
        return self.lora_name

    @property
    def path(self) -> str:
        return self.lora_path

    @property
    def local_path(self) -> str:
        """vLLM's older name for `path`."""
        return self.lora_path

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LoRARequest):
            return NotImplemented
        return self.lora_name == other.lora_name

    def __hash__(self) -> int:
        return hash(self.lora_name)
