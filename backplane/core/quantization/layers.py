"""Linear layers that load a GPTQ, AWQ or compressed-tensors checkpoint's tensors.

`quantize_checkpoint_layers` runs right after the model is built on the meta
device: every ``nn.Linear`` (fused ones included) becomes an `Int4CheckpointLinear`
whose parameters have the checkpoint's packed shapes, so that ``to_empty``
allocates them, ``expected_weight_names`` lists ``...q_proj.qweight`` and so on,
and the loader fills them through ``load_checkpoint_tensor`` (fused parts go
into their columns). The output head and embeddings stay in float (GPTQ/AWQ
checkpoints keep them so).

When the platform prepares the model (``Platform.prepare_quantized_layers``),
each layer unpacks itself into the SDK's platform-neutral `Int4Weights` and asks
``Platform.make_quantized_linear`` for a kernel module; the packed parameters
are then released. Until then (or when the platform has no kernel) the layer
dequantizes on every call: correct, slow.

compressed-tensors checkpoints (fp8 or int8 weights with one scale per output
row) load into `Fp8CheckpointLinear` / `Int8CheckpointLinear` the same way and
reach the platform as `Fp8Weights` / `Int8Weights`, the checkpoint's 8-bit
values as they are.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from backplane.core.quantization.config import (
    CheckpointQuantization,
    UnsupportedQuantizationError,
    parse_quantization_config,
)
from backplane.core.quantization.packing import awq_unpack, gptq_unpack
from backplane.plugins_sdk.quantization import (
    Fp8Weights,
    Int4Weights,
    linear_fp8_reference,
    linear_int4_reference,
)

logger = logging.getLogger(__name__)


def part_offsets(sizes: dict[str | None, int]) -> dict[str | None, tuple[int, int]]:
    """(first output row, rows) of each fused part, the parts side by side in order."""
    offsets, start = {}, 0
    for part, size in sizes.items():
        offsets[part] = (start, size)
        start += size
    return offsets


class _ReferenceLinear(nn.Module):
    """Dequantize-and-matmul (``reference(x, weights)``), for platforms without a kernel
    for the format."""

    def __init__(self, weights, reference) -> None:
        super().__init__()
        self.weights, self.reference = weights, reference

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reference(x, self.weights)


@dataclass
class Int8Weights(Fp8Weights):
    """One int8 linear layer of a compressed-tensors ``int-quantized`` checkpoint (method
    ``"compressed-tensors"``, told from fp8 by ``weight.dtype``):
    ``W[n, k] = weight[n, k] * scales[n]``.

    Attributes (besides `Fp8Weights`'): ``weight`` ``[N, K]`` int8 (-128..127),
    ``activations``: ``"int8"`` when the checkpoint declares dynamic per-token int8
    activations (W8A8: the kernel quantizes them at run time), ``"bf16"`` when it is
    weight-only (W8A16). A subclass so that the dequantizing reference is fp8's.
    """

    activations: str = "bf16"


class _ScaledCheckpointLinear(nn.Module):
    """A (possibly fused) linear layer with a compressed-tensors checkpoint's 8-bit
    weights and one float scale per output row: fp8 and int8 share the parameters and
    the loading, and differ in the weight dtype and the weights handed to the platform.

    Parameters: ``weight [N, K]`` (``weight_dtype``), ``weight_scale [N]`` float32 (a
    per-tensor scale of a fused part is repeated over its rows), ``input_scale
    [parts]`` where the checkpoint has static activation scales (fp8 only; read,
    unused: activations stay in the model dtype), ``bias [N]``.
    """

    layer_kind = "quantized_linear"
    weight_dtype: torch.dtype
    description: str

    def __init__(self, spec: CheckpointQuantization, in_features: int, out_features: int,
                 output_sizes: dict[str, int] | None = None, bias: bool = False,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                 name: str = "") -> None:
        super().__init__()
        self.method = spec.method
        self.in_features, self.out_features = in_features, out_features
        sizes = dict(output_sizes) if output_sizes else {None: out_features}
        if output_sizes:
            self.output_sizes = dict(output_sizes)
        self._parts = list(sizes)
        self._offsets = part_offsets(sizes)
        kw = {"device": device}
        self.weight = nn.Parameter(torch.empty(out_features, in_features,
                                               dtype=self.weight_dtype, **kw),
                                   requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(out_features, dtype=torch.float32, **kw),
                                         requires_grad=False)
        if spec.static_input_scale:
            self.input_scale = nn.Parameter(torch.empty(len(sizes), dtype=torch.float32, **kw),
                                            requires_grad=False)
        self.bias = (nn.Parameter(torch.empty(out_features, dtype=dtype or torch.float32, **kw),
                                  requires_grad=False) if bias else None)
        self.kernels: nn.ModuleList | None = None

    def load_checkpoint_tensor(self, attr: str, part: str | None, source) -> None:
        from backplane.core.models.base import WeightShapeError

        start, size = self._offsets[part] if part in self._offsets else (0, self.out_features)
        param = getattr(self, attr).data
        if attr == "input_scale":
            target = param[self._parts.index(part) if part in self._parts else 0]
            values = source.read().reshape(-1)
            if values.numel() != 1:
                raise WeightShapeError(source.name, (1,), tuple(source.shape))
            target.copy_(values[0])
            return
        target = param.narrow(0, start, size)
        if attr == "weight_scale":
            values = source.read().float().reshape(-1)
            if values.numel() not in (1, size):
                raise WeightShapeError(source.name, (size, 1), tuple(source.shape),
                                       note=f" ({self.description} weight_scale: per channel "
                                            "or per tensor)")
            target.copy_(values.expand(size) if values.numel() == 1 else values)
            return
        if tuple(target.shape) != tuple(source.shape):
            raise WeightShapeError(source.name, tuple(target.shape), tuple(source.shape),
                                   note=f" (compressed-tensors {self.description})")
        values = source.read()
        if attr == "weight" and values.dtype != self.weight_dtype:
            # a cast would not keep the checkpoint's values (a float weight is no int8 one)
            raise ValueError(f"checkpoint tensor {source.name!r} is {values.dtype}, but a "
                             f"compressed-tensors {self.description} weight must be "
                             f"{self.weight_dtype}")
        target.copy_(values)

    def _weights(self, weight: torch.Tensor, scales: torch.Tensor,
                 bias: torch.Tensor | None) -> Fp8Weights:
        """The platform-neutral form handed to ``make_quantized_linear``."""
        raise NotImplementedError

    def scaled_weights(self) -> Fp8Weights:
        return self._weights(self.weight.data, self.weight_scale.data,
                             None if self.bias is None else self.bias.data.float())

    def use_platform_kernels(self, factory) -> bool:
        weights = self.scaled_weights()
        module = factory(self.method, weights) if factory is not None else None
        native = module is not None
        if module is None:  # own copies: the parameters are released below
            module = _ReferenceLinear(self._weights(weights.weight.clone(),
                                                    weights.scales.clone(), weights.bias),
                                      linear_fp8_reference)
        for attr in ("weight", "weight_scale", "input_scale", "bias"):
            if attr in self._parameters:
                del self._parameters[attr]
        self.kernels = nn.ModuleList([module])
        return native

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels is None:
            return linear_fp8_reference(x, self.scaled_weights())
        return self.kernels[0](x)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"{self.description} (compressed-tensors)")


class Fp8CheckpointLinear(_ScaledCheckpointLinear):
    """A compressed-tensors ``float-quantized`` layer: fp8 (e4m3) weights."""

    weight_dtype = torch.float8_e4m3fn
    description = "fp8 e4m3"

    def _weights(self, weight, scales, bias) -> Fp8Weights:
        return Fp8Weights(weight, scales, bias, self.method)


class Int8CheckpointLinear(_ScaledCheckpointLinear):
    """A compressed-tensors ``int-quantized`` layer: symmetric int8 weights, W8A8 with
    dynamic per-token activations or W8A16 (weight-only), as the checkpoint says."""

    weight_dtype = torch.int8
    description = "int8"

    def __init__(self, spec: CheckpointQuantization, *args, **kwargs) -> None:
        super().__init__(spec, *args, **kwargs)
        self.activations = "int8" if spec.int8_activations else "bf16"

    def _weights(self, weight, scales, bias) -> Int8Weights:
        return Int8Weights(weight, scales, bias, self.method, activations=self.activations)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", W8A8" if self.activations == "int8" else ", W8A16")


class Int4CheckpointLinear(nn.Module):
    """A (possibly fused) linear layer with GPTQ or AWQ 4-bit weights.

    Parameters, in the checkpoint's layout (see packing.py), fused parts side by
    side along the output dimension:

    - GPTQ: ``qweight [K/8, N]``, ``qzeros [G, N/8]``, ``scales [G, N]``,
      ``g_idx [parts, K]`` (one row per fused part: act-order permutations may differ).
    - AWQ: ``qweight [K, N/8]``, ``qzeros [G, N/8]``, ``scales [G, N]``.
    - ``bias [N]`` where the layer has one.
    """

    layer_kind = "quantized_linear"

    def __init__(self, spec: CheckpointQuantization, in_features: int, out_features: int,
                 output_sizes: dict[str, int] | None = None, bias: bool = False,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                 name: str = "") -> None:
        super().__init__()
        self.method = spec.method
        self.spec = spec
        self.in_features, self.out_features = in_features, out_features
        self.group_size = spec.group_for(in_features)
        what = f"layer {name or '?'} ({in_features} -> {out_features})"
        if in_features % self.group_size:
            raise UnsupportedQuantizationError(
                f"{spec.method}: {what}: in_features is not a multiple of group_size "
                f"{self.group_size}")
        sizes = dict(output_sizes) if output_sizes else {None: out_features}
        for part, size in sizes.items():
            if size % 8:
                raise UnsupportedQuantizationError(
                    f"{spec.method}: {what}: output part {part!r} has {size} rows, not a "
                    "multiple of 8 (its zero points could not be packed)")
        if spec.method == "gptq" and in_features % 8:
            raise UnsupportedQuantizationError(
                f"gptq: {what}: in_features is not a multiple of 8")
        if output_sizes:
            self.output_sizes = dict(output_sizes)  # marks the layer fused for the loader
        self._parts = list(sizes)
        self._offsets = part_offsets(sizes)
        groups = in_features // self.group_size
        kw = {"device": device}
        i32 = torch.int32
        if spec.method == "gptq":
            self.qweight = nn.Parameter(torch.empty(in_features // 8, out_features, dtype=i32,
                                                    **kw), requires_grad=False)
            self.g_idx = nn.Parameter(torch.empty(len(sizes), in_features, dtype=i32, **kw),
                                      requires_grad=False)
        else:
            self.qweight = nn.Parameter(torch.empty(in_features, out_features // 8, dtype=i32,
                                                    **kw), requires_grad=False)
        self.qzeros = nn.Parameter(torch.empty(groups, out_features // 8, dtype=i32, **kw),
                                   requires_grad=False)
        self.scales = nn.Parameter(torch.empty(groups, out_features, dtype=torch.float32, **kw),
                                   requires_grad=False)
        self.bias = (nn.Parameter(torch.empty(out_features, dtype=dtype or torch.float32, **kw),
                                  requires_grad=False) if bias else None)
        self.kernels: nn.ModuleList | None = None

    # --- loading ------------------------------------------------------------------------

    def _target(self, attr: str, part: str | None) -> torch.Tensor:
        """The view of ``attr`` that checkpoint tensor ``(attr, part)`` fills."""
        param = getattr(self, attr).data
        if part is None:
            return param[0] if attr == "g_idx" else param
        if part not in self._offsets:
            raise KeyError(f"unknown fused part {part!r} (has {self._parts})")
        start, size = self._offsets[part]
        if attr == "g_idx":
            return param[self._parts.index(part)]
        if attr == "bias":
            return param.narrow(0, start, size)
        packed_columns = attr == "qzeros" or (attr == "qweight" and self.method == "awq")
        if packed_columns:
            return param.narrow(1, start // 8, size // 8)
        return param.narrow(1, start, size)

    def load_checkpoint_tensor(self, attr: str, part: str | None, source) -> None:
        """Copy checkpoint tensor ``source`` (a CheckpointTensor) into its place."""
        from backplane.core.models.base import WeightShapeError

        if attr == "bias" and self.bias is None:
            # AutoGPTQ's exporter saves a (zero) bias for every layer, biased or not.
            if torch.count_nonzero(source.read()):
                raise ValueError(f"checkpoint tensor {source.name!r} is a non-zero bias for a "
                                 "layer that has none in this architecture")
            return
        target = self._target(attr, part)
        if tuple(target.shape) != tuple(source.shape):
            raise WeightShapeError(source.name, tuple(target.shape), tuple(source.shape),
                                   note=f" ({self.method} 4-bit, group_size {self.group_size})")
        target.copy_(source.read())

    # --- unpacking ----------------------------------------------------------------------

    def int4_weights(self) -> list[Int4Weights]:
        """The layer as runs of `Int4Weights` along the output (one unless fused parts
        have different act-order permutations)."""
        if self.method == "gptq":
            q, zeros, scales = gptq_unpack(self.qweight.data, self.qzeros.data,
                                           self.scales.data, self.spec.zero_offset)
        else:
            q, zeros, scales = awq_unpack(self.qweight.data, self.qzeros.data, self.scales.data)
        bias = None if self.bias is None else self.bias.data.float()
        runs: list[tuple[int, int, torch.Tensor | None]] = []  # (start, end, g_idx)
        for index, part in enumerate(self._parts):
            start, size = self._offsets[part]
            g_idx = self.g_idx.data[index] if self.method == "gptq" else None
            if runs and (g_idx is None or torch.equal(runs[-1][2], g_idx)):
                runs[-1] = (runs[-1][0], start + size, runs[-1][2])
            else:
                runs.append((start, start + size, g_idx))
        out = []
        for start, end, g_idx in runs:
            perm = self._permutation(g_idx)
            rows = slice(start, end)
            w = q[rows] if perm is None else q[rows][:, perm]
            out.append(Int4Weights(
                qweight=w.contiguous(), scales=scales[rows].contiguous(),
                zeros=zeros[rows].contiguous(), group_size=self.group_size, perm=perm,
                bias=None if bias is None else bias[rows].contiguous(), method=self.method))
        return out

    def _permutation(self, g_idx: torch.Tensor | None) -> torch.Tensor | None:
        """None when ``g_idx`` is the contiguous grouping, else the column order that makes
        groups contiguous (act-order)."""
        if g_idx is None:
            return None
        g_idx = g_idx.long()
        contiguous = torch.arange(self.in_features, device=g_idx.device) // self.group_size
        if torch.equal(g_idx, contiguous):
            return None
        perm = torch.argsort(g_idx, stable=True)
        if not torch.equal(g_idx[perm], contiguous):
            raise UnsupportedQuantizationError(
                f"gptq g_idx does not put exactly group_size ({self.group_size}) input "
                "columns in each group; such checkpoints are not supported")
        return perm

    def use_platform_kernels(self, factory) -> bool:
        """Replace the packed parameters by ``factory(method, Int4Weights)`` modules (the
        reference implementation where it returns None); returns whether every run got
        a platform kernel."""
        modules, native = [], True
        for weights in self.int4_weights():
            module = factory(self.method, weights) if factory is not None else None
            if module is None:
                native = False
                module = _ReferenceLinear(weights, linear_int4_reference)
            modules.append(module)
        for attr in ("qweight", "qzeros", "scales", "g_idx", "bias"):
            if attr in self._parameters:
                del self._parameters[attr]
        self.kernels = nn.ModuleList(modules)
        return native

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels is None:  # not prepared by a platform yet
            outs = [linear_int4_reference(x, w) for w in self.int4_weights()]
        else:
            outs = [kernel(x) for kernel in self.kernels]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"{self.method} 4-bit, group_size={self.group_size}"
                + (f", parts={self._parts}" if len(self._parts) > 1 else ""))


def checkpoint_quantization(hf_config) -> CheckpointQuantization | None:
    """The parsed ``quantization_config`` of ``hf_config`` (None when it has none);
    raises UnsupportedQuantizationError for methods Backplane does not load."""
    raw = getattr(hf_config, "quantization_config", None)
    return parse_quantization_config(raw) if raw else None


def _layer_class(spec: CheckpointQuantization) -> type[nn.Module]:
    if spec.method != "compressed-tensors":
        return Int4CheckpointLinear
    return Int8CheckpointLinear if spec.weight_type == "int" else Fp8CheckpointLinear


def quantize_checkpoint_layers(model: nn.Module, hf_config) -> int:
    """Swap the linear layers of a model built on the meta device for
    `Int4CheckpointLinear` when ``hf_config`` has a GPTQ/AWQ ``quantization_config``
    (`Fp8CheckpointLinear` / `Int8CheckpointLinear` for compressed-tensors fp8 / int8);
    returns how many (0 for an unquantized checkpoint)."""
    spec = checkpoint_quantization(hf_config)
    if spec is None:
        return 0
    for name, module in model.named_modules():
        if getattr(module, "layer_kind", None) == "fused_moe":
            raise UnsupportedQuantizationError(
                f"{spec.method} checkpoints of mixture-of-experts models are not supported "
                f"(layer {name} holds experts)")
    replaced = 0
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            if not isinstance(child, nn.Linear) or spec.skips(full):
                continue
            if getattr(child, "checkpoint_shards", None):
                raise UnsupportedQuantizationError(
                    f"{spec.method} checkpoints cannot be split over tensor-parallel ranks "
                    "yet; use tensor_parallel_size 1")
            new = _layer_class(spec)(
                spec, child.in_features, child.out_features,
                output_sizes=getattr(child, "output_sizes", None), bias=child.bias is not None,
                dtype=child.weight.dtype, device=child.weight.device, name=full)
            setattr(parent, child_name, new)
            replaced += 1
    if spec.method == "compressed-tensors":
        logger.info("compressed-tensors checkpoint: %d linear layers load %s weights (%s "
                    "scales)", replaced, "fp8" if spec.weight_type == "float" else (
                        "int8, W8A8" if spec.int8_activations else "int8, W8A16"),
                    spec.weight_strategy)
    else:
        logger.info("%s checkpoint: %d linear layers load 4-bit weights (group_size %s%s)",
                    spec.method, replaced, spec.group_size,
                    ", act-order" if spec.desc_act else "")
    return replaced
