"""The Platform a plugin's ``load()`` returns, made of small typed parts.

Instead of one object with dozens of members, a platform is a bundle of parts,
each with one job. The core talks to the part it needs
(``platform.runtime.total_memory()``, ``platform.all_attention_backends()``), so
a plugin author implements a handful of small classes and inherits defaults for
the rest.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from backplane.plugins_sdk.attention import AttentionBackend, AttentionSpec
from backplane.plugins_sdk.communicator import Communicator
from backplane.plugins_sdk.config_view import PlatformConfigView
from backplane.plugins_sdk.deprecation import deprecated_override
from backplane.plugins_sdk.graph import GraphRunner

if TYPE_CHECKING:
    import torch.distributed as dist

    from backplane.plugins_sdk.lora import LoRAMapping


class DeviceRuntime(ABC):
    """Facts about, and basic operations on, the platform's devices."""

    device_type: str = "cpu"

    @abstractmethod
    def device_count(self) -> int:
        """How many devices of this platform the process can see."""

    @abstractmethod
    def device_name(self, index: int = 0) -> str:
        """Human-readable device name."""

    @abstractmethod
    def total_memory(self, index: int = 0) -> int:
        """Bytes of memory on the device."""

    @abstractmethod
    def available_memory(self, index: int = 0) -> int:
        """Bytes of memory free for the engine right now."""

    def device(self, index: int = 0) -> torch.device:
        """The torch device for ``index``."""
        return torch.device(self.device_type, index) if self.device_type != "cpu" else (
            torch.device("cpu"))

    def synchronize(self) -> None:  # noqa: B027 - optional, no-op by default
        """Wait for all queued device work. No-op for synchronous devices."""

    def empty_cache(self) -> None:  # noqa: B027 - optional, no-op by default
        """Return cached allocator memory to the device. No-op by default."""

    def seed_everything(self, seed: int) -> None:
        """Seed torch (and the device's generators) for reproducible runs."""
        torch.manual_seed(seed)

    def pin_memory_available(self) -> bool:
        """Whether host tensors can be pinned for faster copies to this device."""
        return False

    supported_dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)

    def default_dtype(self) -> torch.dtype:
        """dtype used for ``dtype="auto"`` when the model's own dtype is unsupported."""
        return torch.bfloat16


@dataclass
class ConfigDecision:
    """What a config policy changed or refused, with the reason for each."""

    changes: list[str] = field(default_factory=list)
    refusals: list[str] = field(default_factory=list)


class ConfigPolicy:
    """Platform defaults and refusals applied to an engine config during validation.

    Implement `check_and_update`: it gets a `PlatformConfigView` (the fields a
    policy may read, and the few it may change, documented on that class),
    may change writable fields (recording each change with its reason in
    ``ConfigDecision.changes``) and returns refusals for settings the platform
    cannot run, each a sentence naming the field, the value and what to use
    instead. The core copies the changed fields back and raises one error
    listing every refusal together with every other problem of the config.

    Attributes:
        default_optimization_level: the optimization level (0..3) the core uses
            when the user sets none (no ``-O``, no ``--enforce-eager``), or None
            (the default) to let the core choose: O2 on a platform with graph
            capture (``Platform.supports_graph_capture``), else O0. The core
            reads it before calling the policy (``backplane.config.levels``) and
            fills the compilation settings the user left unset from the level:
            O0 neither torch.compile nor graphs; O1 torch.compile with
            ``Platform.compile_backend`` (none when that is None); O2 and O3
            also graph capture (only with ``supports_graph_capture``). So the
            view the policy gets already holds the resulting
            ``optimization_level``, ``compile``, ``use_graphs`` and
            ``graph_capture_sizes``. Compilation settings the user set
            explicitly win over the level's.
        default_engine_process: whether the engine core (scheduler and model
            runner) runs in its own process when the user sets neither
            ``--engine-process`` nor ``--no-engine-process``; None (the default)
            means in-process. Worth it where a step leaves the host CPU idle
            (an accelerator) so that the front-end's tokenization,
            detokenization and HTTP overlap with it. Pooling models always run
            in-process.
        default_async_scheduling: whether the engine plans step N+1 while step
            N runs when the user sets neither ``--async-scheduling`` nor
            ``--no-async-scheduling``; None (the default) means off. Worth it
            where the device runs a step while the host is free to plan.

    Deprecated: overriding ``check_and_update_config(config)`` (the whole mutable
    engine config, SDK 1.0) instead of `check_and_update`. Through SDK 1.1 a
    policy class that overrides only that method is still called the old way,
    with a DeprecationWarning naming `check_and_update`; SDK 1.2 removes it.
    """

    default_optimization_level: int | None = None
    default_engine_process: bool | None = None
    default_async_scheduling: bool | None = None

    def check_and_update(self, view: PlatformConfigView) -> ConfigDecision:
        """Adjust the writable fields of ``view`` and report changes and refusals (SDK 1.1)."""
        return ConfigDecision()

    def check_and_update_config(self, config: Any) -> ConfigDecision:
        """Deprecated (SDK 1.0): adjust the engine ``config`` in place; use `check_and_update`.

        Called by the core only on a policy that overrides this method and not
        `check_and_update`. Given a `PlatformConfigView`, this default forwards
        to `check_and_update`.
        """
        LEGACY_CONFIG_HOOK.warn(self)
        if isinstance(config, PlatformConfigView):
            return self.check_and_update(config)
        if LEGACY_CONFIG_HOOK.implements_new(self):
            raise TypeError(
                f"{type(self).__qualname__} implements ConfigPolicy.check_and_update(view); "
                "pass it a PlatformConfigView instead of an engine config"
            )
        return ConfigDecision()


LEGACY_CONFIG_HOOK = deprecated_override(
    ConfigPolicy, "check_and_update_config", "check_and_update", since="1.1",
    replacement="ConfigPolicy.check_and_update(view: PlatformConfigView)",
)


def run_config_policy(
    policy: ConfigPolicy, view: PlatformConfigView, legacy_config: Any = None
) -> ConfigDecision:
    """Call ``policy`` the way it is written: the core's (and the conformance kit's) one door.

    A policy that implements `ConfigPolicy.check_and_update` (or neither
    method) gets ``view``. One that overrides only the deprecated
    ``check_and_update_config`` gets ``legacy_config`` (the engine config)
    after a DeprecationWarning; without one, TypeError says to port it.
    """
    if not LEGACY_CONFIG_HOOK.implements_only_old(policy):
        return policy.check_and_update(view)
    LEGACY_CONFIG_HOOK.warn(policy)
    if legacy_config is None:
        raise TypeError(
            f"{type(policy).__qualname__} implements only the deprecated "
            "ConfigPolicy.check_and_update_config(config); implement "
            "check_and_update(view: PlatformConfigView) instead"
        )
    return policy.check_and_update_config(legacy_config)


class Platform:
    """A hardware platform as the core sees it.

    Attributes:
        name: platform name (matches the descriptor's).
        runtime: the DeviceRuntime part.
        config_policy: the ConfigPolicy part.
        dist_backend: torch.distributed backend name for this platform's collectives.
        compile_backend: torch.compile backend used at optimization level O1+,
            or None when the platform does not support compilation.
    """

    name: str = "unnamed"
    dist_backend: str = "gloo"
    compile_backend: str | None = None
    # True when make_graph_runner returns a GraphRunner.
    supports_graph_capture: bool = False
    # Weight quantization methods this platform's kernels run (``--quantization``);
    # the core refuses any other method on this platform, naming both (SDK 1.1).
    # ``gptq`` / ``awq`` here mean: `make_quantized_linear` returns kernels for
    # 4-bit checkpoints of that method.
    supported_quantization: tuple[str, ...] = ()
    # Split models and data parallelism (SDK 1.1): the environment variable a process
    # selects this platform's devices with (a list of indices, e.g. CUDA_VISIBLE_DEVICES),
    # and the Ray resource name of one device ("GPU"); None: not applicable (cpu).
    device_control_env_var: str | None = None
    ray_device_resource: str | None = None

    def quantization_unsupported_reason(self, method: str) -> str | None:
        """Why ``method`` is missing from `supported_quantization` on this machine (e.g.
        an instruction set the kernel needs), for the refusal message; None: no reason
        to add. Optional (SDK 1.1 platforms without it keep the plain message)."""
        return None

    def __init__(self, runtime: DeviceRuntime, config_policy: ConfigPolicy | None = None) -> None:
        self.runtime = runtime
        self.config_policy = config_policy or ConfigPolicy()
        self._extra_attention_backends: list[type[AttentionBackend]] = []

    @property
    def device_type(self) -> str:
        return self.runtime.device_type

    def attention_backends(self) -> list[type[AttentionBackend]]:
        """The platform's own backends in priority order (best first); none by default.

        Subclasses override this with their list, and it returns exactly that:
        backends that general plugins registered are not in it. Selection and
        listings use `all_attention_backends`.
        """
        return []

    def registered_attention_backends(self) -> list[type[AttentionBackend]]:
        """Backends registered with `register_attention_backend`, in registration order."""
        # __dict__.get: a subclass may not have called Platform.__init__.
        return list(self.__dict__.get("_extra_attention_backends", ()))

    def all_attention_backends(self) -> list[type[AttentionBackend]]:
        """Every backend this platform offers, best first (SDK 1.1).

        The platform's own `attention_backends()`, then the registered ones whose
        name the platform does not already offer (the platform's wins). This is
        the list `select_attention_backend` chooses from and the one the core,
        ``backplane platforms`` and the conformance kit show.
        """
        own = list(self.attention_backends())
        names = {b.name for b in own}
        return own + [b for b in self.registered_attention_backends() if b.name not in names]

    def register_attention_backend(self, backend: type[AttentionBackend]) -> None:
        """Offer ``backend`` after the platform's own ones (SDK 1.1).

        Used by the general-plugin hook ``register_attention_backends``. The
        backend then appears in `all_attention_backends` (never in
        `attention_backends`); one whose name the platform already offers is
        ignored there (the platform's wins). Registering the same class twice
        is a no-op.
        """
        if not (isinstance(backend, type) and issubclass(backend, AttentionBackend)):
            raise TypeError(
                f"register_attention_backend expects an AttentionBackend subclass, got {backend!r}"
            )
        if not getattr(backend, "name", None):
            raise ValueError(f"attention backend {backend.__qualname__} has no `name`")
        registered = self.__dict__.setdefault("_extra_attention_backends", [])
        if backend not in registered:
            registered.append(backend)

    def select_attention_backend(
        self, spec: AttentionSpec, forced: str | None = None
    ) -> type[AttentionBackend]:
        """First backend of `all_attention_backends` that can serve ``spec``.

        With ``forced``, the backend of that name (own or registered) or an error.
        Raises ValueError listing every backend and why it was refused.
        """
        backends = self.all_attention_backends()
        if forced is not None:
            by_name = {b.name: b for b in backends}
            if forced not in by_name:
                raise ValueError(
                    f"attention_backend {forced!r} is not offered by platform {self.name!r}; "
                    f"available: {sorted(by_name)}"
                )
            backends = [by_name[forced]]
        refusals = []
        for backend in backends:
            reasons = backend.unsupported_reasons(spec)
            if not reasons:
                return backend
            refusals.append(f"{backend.name}: {'; '.join(reasons)}")
        raise ValueError(
            f"no attention backend of platform {self.name!r} can serve {spec}: "
            + (" | ".join(refusals) or "the platform offers none")
        )

    def make_communicator(self, group: dist.ProcessGroup | None = None) -> Communicator:
        """Collectives for ``group``; the torch.distributed default unless overridden."""
        return Communicator(group)

    def make_graph_runner(self) -> GraphRunner | None:
        """A GraphRunner, or None when the platform cannot capture graphs."""
        return None

    def fused_moe(
        self,
        hidden: torch.Tensor,
        w13: torch.Tensor,
        w2: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        activation: str = "silu",
    ) -> torch.Tensor:
        """The experts of a mixture-of-experts layer in one call (SDK 1.1).

        ``hidden [n, H]``, ``w13 [E, 2I, H]`` (gate rows then up rows), ``w2
        [E, H, I]``, ``topk_weights [n, k]``, ``topk_ids [n, k]`` -> ``[n, H]``:
        each token's sum over its k experts of weight * down(act(gate) * up).
        The full contract is in `backplane.plugins_sdk.fused_moe`. The default
        is `fused_moe_torch` (tokens sorted by expert, two matmuls per expert
        group, any torch device); override it with a fused kernel. The core
        hands this method to every MoE layer after loading the model.
        """
        from backplane.plugins_sdk.fused_moe import fused_moe_torch

        return fused_moe_torch(hidden, w13, w2, topk_weights, topk_ids, activation)

    def add_lora(
        self,
        out: torch.Tensor,
        x: torch.Tensor,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        mapping: LoRAMapping,
        output_slices: tuple[int, ...] | None = None,
    ) -> torch.Tensor:
        """Multi-LoRA: add each token's adapter delta to a layer's output, in place (SDK 1.1).

        ``out [n, O]``, ``x [n, I]``, ``lora_a [L, R, I]``, ``lora_b [L, O, R]``
        (scaling folded in), ``mapping.token_slots [n]`` int32 (``-1`` = base
        model only): ``out[t] += (x[t] @ lora_a[s].T) @ lora_b[s].T`` for ``s =
        token_slots[t] >= 0``, in ``x``'s dtype; returns ``out``. With
        ``output_slices`` (fused q|k|v, gate|up) part ``p`` of the output uses
        only the ``p``-th of ``len(output_slices)`` equal rank blocks. The full
        contract is in `backplane.plugins_sdk.lora`. The default is
        `add_lora_torch` (two matmuls per active slot, any torch device);
        override it with kernels that read only ``mapping.token_slots``.
        """
        from backplane.plugins_sdk.lora import add_lora_torch

        return add_lora_torch(out, x, lora_a, lora_b, mapping, output_slices)

    def apply_token_bitmask(self, logits: torch.Tensor, bitmask: torch.Tensor,
                            rows: torch.Tensor | None) -> torch.Tensor:
        """Structured outputs: mask ``logits`` rows ``rows`` with packed bitmask rows (SDK 1.1).

        ``bitmask [k, ceil(V / 32)]`` int32 on the host (bit ``i % 32`` of word
        ``i // 32`` set = token ``i`` allowed), ``rows [k]`` the logits rows they
        belong to, or None when the bitmask covers every row in order. Disallowed logits become -inf, in place; returns ``logits``.
        The default (`backplane.plugins_sdk.token_bitmask.apply_token_bitmask`)
        uses plain tensor ops on the logits' device; override it with a fused
        kernel. The sampler calls it before temperature, top-k and top-p.
        """
        from backplane.plugins_sdk.token_bitmask import apply_token_bitmask

        return apply_token_bitmask(logits, bitmask, rows)

    def init_worker(self, local_rank: int, local_world_size: int) -> None:  # noqa: B027
        """Claim this rank's share of the host before the model is built (SDK 1.1+).

        Called once in every process of a split model (tensor/pipeline parallel),
        rank 0 included, before the process group is joined: ``local_rank`` of
        ``local_world_size`` ranks on this host. A GPU platform selects device
        ``local_rank``; the cpu platform pins the process to its share of the cores
        and sizes its thread pool to it. No-op by default.
        """

    def device_index(self, local_rank: int) -> int:
        """The device index rank ``local_rank`` of this host uses (``runtime.device(i)``).

        Default: one device per local rank, round robin over the visible devices;
        a single shared device (cpu) is index 0 for every rank.
        """
        return local_rank % max(1, self.runtime.device_count())

    def make_quantized_linear(self, method: str, weights: Any) -> torch.nn.Module | None:
        """A module computing ``x @ W.T + bias`` for one quantized linear layer (SDK 1.1).

        ``method`` is the checkpoint's (``"gptq"``, ``"awq"``); ``weights`` a
        `backplane.plugins_sdk.quantization.Int4Weights` (unpacked 4-bit values,
        per-group scales and zeros, act-order permutation, bias) on the model's
        device. The module must keep ``x``'s shape except the last dimension and
        return ``x``'s dtype; it should hold its data in buffers, not parameters.
        Return None when the platform has no kernel for it: the core then
        dequantizes the whole weight on every call (`linear_int4_reference`).
        Called by `prepare_quantized_layers`. Default: None.
        """
        return None

    def prepare_quantized_layers(self, model: torch.nn.Module) -> int:
        """Give every quantized layer of ``model`` (``layer_kind`` ``"quantized_linear"``)
        this platform's kernels through `make_quantized_linear`; returns how many got a
        platform kernel (SDK 1.1). The default `prepare_model` calls it; a platform that
        overrides `prepare_model` calls it too (first, before other layer swaps).
        """
        count = 0
        for module in list(model.modules()):
            if getattr(module, "layer_kind", None) == "quantized_linear" and getattr(
                    module, "kernels", None) is None:
                count += bool(module.use_platform_kernels(self.make_quantized_linear))
        return count

    def prepare_model(self, model: torch.nn.Module, config: Any) -> torch.nn.Module:
        """Adapt a loaded model to this platform's kernels (SDK 1.1+); by default only
        quantized layers get the platform's kernels (`prepare_quantized_layers`).

        ``config`` is the finalized engine config (e.g. to leave the model alone
        when ``config.compilation_config.compile`` hands it to torch.compile).
        Called once after the weights are loaded and before any compilation. A
        platform may, for example, repack linear weights into its GEMM library's
        blocked layout. It must keep the module's call signature and numerics
        (within the dtype's rounding) and should release the weights it replaces.

        Core layers a platform may swap for its own kernels say what they are in
        a ``layer_kind`` class attribute (match on it, not on core classes, which
        platforms do not import):

        * ``"rms_norm"``: attributes ``weight``, ``eps``, ``hidden_size``;
          ``x -> weight * rms_normalise(x)``, statistics in float32, the
          normalised value rounded to ``x.dtype`` before the scale. A
          replacement that sets ``accepts_residual = True`` is also called as
          ``(x, residual=r) -> (norm(s), s)`` with ``s = x + r`` rounded to
          ``x.dtype`` (the decoder's residual add fused into the norm); one that
          does not is only called with ``x``.
        * ``"silu_and_mul"``: ``[..., 2d] -> silu(x[..., :d]) * x[..., d:]``.
        * ``"rotary"``: ``(x [tokens, heads, head_dim], cos, sin)`` -> a new tensor,
          x rotated rotate-half style by ``cos``/``sin [tokens, 1, r]`` (the first
          ``2r`` channels of each head; the rest pass through); ``x`` unchanged.

        Output projections expose their ``[vocab, hidden]`` matrix as
        ``logits_weight``. Mixture-of-experts layers (``layer_kind`` ``"fused_moe"``)
        call the platform's `fused_moe` through their ``moe_op`` attribute.
        Quantized layers (``"quantized_linear"``) get their kernels from
        `make_quantized_linear` via `prepare_quantized_layers`.
        """
        self.prepare_quantized_layers(model)
        return model

