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
- compressed-tensors ``format: "int-quantized"`` (llm-compressor's W8A8 / W8A16
  int8): weights ``num_bits: 8``, ``type: "int"``, ``symmetric: true``, static,
  ``strategy`` ``"channel"`` or ``"tensor"``; ``input_activations`` absent or
  null (weight-only, W8A16) or ``num_bits: 8``, ``type: "int"``, symmetric,
  ``dynamic: true``, ``strategy: "token"`` (W8A8: activations quantized at run
  time, by the platform's kernel). Zero points (asymmetric), group or block
  strategies and static int8 activation scales are refused: the kernels have no
  zero points and quantize activations themselves.

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
        method: ``"gptq"``, ``"awq"`` or ``"compressed-tensors"``.
        bits: weight bits (4; 8 for compressed-tensors).
        group_size: input columns per scale/zero group; -1 means the whole row.
        desc_act: GPTQ act-order (``g_idx`` decides each column's group).
        sym: GPTQ symmetric quantization (informational: zeros are stored either way).
        zero_offset: added to stored zero points (1 for GPTQ's classic v1 format).
        modules_to_not_convert: module name fragments left in float.
        weight_strategy, static_input_scale, weight_type, int8_activations:
            compressed-tensors only (see the fields' comments).
    """

    method: str
    bits: int = 4
    group_size: int = 128
    desc_act: bool = False
    sym: bool = True
    zero_offset: int = 0
    modules_to_not_convert: tuple[str, ...] = field(default_factory=tuple)
    weight_strategy: str = "group"  # compressed-tensors: "channel" or "tensor"
    static_input_scale: bool = False  # compressed-tensors fp8: checkpoint has input_scale
    weight_type: str = "int"  # compressed-tensors: "float" (fp8 e4m3) or "int" (int8)
    int8_activations: bool = False  # compressed-tensors int8: W8A8, dynamic per token

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


# compressed-tensors ``format`` -> the weights' ``type`` and how messages name it.
_CT_FORMATS = {"float-quantized": ("float", "fp8"), "int-quantized": ("int", "int8")}


def _ct_require(label: str, field_path: str, value: Any, allowed: tuple, limit: str) -> None:
    """Refuse ``value`` of config field ``field_path`` unless it is one of ``allowed``."""
    if value not in allowed:
        raise UnsupportedQuantizationError(
            f"compressed-tensors {label} checkpoint: {field_path} {value!r} is not supported "
            f"({limit})")


def _ct_weights(weights: dict, fmt: str) -> str:
    """Check one config group's ``weights`` scheme; returns its strategy."""
    weight_type, label = _CT_FORMATS[fmt]
    holds = f"format {fmt!r} holds 8-bit {weight_type} weights"
    _ct_require(label, "weights.num_bits", weights.get("num_bits"), (8,), holds)
    _ct_require(label, "weights.type", str(weights.get("type")).lower(), (weight_type,), holds)
    strategy = str(weights.get("strategy") or "tensor").lower()
    _ct_require(label, "weights.strategy", strategy, ("channel", "tensor"),
                "static symmetric 'channel' or 'tensor' only")
    _ct_require(label, "weights.symmetric", bool(weights.get("symmetric", True)), (True,),
                "symmetric only: the kernels have no zero points")
    _ct_require(label, "weights.dynamic", bool(weights.get("dynamic", False)), (False,),
                "static weight scales only")
    return strategy


def _ct_int8_inputs(inputs: dict) -> bool:
    """Check an int-quantized group's ``input_activations``; returns whether activations
    are quantized (W8A8) rather than left in float (W8A16)."""
    if not inputs:
        return False
    limit = "only dynamic symmetric per-token int8 activations, or none"
    for field_name, value, allowed in (
            ("num_bits", inputs.get("num_bits"), (8,)),
            ("type", str(inputs.get("type")).lower(), ("int",)),
            ("dynamic", inputs.get("dynamic"), (True,)),  # static scales: refused
            ("strategy", str(inputs.get("strategy")).lower(), ("token",)),
            ("symmetric", bool(inputs.get("symmetric", True)), (True,))):
        _ct_require("int8", f"input_activations.{field_name}", value, allowed, limit)
    return True


def _ct_group(group: dict, fmt: str) -> tuple[str, bool, bool]:
    """One config group's ``(weight strategy, static input scale, int8 activations)``."""
    weight_type, label = _CT_FORMATS[fmt]
    group_fmt = str(group.get("format") or fmt).lower()
    _ct_require(label, "config_groups format", group_fmt, (fmt,),
                f"every group must have the checkpoint's format {fmt!r}")
    strategy = _ct_weights(group.get("weights") or {}, fmt)
    targets = [str(t) for t in group.get("targets") or ["Linear"]]
    if not any(t == "Linear" or t.endswith("Linear") for t in targets):
        raise UnsupportedQuantizationError(
            f"compressed-tensors targets {targets} are not supported (only 'Linear')")
    inputs = group.get("input_activations") or {}
    if weight_type == "int":
        return strategy, False, _ct_int8_inputs(inputs)
    # fp8 activation schemes run as bf16; a static one's input_scale is still loaded
    return strategy, bool(inputs) and not inputs.get("dynamic", False), False


def _parse_compressed_tensors(cfg: dict) -> CheckpointQuantization:
    """compressed-tensors: fp8 (e4m3) or int8 weights, per channel or per tensor."""
    fmt = str(cfg.get("format") or "").lower()
    if fmt not in _CT_FORMATS:
        raise UnsupportedQuantizationError(
            f"compressed-tensors format {fmt!r} is not supported (only 'float-quantized': "
            "fp8 weights, and 'int-quantized': int8 weights)")
    groups = list((cfg.get("config_groups") or {}).values())
    if not groups:
        raise UnsupportedQuantizationError("compressed-tensors config has no config_groups")
    schemes = {_ct_group(group, fmt) for group in groups}
    if len(schemes) > 1:
        raise UnsupportedQuantizationError(
            "compressed-tensors config groups with different schemes are not supported "
            f"({len(schemes)} different ones)")
    strategy, static_input, int8_activations = schemes.pop()
    ignore = tuple(str(x) for x in cfg.get("ignore") or ())
    return CheckpointQuantization("compressed-tensors", 8, -1, False, True, 0,
                                  modules_to_not_convert=ignore,
                                  weight_strategy=strategy,
                                  static_input_scale=static_input,
                                  weight_type=_CT_FORMATS[fmt][0],
                                  int8_activations=int8_activations)
