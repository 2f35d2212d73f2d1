"""Per-layer K/V scales of an fp8 KV cache: 1.0, the checkpoint's, or measured at start-up.

The contract (`backplane.plugins_sdk.attention.quantize_kv_fp8`): a backend
stores ``x / scale`` saturated to the fp8 format's max and attends as if the
cache held ``stored * scale``. The runner owns one float32 ``[k_scale,
v_scale]`` tensor per layer on the device (views of one ``[layers, 2]``
tensor) and the Attention layer hands each layer's to the backend.

Where the values come from, later sources winning:

1. 1.0 for every layer (fp8's range then covers |k|, |v| <= 448 for e4m3,
   57344 for e5m2, which holds for the models tested: see docs/configuration.md).
2. The checkpoint: scalar tensors named like vLLM and compressed-tensors write
   them (``model.layers.N.self_attn.k_scale`` / ``v_scale``, also under
   ``...self_attn.attn.``), AutoFP8's ``model.layers.N.self_attn.k_proj.output_scale``
   / ``v_proj.output_scale``, or one legacy ``kv_scale`` for both. A per-head
   scale vector is reduced to its max (coarser, never saturating).
3. ``--calculate-kv-scales``: the first step that runs the model eagerly (the
   first prefill; recorded graphs never calibrate) sets each layer's scales to
   ``max|k| / fp8_max`` and ``max|v| / fp8_max`` over that step's tokens,
   before its keys and values are written, and later steps keep them (vLLM
   does the same on its first forward). Values later beyond that step's max
   saturate to the format's max.
"""

from __future__ import annotations

import logging
import re

import torch

logger = logging.getLogger(__name__)

# (layer number, which scale) from a checkpoint tensor name; see the module docstring.
_SCALE_NAME = re.compile(
    r"(?:^|\.)layers\.(\d+)\.(?:.*\.)?(?:(k_scale|v_scale|kv_scale)|(k|v)_proj\.output_scale)$")


class KVScales:
    """One ``[k_scale, v_scale]`` float32 tensor per layer, on ``device``."""

    def __init__(self, num_layers: int, fp8_dtype: torch.dtype, device: torch.device) -> None:
        self.fp8_dtype = fp8_dtype
        self.fp8_max = float(torch.finfo(fp8_dtype).max)
        self.values = torch.ones(num_layers, 2, dtype=torch.float32, device=device)
        # Views, so a backend given layer i's tensor sees every later update in place.
        self.layers = list(self.values.unbind(0))
        self.source = "1.0 (default)"

    def load_checkpoint(self, files: list[str]) -> int:
        """Take the scales the safetensors ``files`` hold; returns how many layers had any."""
        from safetensors import safe_open

        found: dict[int, dict[int, float]] = {}
        for path in files:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                    match = _SCALE_NAME.search(name)
                    if match is None:
                        continue
                    layer = int(match.group(1))
                    which = match.group(2) or f"{match.group(3)}_scale"
                    value = float(f.get_tensor(name).float().abs().max())
                    slots = (0, 1) if which == "kv_scale" else ((0,) if which == "k_scale" else (1,))
                    for slot in slots:
                        found.setdefault(layer, {})[slot] = value
        bad = {layer for layer in found if not 0 <= layer < len(self.layers)}
        if bad:
            raise ValueError(
                f"checkpoint KV scales name layer(s) {sorted(bad)}, but the model has "
                f"{len(self.layers)} layers (0..{len(self.layers) - 1})")
        for layer, slots in found.items():
            for slot, value in slots.items():
                if not value > 0 or value == float("inf"):
                    raise ValueError(
                        f"checkpoint {'kv'[slot]}_scale of layer {layer} is {value}; a KV "
                        "scale must be a finite number > 0")
                self.values[layer, slot] = value
        if found:
            self.source = f"checkpoint ({len(found)} of {len(self.layers)} layers)"
        return len(found)

    @torch.no_grad()
    def observe(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """Set layer ``layer_idx``'s scales to max|key| / fp8_max and max|value| / fp8_max.

        Stays on the device (no host sync); an all-zero tensor keeps a scale of 1.0
        rather than dividing by zero later.
        """
        amax = torch.stack([key.abs().amax(), value.abs().amax()]).float()
        self.layers[layer_idx].copy_(torch.where(amax > 0, amax / self.fp8_max, 1.0))
        self.source = "the first step's keys and values (calculate_kv_scales)"

    def describe(self) -> str:
        """One log line: the source and the range of the scales."""
        k, v = self.values[:, 0], self.values[:, 1]
        return (f"fp8 KV scales from {self.source}: k {k.min().item():.4g}..{k.max().item():.4g}, "
                f"v {v.min().item():.4g}..{v.max().item():.4g}")
