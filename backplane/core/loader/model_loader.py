"""Building a model from a Hugging Face directory: config -> class -> weights.

The model is constructed on the ``meta`` device (no memory, no random init),
materialised directly on the target device in the target dtype, and then
filled from the checkpoint. Every parameter must come from the checkpoint: a
missing tensor or a shape mismatch fails here, naming it, rather than leaving
garbage weights that would only show up as bad output.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from backplane.config.configs import ModelConfig, parse_dtype
from backplane.core.layers.rotary import RotaryEmbedding
from backplane.core.loader.hf_config import load_hf_config
from backplane.core.loader.weights import (
    iterate_checkpoint,
    iterate_weights,
    resolve_model_dir,
    safetensors_files,
)
from backplane.core.models.registry import resolve_model_class

logger = logging.getLogger(__name__)


class MissingWeightsError(ValueError):
    """The checkpoint lacks tensors the model needs."""

    def __init__(self, model_dir: str, missing: list[str]) -> None:
        shown = ", ".join(missing[:10]) + (f" ... ({len(missing)} in all)" if len(missing) > 10
                                           else "")
        super().__init__(
            f"checkpoint in {model_dir!r} is missing {len(missing)} weight(s) the model "
            f"needs: {shown}"
        )
        self.missing = missing


def checkpoint_dtype(hf_config) -> torch.dtype:
    """The dtype config.json declares (``dtype`` / ``torch_dtype``), float32 if none."""
    value = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    return parse_dtype(value) if value is not None else torch.float32


def init_buffers(model: nn.Module, device: torch.device) -> None:
    """Recompute non-persistent buffers after materialisation.

    Any module may define ``init_buffers(device)``; rotary tables do.
    """
    for module in model.modules():
        hook = getattr(module, "init_buffers", None)
        if callable(hook) and module is not model:
            hook(device)


def check_parallel_support(model_cls) -> None:
    """Refuse a tensor- or pipeline-parallel world for a model that cannot be split."""
    from backplane.core.distributed.parallel_state import get_pp_group, get_tp_group

    for size, supported, what in (
        (get_tp_group().size, model_cls.supports_tensor_parallel, "tensor_parallel_size"),
        (get_pp_group().size, model_cls.supports_pipeline_parallel, "pipeline_parallel_size"),
    ):
        if size > 1 and not supported:
            raise ValueError(
                f"{what} is {size}, but {model_cls.__name__} cannot be split over ranks yet "
                f"(supported: the Llama-family decoders: Llama, Mistral, Qwen2, Qwen3, Granite); "
                f"use {what} 1")


def load_model(model_config: ModelConfig, device: torch.device | str) -> nn.Module:
    """Build and load the model of ``model_config`` on ``device``, in eval mode.

    Uses ``model_config.hf_config`` and ``model_config.torch_dtype`` when the
    engine config already resolved them; otherwise reads config.json and uses
    the checkpoint's dtype.

    Raises:
        FileNotFoundError: config.json or a safetensors file is missing (named).
        ValueError: unknown architecture, missing weights (named) or a shape
            mismatch (name, expected and checkpoint shapes).
    """
    device = torch.device(device)
    start = time.perf_counter()
    hf_config = model_config.hf_config
    if hf_config is None:
        hf_config = load_hf_config(model_config.model, model_config.trust_remote_code)
    dtype = model_config.torch_dtype or checkpoint_dtype(hf_config)
    model_cls = resolve_model_class(hf_config)
    model_dir = resolve_model_dir(model_config.model)
    # Find the files before building anything, so a broken directory fails fast.
    files = safetensors_files(model_dir)

    check_parallel_support(model_cls)
    with torch.device("meta"):
        model = model_cls(hf_config, dtype)
    # --- quantized checkpoints (GPTQ/AWQ): linear layers take the packed tensors ---
    from backplane.core.quantization import quantize_checkpoint_layers

    quantize_checkpoint_layers(model, hf_config)
    # --- end quantized checkpoints ---
    model.to_empty(device=device)
    init_buffers(model, device)
    if model_config.max_model_len:
        for module in model.modules():
            if isinstance(module, RotaryEmbedding):
                module.ensure_positions(model_config.max_model_len)
    # Models that can be split read lazily, each rank only its slices; the others may
    # rework whole tensors in their own load_weights (transposes, stacked experts).
    splittable = model_cls.supports_tensor_parallel or model_cls.supports_pipeline_parallel
    loaded = model.load_weights(iterate_checkpoint(files) if splittable
                                else iterate_weights(files))
    missing = sorted(model.expected_weight_names() - loaded)
    if missing:
        raise MissingWeightsError(model_dir, missing)
    model.requires_grad_(False)
    model.eval()
    logger.info(
        "loaded %s (%s, %d tensors from %d file(s)) on %s in %.2fs",
        type(model).__name__, str(dtype).removeprefix("torch."), len(loaded), len(files),
        device, time.perf_counter() - start,
    )
    return model
