"""Typed configuration sections of an engine.

Each section is a plain dataclass with one concern. `EngineConfig` bundles
them; `backplane.config.engine_args.EngineArgs` builds it from user input and
`EngineConfig.validate` checks the combination in one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp16": torch.float16,
}


class Freezable:
    """A config section that becomes read-only once the configuration is resolved.

    `backplane.config.resolve` freezes every section of the ResolvedConfig it
    returns: a later assignment raises instead of silently changing a setting
    that other parts already read.
    """

    _frozen: bool = False

    def freeze(self) -> None:
        """Refuse any further assignment to this section's fields."""
        object.__setattr__(self, "_frozen", True)

    def __setattr__(self, name: str, value: Any) -> None:
        if self._frozen:
            raise AttributeError(
                f"{type(self).__name__}.{name} cannot change: the configuration is resolved "
                "(build a new one with backplane.config.resolve)"
            )
        super().__setattr__(name, value)


def parse_dtype(value: str | torch.dtype) -> torch.dtype:
    """Map a dtype name (``"bfloat16"``, ``"half"``...) or torch.dtype to a torch.dtype."""
    if isinstance(value, torch.dtype):
        return value
    key = str(value).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"dtype {value!r} is not one of {sorted(_DTYPES)} or 'auto'")
    return _DTYPES[key]


@dataclass
class ModelConfig(Freezable):
    """Which model to run and how its numbers are represented.

    Attributes:
        model: local Hugging Face model directory (or a hub id already in the local cache).
        tokenizer: tokenizer directory; defaults to ``model``.
        dtype: ``"auto"`` (the checkpoint's dtype, float32 if it says none) or a dtype name.
        max_model_len: longest prompt + output; None means the model's own limit.
        seed: seed for sampling of requests that do not set their own.
        served_model_name: name(s) the server answers to (the first is reported);
            defaults to ``model``.
        tokenizer_mode: ``"auto"`` (the fast tokenizer when there is one) or
            ``"slow"`` (the Python tokenizer).
        hf_overrides: attributes set on the model's HF config after it is read.
        max_logprobs: most logprobs a request may ask for per position (-1: the vocabulary).
        runner: ``"auto"``, ``"generate"`` or ``"pooling"`` (see `backplane.config.runner`).
        generation_config: where the sampling defaults come from: ``"auto"`` (the
            model's generation_config.json), ``"vllm"`` (none: Backplane's own) or a
            directory holding a generation_config.json.
        override_generation_config: sampling defaults merged over the loaded ones.
        quantization: quantization applied at load, on platforms that list it:
            ``int8`` (int8 weights with per-row scales, activations quantized per
            token in blocks of 32: W8A8), ``int8_weight_only`` (W8A16) or ``fp8`` (e4m3
            weights, per-row scales, bf16 activations); ``gptq`` /
            ``awq``: the checkpoint's 4-bit weights (set from its quantization_config
            when left None); None: none.
        revision, max_seq_len_to_capture: vLLM options kept so that their use is
            refused with a reason instead of being ignored.
        hf_config: the transformers config, filled by the loader.
        torch_dtype: the resolved dtype, filled by `EngineConfig.finalize`.
    """

    model: str
    tokenizer: str | None = None
    dtype: str = "auto"
    max_model_len: int | None = None
    seed: int = 0
    served_model_name: str | list[str] | None = None
    trust_remote_code: bool = False
    tokenizer_mode: str = "auto"
    hf_overrides: dict[str, Any] | None = None
    max_logprobs: int = 20
    runner: str = "auto"
    generation_config: str = "auto"
    override_generation_config: dict[str, Any] | None = None
    revision: str | None = None
    max_seq_len_to_capture: int | None = None
    quantization: str | None = None
    hf_config: Any = field(default=None, repr=False, compare=False)
    torch_dtype: torch.dtype | None = None

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer or self.model

    @property
    def name(self) -> str:
        """The name the server reports (the first served name)."""
        return self.served_names[0]

    @property
    def served_names(self) -> list[str]:
        """Every name clients may use for this model."""
        names = self.served_model_name
        if isinstance(names, str):
            return [names]
        return list(names) if names else [self.model]


@dataclass
class CacheConfig(Freezable):
    """Paged KV cache settings.

    Attributes:
        block_size: tokens per KV block.
        enable_prefix_caching: reuse KV blocks of identical prompt prefixes.
        memory_utilization: fraction of the device memory the platform reports as
            available that the KV cache may take (vLLM: gpu_memory_utilization);
            None until resolution, which applies the platform's choice or 0.9.
        kv_cache_memory_bytes: explicit KV cache size in bytes; overrides memory_utilization.
        num_kv_blocks: explicit number of KV blocks; overrides both of the above.
        kv_cache_dtype: ``"auto"`` stores KV in the model dtype; ``fp8`` (=
            ``fp8_e4m3``) and ``fp8_e5m2`` store one byte per element with a
            per-layer K and V scale.
        calculate_kv_scales: with an fp8 kv_cache_dtype, set each layer's K/V
            scales from the first step's keys and values (amax / fp8 max)
            instead of the checkpoint's scales or 1.0.
    """

    block_size: int = 16
    enable_prefix_caching: bool = True
    memory_utilization: float | None = None
    kv_cache_memory_bytes: int | None = None
    num_kv_blocks: int | None = None
    kv_cache_dtype: str = "auto"
    calculate_kv_scales: bool = False


@dataclass
class SchedulerConfig(Freezable):
    """Token-budget scheduler settings.

    Attributes:
        max_num_seqs: most requests running in one step.
        max_num_batched_tokens: token budget of one step (prompt and output tokens alike).
        enable_chunked_prefill: split long prompts over several steps.
        scheduling_policy: ``"fcfs"`` or ``"priority"`` (lower value first, then arrival).
        async_scheduling: plan step N+1 while step N runs (None until resolution,
            which applies the platform policy's ``default_async_scheduling``,
            else False).
    """

    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    enable_chunked_prefill: bool = True
    scheduling_policy: Literal["fcfs", "priority"] = "fcfs"
    async_scheduling: bool | None = None


# distributed_executor_backend values: in-process, one process per rank on this host,
# Ray actors (multi-node), every rank started by torchrun (SPMD).
EXECUTOR_BACKENDS = ("uni", "mp", "ray", "external_launcher")


@dataclass
class ParallelConfig(Freezable):
    """How the model is split over devices and processes.

    Attributes:
        distributed_executor_backend: one of ``EXECUTOR_BACKENDS`` (None until
            resolution: ``uni`` for one rank, ``mp`` for more).
        engine_process: run the engine core in a child process (None until
            resolution, which applies the platform policy's
            ``default_engine_process``, else False).
        data_parallel_size: independent engine cores (each with its own
            scheduler, KV cache and tensor x pipeline ranks) behind one front-end,
            requests balanced by load; above 1 each core runs in its own process.
    """

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    distributed_executor_backend: str | None = None
    engine_process: bool | None = None
    data_parallel_size: int = 1


@dataclass
class DeviceConfig(Freezable):
    """Which platform runs the engine: ``"auto"`` or a platform name."""

    device: str = "auto"
    attention_backend: str | None = None


@dataclass
class LoadConfig(Freezable):
    """How weights are read."""

    load_format: str = "safetensors"
    download_dir: str | None = None


# Weight quantization methods Backplane implements (a platform lists those it runs).
QUANTIZATION_METHODS = ("int8", "int8_weight_only", "fp8", "gptq", "awq", "compressed-tensors")

# Largest adapter rank accepted (vLLM's ceiling too): rank rows are padded to it.
MAX_LORA_RANK_LIMIT = 512


@dataclass
class LoRAConfig(Freezable):
    """LoRA adapter serving (present only with ``enable_lora``).

    Attributes:
        max_loras: adapters resident on the device at once (slots); also the most
            distinct adapters one step may mix.
        max_lora_rank: largest adapter rank accepted; every slot is this wide.
        max_cpu_loras: adapters kept loaded in host memory (an LRU), at least
            max_loras; None means max_loras.
    """

    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None


SPECULATIVE_METHODS = ("ngram", "draft_model", "eagle", "eagle3")
# Longest draft a step may verify: k + 1 query tokens per request must stay small
# next to the token budget, and acceptance decays geometrically with k anyway.
MAX_SPECULATIVE_TOKENS = 16


@dataclass
class SpeculativeConfig(Freezable):
    """Speculative decoding (optional section; vLLM's ``--speculative-config`` keys).

    Attributes:
        method: ``ngram`` (prompt lookup), ``draft_model`` (a smaller model with the
            target's tokenizer), ``eagle`` or ``eagle3`` (an EAGLE head over the
            target's hidden states). Unset with ``model`` given: ``draft_model``.
        model: the draft model or EAGLE head directory (not for ``ngram``).
        num_speculative_tokens: draft tokens proposed per request per step (k).
        prompt_lookup_min, prompt_lookup_max: n-gram sizes ``ngram`` matches,
            longest first.
        disable_by_batch_size: no drafts while this many requests (or more) run:
            at large batches the step is compute-bound and verification costs more
            than it saves.
    """

    method: str | None = None
    model: str | None = None
    num_speculative_tokens: int | None = None
    prompt_lookup_min: int | None = None
    prompt_lookup_max: int | None = None
    disable_by_batch_size: int | None = None

    @property
    def uses_model(self) -> bool:
        """Whether drafts come from a model (its own KV cache beside the target's)."""
        return self.method in ("draft_model", "eagle", "eagle3")


@dataclass
class StructuredOutputsConfig(Freezable):
    """Structured outputs (JSON schema, regex, choice, grammar constraints).

    Attributes:
        backend: the grammar backend requests use unless they name one:
            ``auto`` (xgrammar, falling back to guidance for specs xgrammar cannot
            enforce), ``xgrammar`` or ``guidance`` (llguidance; ``llguidance`` is
            accepted as an alias).
    """

    backend: str = "auto"


@dataclass
class CompilationConfig(Freezable):
    """Compilation and graph capture; defaults come from the optimization level.

    Attributes:
        compile: torch.compile the model forward (O1+).
        backend: torch.compile backend; None means the platform's.
        use_graphs: capture decode steps as graphs at padded batch sizes (O2+).
        graph_capture_sizes: batch sizes to capture; None means a default ladder.
        piecewise_graphs: record the model forward in pieces between the attention
            calls, for any batch, at padded token counts (O3).
        piecewise_capture_sizes: token counts to record pieces for; None means a
            default ladder up to min(512, max_num_batched_tokens).
    """

    compile: bool | None = None
    backend: str | None = None
    use_graphs: bool | None = None
    graph_capture_sizes: list[int] | None = None
    piecewise_graphs: bool | None = None
    piecewise_capture_sizes: list[int] | None = None
