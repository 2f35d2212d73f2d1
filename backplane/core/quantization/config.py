"""A checkpoint's ``quantization_config`` (config.json), read and checked.

Supported, as published by AutoGPTQ / GPTQModel / optimum and AutoAWQ:

- ``quant_method: "gptq"``, ``bits: 4``, ``group_size`` (-1: one group per output
  row), ``desc_act`` (act-order: groups follow ``g_idx``), ``sym``, and
  ``checkpoint_format`` ``"gptq"`` (the classic v1 layout, which stores each zero
  point minus one; the default) or ``"gptq_v2"`` (GPTQModel's, zero points as is).
- ``quant_method: "awq"``, ``bits`` (or ``w_bit``) 4, ``group_size`` (or
  ``q_group_size``), ``zero_point: true``, ``version: "gemm"``;
  ``modules_to_not_convert`` lists module names left unquantized.
- ``quant_method: "compressed-tensors"`` (llm-compressor), ``format:
  "float-quantized"``: fp8 (e4m3) weights, ``strategy`` ``"channel"`` or
  ``"tensor"``, symmetric, static. Input activation schemes (dynamic or static
  fp8) are accepted and run as bf16 activations (weight-only); ``ignore`` lists
  modules left in float (``re:`` entries are regular expressions).

Anything else raises `UnsupportedQuantizationError` naming the method and field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Checkpoint methods whose packed weights the core can load.
CHECKPOINT_METHODS = ("gptq", "awq", "compressed-tensors")


class UnsupportedQuantizationError(ValueError):
    """The checkpoint's quantization_config asks for something Backplane does not load."""


@dataclass(frozen=True)
class CheckpointQuantization:
    """What the loader needs to know about a quantized checkpoint.

    Attributes:
        method: ``"gptq"`` or ``"awq"``.
        bits: weight bits (4).
        group_size: input columns per scale/zero group; -1 means the whole row.
        desc_act: GPTQ act-order (``g_idx`` decides each column's group).
        sym: GPTQ symmetric quantization (informational: zeros are stored either way).
        zero_offset: added to stored zero points (1 for GPTQ's classic v1 format).
        modules_to_not_convert: module name fragments left in float.
    """

    method: str
    bits: int = 4
    group_size: int = 128
    desc_act: bool = False
    sym: bool = True
    zero_offset: int = 0
    modules_to_not_convert: tuple[str, ...] = field(default_factory=tuple)
    weight_strategy: str = "group"  # compressed-tensors fp8: "channel" or "tensor"
    static_input_scale: bool = False  # compressed-tensors: checkpoint has input_scale

    def group_for(self, in_features: int) -> int:
        """The group size of a layer with ``in_features`` inputs."""
        return in_features if self.group_size in (-1, 0, None) else self.group_size

    def skips(self, module_name: str) -> bool:
        """Whether ``module_name`` stays unquantized in this checkpoint."""
        import re

        for entry in self.modules_to_not_convert:
            if not entry:
                continue
            if entry.startswith("re:"):
                if re.match(entry[3:], module_name):
                    return True
            elif entry in module_name:
                return True
        return False


def quant_method(raw: Any) -> str | None:
    """The ``quant_method`` of a quantization_config (dict or object), lower-cased."""
    if raw is None:
        return None
    value = raw.get("quant_method") if isinstance(raw, dict) else getattr(raw, "quant_method",
                                                                           None)
    return str(value).lower() if value is not None else None


def _as_dict(raw: Any) -> dict:
    if isinstance(raw, dict):
        return raw
    to_dict = getattr(raw, "to_dict", None)
    return to_dict() if callable(to_dict) else dict(vars(raw))


def parse_quantization_config(raw: Any) -> CheckpointQuantization:
    """Read a checkpoint's ``quantization_config``; raises UnsupportedQuantizationError."""
    cfg = _as_dict(raw)
    method = quant_method(cfg)
    if method == "compressed-tensors":
        return _parse_compressed_tensors(cfg)
    if method not in CHECKPOINT_METHODS:
        raise UnsupportedQuantizationError(
            f"quantization_config.quant_method {method!r} is not supported (Backplane loads "
            f"{list(CHECKPOINT_METHODS)} 4-bit checkpoints)")
    bits = cfg.get("bits", cfg.get("w_bit", 4))
    if bits != 4:
        raise UnsupportedQuantizationError(
            f"{method} checkpoints with bits={bits} are not supported (only 4-bit)")
    group = cfg.get("group_size", cfg.get("q_group_size", 128))
    if group is None:
        group = -1
    if not isinstance(group, int) or (group < 1 and group != -1):
        raise UnsupportedQuantizationError(f"{method} group_size {group!r} is not supported")
    skip = tuple(cfg.get("modules_to_not_convert") or ())
    if method == "gptq":
        fmt = str(cfg.get("checkpoint_format") or "gptq").lower()
        if fmt not in ("gptq", "gptq_v2"):
            raise UnsupportedQuantizationError(
                f"gptq checkpoint_format {fmt!r} is not supported (only 'gptq' and 'gptq_v2')")
        if cfg.get("dynamic"):
            raise UnsupportedQuantizationError(
                "gptq checkpoints with per-module overrides ('dynamic') are not supported")
        if cfg.get("lm_head"):
            raise UnsupportedQuantizationError(
                "gptq checkpoints with a quantized lm_head are not supported")
        return CheckpointQuantization(
            method, 4, group, bool(cfg.get("desc_act", False)), bool(cfg.get("sym", True)),
            zero_offset=1 if fmt == "gptq" else 0, modules_to_not_convert=skip)
    version = str(cfg.get("version", "gemm")).lower()
    if version != "gemm":
        raise UnsupportedQuantizationError(
            f"awq version {version!r} is not supported (only 'gemm', the packed layout "
            "AutoAWQ writes by default)")
    if not cfg.get("zero_point", True):
        raise UnsupportedQuantizationError("awq checkpoints without zero points "
                                           "(zero_point: false) are not supported")
    return CheckpointQuantization(method, 4, group, False, False, 0, modules_to_not_convert=skip)


def _parse_compressed_tensors(cfg: dict) -> CheckpointQuantization:
    """compressed-tensors: only fp8 (e4m3) weights, per channel or per tensor."""
    fmt = str(cfg.get("format") or "").lower()
    if fmt != "float-quantized":
        raise UnsupportedQuantizationError(
            f"compressed-tensors format {fmt!r} is not supported (only 'float-quantized': "
            "fp8 weights)")
    groups = list((cfg.get("config_groups") or {}).values())
    if not groups:
        raise UnsupportedQuantizationError("compressed-tensors config has no config_groups")
    strategies, static_inputs = set(), set()
    for group in groups:
        weights = group.get("weights") or {}
        if (weights.get("num_bits"), str(weights.get("type")).lower()) != (8, "float"):
            raise UnsupportedQuantizationError(
                f"compressed-tensors weights {weights.get('type')!r} with "
                f"num_bits={weights.get('num_bits')} are not supported (only 8-bit float)")
        strategy = str(weights.get("strategy") or "tensor").lower()
        if strategy not in ("channel", "tensor") or weights.get("dynamic") or not weights.get(
                "symmetric", True):
            raise UnsupportedQuantizationError(
                f"compressed-tensors fp8 weights with strategy {strategy!r} (dynamic="
                f"{weights.get('dynamic')}, symmetric={weights.get('symmetric')}) are not "
                "supported (static symmetric 'channel' or 'tensor' only)")
        targets = [str(t) for t in group.get("targets") or ["Linear"]]
        if not any(t == "Linear" or t.endswith("Linear") for t in targets):
            raise UnsupportedQuantizationError(
                f"compressed-tensors targets {targets} are not supported (only 'Linear')")
        strategies.add(strategy)
        inputs = group.get("input_activations") or {}
        static_inputs.add(bool(inputs) and not inputs.get("dynamic", False))
    if len(strategies) > 1 or len(static_inputs) > 1:
        raise UnsupportedQuantizationError(
            "compressed-tensors config groups with different schemes are not supported")
    ignore = tuple(str(x) for x in cfg.get("ignore") or ())
    return CheckpointQuantization("compressed-tensors", 8, -1, False, True, 0,
                                  modules_to_not_convert=ignore,
                                  weight_strategy=strategies.pop(),
                                  static_input_scale=static_inputs.pop())
