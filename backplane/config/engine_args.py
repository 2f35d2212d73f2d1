"""EngineArgs: the flat set of user-facing options, turned into an EngineConfig."""

from __future__ import annotations

import copy
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from backplane.config.configs import (
    _DTYPES,
    EXECUTOR_BACKENDS,
    MAX_LORA_RANK_LIMIT,
    CacheConfig,
    CompilationConfig,
    DeviceConfig,
    LoadConfig,
    LoRAConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
    StructuredOutputsConfig,
)
from backplane.config.engine import EngineConfig
from backplane.config.speculative import parse_speculative_config

DTYPE_CHOICES = ("auto", *_DTYPES)
TOKENIZER_MODES = ("auto", "slow")
SCHEDULING_POLICIES = ("fcfs", "priority")
RUNNER_CHOICES = ("auto", "generate", "pooling")
OPTIMIZATION_LEVELS = (0, 1, 2, 3)
# EngineConfig section (by an option's "section" metadata) -> (attribute, class).
_SECTIONS = {
    "model": ("model_config", ModelConfig),
    "cache": ("cache_config", CacheConfig),
    "scheduler": ("scheduler_config", SchedulerConfig),
    "parallel": ("parallel_config", ParallelConfig),
    "device": ("device_config", DeviceConfig),
    "load": ("load_config", LoadConfig),
}


def _opt(
    default: Any,
    section: str,
    help: str,
    *,
    flags: tuple[str, ...] = (),
    choices: tuple[Any, ...] | None = None,
    default_doc: str | None = None,
    flags_doc: str | None = None,
) -> Any:
    """An EngineArgs field and its whole user-facing declaration (in the metadata).

    Args:
        default: the default (MISSING for a required option).
        section: the EngineConfig section the option belongs to.
        help: the one description used by ``--help`` and docs/configuration.md.
        flags: CLI spellings besides ``--name-with-dashes``.
        choices: the allowed values, when the set is closed.
        default_doc: how the docs show the default, when not just the value.
        flags_doc: how the docs show the flags, when not just the flag list.
    """
    meta = {"section": section, "help": help, "flags": flags, "choices": choices,
            "default_doc": default_doc, "flags_doc": flags_doc}
    return field(default=default, metadata=meta)


@dataclass
class EngineArgs:
    """Every engine option as one flat record (what `LLM(**kwargs)` and the CLI take).

    Each field is declared once, here: its metadata (see `_opt`) gives the
    CLI flags, the ``BACKPLANE_*`` variable, the help text and the row of the
    table in docs/configuration.md (`backplane.config.options.OPTIONS` and
    `backplane.config.docs` read it).
    """

    model: str = _opt(
        MISSING, 'model',
        'Local model directory (or an already cached hub id).',
        flags_doc='`--model`, positional `MODEL` of `serve`',
    )
    tokenizer: str | None = _opt(
        None, 'model',
        "Tokenizer directory; defaults to the model's.",
    )
    dtype: str = _opt(
        "auto", 'model',
        'Weight and activation dtype: `auto`, `float32`, `bfloat16`, `float16` (and the short'
        " names `fp32`, `bf16`, `half`, `fp16`). `auto` takes the checkpoint's dtype when the"
        ' platform supports it, else the platform default.',
        choices=DTYPE_CHOICES,
    )
    max_model_len: int | None = _opt(
        None, 'model',
        'Longest prompt + output in tokens.',
        default_doc="the model's `max_position_embeddings`",
    )
    seed: int = _opt(
        0, 'model',
        'Seed of the global random generator: sampling without a per-request `seed` is repeatable from run to run.',
    )
    served_model_name: list[str] | None = _opt(
        None, 'model',
        'Name(s) the server answers to: `--served-model-name a b` serves both, the first is '
        'reported in responses.',
        default_doc='`None` (= `model`)',
    )
    trust_remote_code: bool = _opt(
        False, 'model',
        'Allow model code shipped with the checkpoint to run.',
    )
    tokenizer_mode: str = _opt(
        "auto", 'model',
        '`auto` (the fast tokenizer when there is one) or `slow` (the Python one; refused '
        'when the model has none).',
        choices=TOKENIZER_MODES,
    )
    hf_overrides: dict[str, Any] | None = _opt(
        None, 'model',
        "JSON mapping set on the model's Hugging Face config after reading it, e.g. "
        '`{"max_position_embeddings": 4096}`; a key the config does not have is refused.',
    )
    max_logprobs: int = _opt(
        20, 'model',
        'Most logprobs / prompt_logprobs / top_logprobs a request may ask for per position; '
        '`-1` allows the whole vocabulary.',
    )
    generation_config: str = _opt(
        "auto", 'model',
        'Where the default sampling parameters come from: `auto` reads the model\'s '
        'generation_config.json (`temperature`, `top_p`, `top_k`, `min_p`, '
        '`repetition_penalty`, `max_new_tokens`), `vllm` ignores it (Backplane\'s own '
        'defaults), a directory reads its generation_config.json. They apply to request '
        'fields the client leaves unset.',
    )
    override_generation_config: dict[str, Any] | None = _opt(
        None, 'model',
        'JSON mapping of sampling defaults merged over the loaded ones, e.g. '
        '`{"temperature": 0.5}`; keys as in generation_config.json (`max_new_tokens` is the '
        'default `max_tokens`).',
    )
    runner: str = _opt(
        "auto", 'model',
        'What the model is run for (vLLM\'s `--runner`): `generate` (text generation), '
        '`pooling` (embeddings: `LLM.embed` / `encode`, `/v1/embeddings`, `/pooling`; '
        'prefill-only, no KV cache) or `auto`: `pooling` for embedding checkpoints (a '
        'sentence-transformers `modules.json`, or an encoder architecture such as `BertModel`), '
        'else `generate`.',
        choices=RUNNER_CHOICES,
    )
    quantization: str | None = _opt(
        None, 'model',
        'Quantize every linear layer and the output head at load, on platforms whose kernels '
        'run it (cpu with AVX512-BF16 or AVX2): `int8` (int8 weights, one scale per output row; '
        'activations quantized per token in blocks of 32, int8 dot products: W8A8, the fast '
        'one), `int8_weight_only` (W8A16: activations stay bf16) or `fp8` (e4m3 weights, one '
        'scale per output row, bf16 activations; the output head stays bf16). GPTQ and AWQ 4-bit '
        'checkpoints are detected from their `quantization_config` (`gptq` / `awq` here must '
        'then match it) and run on the platform\'s int4 kernels (cpu, cuda/rocm with '
        'triton); compressed-tensors checkpoints (llm-compressor) with fp8 weights or int8 '
        'weights (W8A8 with dynamic per-token activations, or W8A16) are detected the same '
        'way (`compressed-tensors`). Other methods (bitsandbytes, ...) and bit widths are '
        'refused.',
        default_doc='none',
    )
    revision: str | None = _opt(
        None, 'model',
        'Refused when set: Backplane loads local directories only (check the revision out first).',
    )
    max_seq_len_to_capture: int | None = _opt(
        None, 'model',
        'Refused when set: decode graphs replay any sequence length up to max_model_len.',
    )
    download_dir: str | None = _opt(
        None, 'load',
        'Refused when set: Backplane never downloads weights; pass a local model directory.',
    )
    block_size: int = _opt(
        16, 'cache',
        'Tokens per KV-cache block; must be one the attention backend supports.',
    )
    enable_prefix_caching: bool = _opt(
        True, 'cache',
        'Reuse KV blocks of identical prompt prefixes.',
    )
    memory_utilization: float | None = _opt(
        None, 'cache',
        'Fraction of the device memory the KV cache may take. Unset: 0.9 on accelerators; '
        'on the cpu a fixed 4 GiB cache (host memory is shared), unless set explicitly.',
        flags=('--gpu-memory-utilization',),
        default_doc='`0.9` (cpu: unset)',
    )
    kv_cache_memory_bytes: int | None = _opt(
        None, 'cache',
        'Explicit KV-cache size in bytes; overrides `memory_utilization`.',
        default_doc='`None` (cpu: 4 GiB)',
    )
    num_kv_blocks: int | None = _opt(
        None, 'cache',
        'Explicit number of KV blocks; overrides both sizes above.',
    )
    kv_cache_dtype: str = _opt(
        "auto", 'cache',
        'KV-cache storage dtype; `auto` uses the model dtype. Known names: `auto`, `float32`,'
        ' `float16`, `bfloat16`, `fp8`, `fp8_e4m3`, `fp8_e5m2`; the platform decides which it'
        ' runs. `fp8` (= `fp8_e4m3`) and `fp8_e5m2` store one byte per element (twice the'
        ' tokens of bf16 in the same memory) with a per-layer K and V scale: the'
        " checkpoint's `k_scale`/`v_scale` when it has them, else 1.0 (see"
        ' `calculate_kv_scales`).',
    )
    calculate_kv_scales: bool = _opt(
        False, 'cache',
        'With an fp8 `kv_cache_dtype`: set each layer\'s K and V scale from the first'
        ' step\'s keys and values (the largest absolute key / the fp8 max, likewise for'
        ' values), replacing the'
        ' checkpoint\'s scales or 1.0 (vLLM\'s option). Refused without an fp8 KV cache.',
    )
    max_num_seqs: int = _opt(
        256, 'scheduler',
        'Most requests running in one step.',
    )
    max_num_batched_tokens: int | None = _opt(
        None, 'scheduler',
        'Token budget of one step (prompt and output tokens alike).',
        default_doc='2048 with chunked prefill, else max(`max_model_len`, 2048)',
    )
    enable_chunked_prefill: bool = _opt(
        True, 'scheduler',
        'Split long prompts over several steps.',
    )
    scheduling_policy: str = _opt(
        "fcfs", 'scheduler',
        '`fcfs` (arrival order) or `priority` (lower priority value first, then arrival).',
        choices=SCHEDULING_POLICIES,
    )
    async_scheduling: bool | None = _opt(
        None, 'scheduler',
        'Plan and prepare step N+1 while step N runs on the device (the model step runs on '
        'a worker thread), and turn step N\'s tokens into outputs while N+1 runs. Outputs are '
        "the same as without it. Unset: the platform's default. Refused with `--runner "
        "pooling` (no decode steps to overlap).",
        default_doc="the platform's",
    )
    tensor_parallel_size: int = _opt(
        1, 'parallel',
        'Ranks each layer is split over (attention heads, MLP columns and the vocabulary), '
        'each holding and reading only its slice of the weights. Llama-family decoders '
        '(Llama, Mistral, Qwen2, Qwen3, Granite); other architectures are refused above 1.',
        flags=('-tp',),
    )
    pipeline_parallel_size: int = _opt(
        1, 'parallel',
        'Stages the decoder layers are split into, one rank group each; activations pass '
        'from stage to stage with the platform communicator\'s send/recv.',
        flags=('-pp',),
    )
    distributed_executor_backend: str | None = _opt(
        None, 'parallel',
        'How the ranks run: `uni` (in-process, one rank), `mp` (one process per rank on this '
        'host), `ray` (Ray actors placed by a placement group; multi-node), '
        '`external_launcher` (every rank started by torchrun runs the same program). Unset: '
        '`uni` for one rank, `mp` for more.',
        default_doc="uni / mp by world size",
        choices=EXECUTOR_BACKENDS,
    )
    engine_process: bool | None = _opt(
        None, 'parallel',
        'Run the engine core (scheduler and model runner) in its own process, fed over ZMQ, '
        'so that tokenization, detokenization and HTTP in the front-end process overlap with '
        "the model's steps. Unset: the platform's default (on for cuda and rocm). Refused "
        'with `--runner pooling`, which runs in-process.',
        default_doc="the platform's",
    )
    data_parallel_size: int = _opt(
        1, 'parallel',
        'Independent engine cores, each in its own process with its own scheduler, KV cache '
        'and devices (rank i takes devices [i x world, (i+1) x world), world = tensor x '
        'pipeline parallel size; on cpu its share of the cores), behind one server or `LLM`. '
        'Each request goes to the core with the fewest running + waiting requests; '
        '`/metrics` reports each rank (label `engine`) and the totals. Above 1 the engine '
        'process is implied; refused with `--runner pooling` and the `external_launcher` '
        'backend.',
        flags=('-dp',),
    )
    device: str = _opt(
        "auto", 'device',
        'Platform plugin to run on (`backplane platforms` lists them); `auto` picks the best '
        'available one.',
    )
    attention_backend: str | None = _opt(
        None, 'device',
        "Force one of the platform's attention backends by name.",
    )
    load_format: str = _opt(
        "safetensors", 'load',
        'How weights are read: `safetensors` (or `auto`).',
    )
    optimization_level: int | None = _opt(
        None, 'compilation',
        '`0`..`3`, see below.',
        flags=('-O',),
        choices=OPTIMIZATION_LEVELS,
        default_doc="the platform's",
    )
    enforce_eager: bool = _opt(
        False, 'compilation',
        'Never compile or capture graphs; the same as `-O0`.',
    )
    compilation_config: dict[str, Any] | None = _opt(
        None, 'compilation',
        'Explicit compilation settings: `compile`, `backend`, `use_graphs`, '
        '`graph_capture_sizes` (decode batch sizes), `piecewise_graphs`, '
        "`piecewise_capture_sizes` (token counts). They win over the level's defaults.",
        flags=('-cc',),
    )
    structured_outputs_config: dict[str, Any] | None = _opt(
        None, 'structured_outputs',
        'Structured outputs: `backend` is the grammar backend requests use unless they name '
        'one: `auto` (xgrammar, falling back to guidance for specs xgrammar cannot enforce), '
        '`xgrammar` or `guidance` (alias `llguidance`).',
        default_doc='`{"backend": "auto"}`',
    )

    enable_lora: bool = _opt(
        False, 'lora',
        'Serve LoRA adapters (PEFT format) over the base model: requests name an adapter '
        '(`lora_request`, or the `model` field on the server) and one batch mixes adapters '
        'and the base. Refused with `--runner pooling`.',
    )
    max_loras: int = _opt(
        1, 'lora',
        'With --enable-lora: adapters resident on the device at once, and the most distinct '
        'adapters one step mixes (requests for others wait).',
    )
    max_lora_rank: int = _opt(
        16, 'lora',
        'With --enable-lora: the largest adapter rank accepted (1..512).',
    )
    max_cpu_loras: int | None = _opt(
        None, 'lora',
        'With --enable-lora: adapters kept loaded in host memory (least recently used '
        'dropped first), at least --max-loras.',
        default_doc='max_loras',
    )
    speculative_config: dict[str, Any] | None = _opt(
        None, 'speculative',
        'Speculative decoding, in vLLM\'s JSON keys: `method` (`ngram`, `draft_model`, '
        '`eagle`, `eagle3`), `num_speculative_tokens` (1..16), `model` (the draft or EAGLE '
        'head directory), `prompt_lookup_min`/`prompt_lookup_max` (ngram), '
        '`disable_by_batch_size`. Output is identical to decoding without it (greedy) or '
        'from the same distribution (sampling). Refused with `--async-scheduling` and '
        '`--runner pooling`.',
        default_doc='off',
    )

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}

    @classmethod
    def from_sources(cls, **kwargs: Any) -> EngineArgs:
        """EngineArgs from keyword arguments, a ``config=`` YAML file and BACKPLANE_* variables.

        What ``LLM(**kwargs)`` should call: unlike ``EngineArgs(**kwargs)`` it
        accepts aliases (``gpu_memory_utilization``) and deprecated names (with a
        warning), and reports unknown names with close matches.
        """
        from backplane.config.sources import engine_args_from_sources

        return engine_args_from_sources(kwargs=kwargs)

    def create_engine_config(self) -> EngineConfig:
        """Split the flat options into config sections (not yet finalized).

        Each option goes to the section its declaration names, under the same
        field name; the compilation options are resolved together in finalize,
        which reports a conflict between enforce_eager and the level instead of
        silently dropping one.
        """
        by_section: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
        for f in fields(self):
            section = f.metadata["section"]
            if section in by_section:
                by_section[section][f.name] = copy.deepcopy(getattr(self, f.name))
        sections = {attr: cls(**by_section[name]) for name, (attr, cls) in _SECTIONS.items()}
        return EngineConfig(
            **sections,
            compilation_config=_compilation_config(self.compilation_config),
            structured_outputs_config=_structured_outputs_config(self.structured_outputs_config),
            speculative_config=parse_speculative_config(self.speculative_config),
            lora_config=_lora_config(self),
            optimization_level=self.optimization_level,
            enforce_eager=self.enforce_eager,
        )


def _lora_config(args: EngineArgs) -> LoRAConfig | None:
    """LoRAConfig when --enable-lora is set; the LoRA sizes are refused without it."""
    if not args.enable_lora:
        changed = [name for name, default in (("max_loras", 1), ("max_lora_rank", 16),
                                              ("max_cpu_loras", None))
                   if getattr(args, name) != default]
        if changed:
            raise ValueError(f"{', '.join(changed)} only apply with enable_lora; add "
                             "--enable-lora or drop them")
        return None
    for name, low, high in (("max_loras", 1, None), ("max_lora_rank", 1, MAX_LORA_RANK_LIMIT)):
        value = getattr(args, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < low or (
                high is not None and value > high):
            limit = f"in {low}..{high}" if high else f">= {low}"
            raise ValueError(f"{name} ({value!r}) must be an integer {limit}")
    cpu = args.max_cpu_loras
    if cpu is not None and (isinstance(cpu, bool) or not isinstance(cpu, int)
                            or cpu < args.max_loras):
        raise ValueError(f"max_cpu_loras ({cpu!r}) must be an integer >= max_loras "
                         f"({args.max_loras})")
    return LoRAConfig(max_loras=args.max_loras, max_lora_rank=args.max_lora_rank,
                      max_cpu_loras=cpu if cpu is not None else args.max_loras)


def _structured_outputs_config(value) -> StructuredOutputsConfig:
    """StructuredOutputsConfig from ``--structured-outputs-config`` (a dict, or the object)."""
    if value is None:
        return StructuredOutputsConfig()
    if isinstance(value, StructuredOutputsConfig):
        return StructuredOutputsConfig(backend=value.backend)
    if not isinstance(value, dict):
        raise ValueError(f"structured_outputs_config must be a mapping, got {value!r}")
    known = {f.name for f in fields(StructuredOutputsConfig)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ValueError(
            f"structured_outputs_config: unknown key(s) {unknown}; known: {sorted(known)}")
    from backplane.core.structured_outputs.params import canonical_backend_name

    return StructuredOutputsConfig(backend=canonical_backend_name(str(value.get("backend", "auto"))))


def _compilation_config(value: dict[str, Any] | CompilationConfig | None) -> CompilationConfig:
    """CompilationConfig from the user's explicit settings (None fields = level defaults)."""
    if value is None:
        return CompilationConfig()
    if isinstance(value, CompilationConfig):
        return CompilationConfig(**{f.name: getattr(value, f.name) for f in fields(value)})
    known = {f.name for f in fields(CompilationConfig)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ValueError(
            f"compilation_config: unknown key(s) {unknown}; known: {sorted(known)}"
        )
    return CompilationConfig(**value)
