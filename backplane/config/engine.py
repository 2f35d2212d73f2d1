"""EngineConfig: every section together, resolved against the model and platform.

`EngineConfig.finalize(platform)` is the one place where a configuration is
completed and validated: it fills model-derived defaults, applies the
optimization level, runs the platform's ConfigPolicy, selects the attention
backend, then raises one ValueError that lists every problem found, each saying
what conflicts and how to fix it. `check()` does the same without raising
(what `backplane config validate` uses).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from backplane.config.configs import (
    EXECUTOR_BACKENDS,
    QUANTIZATION_METHODS,
    CacheConfig,
    CompilationConfig,
    DeviceConfig,
    LoadConfig,
    LoRAConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
    SpeculativeConfig,
    StructuredOutputsConfig,
    parse_dtype,
)
from backplane.config.model_spec import (
    generation_config_problems,
    generation_defaults,
    sampling_defaults_problems,
)

if TYPE_CHECKING:
    from backplane.plugins_sdk import AttentionSpec, Platform

logger = logging.getLogger(__name__)

# Share of the device's available memory the KV cache takes when nothing else sizes it.
DEFAULT_MEMORY_UTILIZATION = 0.9
# Step token budget when the user sets none and chunked prefill is on.
DEFAULT_MAX_NUM_BATCHED_TOKENS = 2048

# KV-cache dtype names Backplane knows; whether a platform runs one is up to
# its policy and attention backends.
KNOWN_KV_CACHE_DTYPES = (
    "auto", "float32", "float16", "bfloat16", "fp8", "fp8_e4m3", "fp8_e5m2",
)
# Weight formats the loader reads ("auto" = safetensors today).
LOAD_FORMATS = ("auto", "safetensors")


@dataclass
class EngineConfig:
    """The full, resolved configuration of one engine.

    Attributes added by `finalize`:
        notes: every default chosen and every explicit setting that won over a
            default, in words (also logged at INFO).
        platform_name: the platform the config was finalized for.
        attention_backend_name: the attention backend selected for the model.
    """

    model_config: ModelConfig
    cache_config: CacheConfig = field(default_factory=CacheConfig)
    scheduler_config: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel_config: ParallelConfig = field(default_factory=ParallelConfig)
    device_config: DeviceConfig = field(default_factory=DeviceConfig)
    load_config: LoadConfig = field(default_factory=LoadConfig)
    compilation_config: CompilationConfig = field(default_factory=CompilationConfig)
    structured_outputs_config: StructuredOutputsConfig = field(
        default_factory=StructuredOutputsConfig)
    lora_config: LoRAConfig | None = None
    speculative_config: SpeculativeConfig | None = None
    optimization_level: int | None = None
    enforce_eager: bool = False
    notes: list[str] = field(default_factory=list)
    platform_name: str | None = None
    attention_backend_name: str | None = None
    finalized: bool = field(default=False, compare=False, repr=False)

    @property
    def max_model_len(self) -> int:
        assert self.model_config.max_model_len is not None, "EngineConfig not finalized"
        return self.model_config.max_model_len

    def finalize(self, platform: Platform) -> EngineConfig:
        """Fill model-derived defaults, apply level and platform policy, then validate.

        Idempotent for the same platform. Raises ValueError listing every problem.
        """
        if self.finalized and self.platform_name == platform.name:
            return self
        problems = self.check(platform)
        if problems:
            raise ValueError("invalid engine configuration:\n  - " + "\n  - ".join(problems))
        self.finalized = True
        return self

    def check(self, platform: Platform, load_model: bool = True) -> list[str]:
        """Complete the config for ``platform`` and return every problem (empty when valid).

        With ``load_model=False`` (or when the model's config cannot be read)
        only the checks that do not need the model run; the unreadable model is
        itself reported as a problem when ``load_model`` is True.
        """
        from backplane.config.levels import apply_optimization_level
        from backplane.config.policy_view import run_platform_policy

        self.notes.clear()
        self.platform_name = platform.name
        problems = self.problems()
        mc, sc = self.model_config, self.scheduler_config
        if load_model and not generation_config_problems(mc.generation_config, None):
            problems += self._generation_defaults_problems()

        model_limit = None
        if load_model and mc.hf_config is None:
            try:
                from backplane.core.loader.hf_config import load_hf_config

                mc.hf_config = load_hf_config(mc.model, trust_remote_code=mc.trust_remote_code)
            except Exception as exc:  # noqa: BLE001 - reported with the rest, not raised alone
                problems.append(f"model {mc.model!r}: cannot read its config ({exc})")
            else:
                problems += apply_hf_overrides(mc.hf_config, mc.hf_overrides)
        hf = mc.hf_config

        dtype_problem = self._resolve_dtype(platform)
        if dtype_problem:
            problems.append(dtype_problem)
        if hf is not None:
            model_limit = _context_limit(hf)
            if mc.max_model_len is None:
                if model_limit is None:
                    problems.append(
                        "max_model_len is not set and the model config has no "
                        "max_position_embeddings; set --max-model-len"
                    )
                else:
                    # The unscaled limit: within it dynamic rope equals transformers exactly.
                    mc.max_model_len = int(hf.max_position_embeddings)
            elif model_limit is not None and mc.max_model_len > model_limit:
                problems.append(
                    f"max_model_len ({mc.max_model_len}) exceeds the model's "
                    + (f"max_position_embeddings ({model_limit})" if not _dynamic_factor(hf) else
                       f"context limit ({model_limit}: max_position_embeddings "
                       f"{hf.max_position_embeddings} x dynamic rope factor "
                       f"{_dynamic_factor(hf):g})")
                    + "; lower --max-model-len"
                )
        if sc.max_num_batched_tokens is None and (
            mc.max_model_len is not None or sc.enable_chunked_prefill
        ):
            sc.max_num_batched_tokens = (
                max(DEFAULT_MAX_NUM_BATCHED_TOKENS, sc.max_num_seqs)
                if sc.enable_chunked_prefill
                else max(mc.max_model_len, DEFAULT_MAX_NUM_BATCHED_TOKENS)
            )
            self.notes.append(f"max_num_batched_tokens defaults to {sc.max_num_batched_tokens}")
        elif hf is not None:
            problems += self._batched_tokens_problems()  # max_model_len may come from the model

        problems += apply_optimization_level(self, platform)
        try:
            # Through the SDK's PlatformConfigView; changed writable fields are copied back.
            decision = run_platform_policy(self, platform)
        except Exception as exc:  # noqa: BLE001 - a policy bug must not hide other problems
            problems.append(f"platform {platform.name!r} config policy failed: {exc}")
        else:
            self.notes += [f"platform {platform.name}: {c}" for c in decision.changes]
            problems += decision.refusals
        cc = self.cache_config
        if cc.memory_utilization is None:
            cc.memory_utilization = DEFAULT_MEMORY_UTILIZATION
            if cc.kv_cache_memory_bytes is None and cc.num_kv_blocks is None:
                self.notes.append(
                    f"memory_utilization defaults to {DEFAULT_MEMORY_UTILIZATION} of the "
                    "device's available memory"
                )
        if hf is not None:
            problems += self._model_problems(hf)
            from backplane.config.runner import runner_problems

            problems += runner_problems(mc.runner, mc.model, hf)
            problems += self._speculative_problems(hf)
            problems += self._quantization_problems(hf, platform)
            if self.lora_config is not None and self._runs_pooling():
                problems.append("enable_lora is not supported with the pooling runner: "
                                "adapters are applied to generating models only")
            if mc.torch_dtype is not None:
                problems += self._select_attention_backend(platform)
        problems += self._resolve_data_parallel(platform)
        problems += self._resolve_engine_process(platform)
        problems += self._resolve_async_scheduling(platform)
        for note in self.notes:
            logger.info("config: %s", note)
        # The same conflict may be found by two checks (e.g. core and policy).
        return list(dict.fromkeys(problems))

    @staticmethod
    def _policy_default(name: str, platform: Platform) -> tuple[bool, str]:
        """(value, who chose it) for an on/off setting the user left unset: the platform
        policy's ``default_<name>`` (SDK attribute, None = off)."""
        default = getattr(platform.config_policy, f"default_{name}", None)
        who = (f"platform {platform.name}'s default" if default is not None
               else "no platform default")
        return bool(default), who

    def _runs_pooling(self) -> bool:
        """Whether the model runs as a pooling model (False while that is unknown)."""
        from backplane.config.runner import resolve_runner

        mc = self.model_config
        if mc.hf_config is None:
            return False
        try:
            return resolve_runner(mc.runner, mc.model, mc.hf_config) == "pooling"
        except ValueError:
            return False  # the bad runner name is reported by runner_problems

    def _resolve_async_scheduling(self, platform: Platform) -> list[str]:
        """Set ``scheduler_config.async_scheduling`` (explicit, else the platform's default).

        Pooling models have no decode steps to overlap: an explicit request is
        refused, a platform default of True is overridden.
        """
        sc = self.scheduler_config
        if sc.async_scheduling is not None and not isinstance(sc.async_scheduling, bool):
            return [f"async_scheduling ({sc.async_scheduling!r}) must be true, false or unset"]
        pooling = self._runs_pooling()
        pp = self.parallel_config.pipeline_parallel_size
        pipeline = isinstance(pp, int) and pp > 1  # a bad value is reported on its own
        if sc.async_scheduling is None:
            sc.async_scheduling, who = self._policy_default("async_scheduling", platform)
            if pooling:
                sc.async_scheduling, who = False, "pooling models have no steps to overlap"
            elif pipeline and sc.async_scheduling:
                sc.async_scheduling, who = False, (
                    "pipeline parallel overlaps steps itself, with a batch in flight per stage")
            elif self.speculative_config is not None and sc.async_scheduling:
                sc.async_scheduling, who = False, (
                    "speculative decoding plans each step from the previous one's accepted "
                    "drafts")
            self.notes.append(
                f"async_scheduling defaults to {'on' if sc.async_scheduling else 'off'} ({who})")
        elif sc.async_scheduling and pooling:
            return ["async_scheduling (True) is not supported with the pooling runner: a "
                    "pooling model runs each request in one prefill-only pass, with no decode "
                    "steps to overlap; drop --async-scheduling"]
        elif sc.async_scheduling and pipeline:
            return [f"async_scheduling (True) cannot be combined with pipeline_parallel_size "
                    f"({self.parallel_config.pipeline_parallel_size}): the pipeline already "
                    "overlaps steps, with up to one batch in flight per stage; drop "
                    "--async-scheduling"]
        elif sc.async_scheduling and self.speculative_config is not None:
            return ["async_scheduling (True) cannot be combined with speculative_config: each "
                    "step's drafts depend on how many of the previous step's were accepted; "
                    "drop --async-scheduling or --speculative-config"]
        return []

    def _quantization_problems(self, hf, platform: Platform) -> list[str]:
        """--quantization must be a method the platform runs. A quantized checkpoint's
        ``quantization_config`` is detected (as vLLM does): GPTQ/AWQ 4-bit checkpoints set
        the method (an explicit --quantization must name the same one); other methods,
        bit widths or layouts are refused, naming what is unsupported."""
        from backplane.core.quantization.config import (
            CHECKPOINT_METHODS,
            UnsupportedQuantizationError,
            parse_quantization_config,
            quant_method,
        )

        mc = self.model_config
        method = mc.quantization
        checkpoint = getattr(hf, "quantization_config", None)
        out = []
        if checkpoint:
            name = quant_method(checkpoint)
            try:
                parse_quantization_config(checkpoint)
            except UnsupportedQuantizationError as exc:
                return [f"model {mc.model!r} is a quantized checkpoint "
                        f"(quantization_config.quant_method {name!r}) that Backplane cannot "
                        f"load: {exc}"]
            if method is None:
                mc.quantization = method = name
                self.notes.append(f"quantization {name!r} detected from the checkpoint's "
                                  "quantization_config")
            elif method != name:
                return [f"quantization ({method!r}) does not match the checkpoint: model "
                        f"{mc.model!r} is a {name!r} checkpoint (quantization_config."
                        f"quant_method); drop --quantization or pass {name!r}"]
        elif method in CHECKPOINT_METHODS:
            return [f"quantization ({method!r}) needs a {method} checkpoint, but model "
                    f"{mc.model!r} has no quantization_config in its config.json (use "
                    "--quantization int8 to quantize float weights at load)"]
        if method is None:
            return out
        if method in CHECKPOINT_METHODS and self.lora_config is not None:
            out.append(f"enable_lora is not supported with {method} checkpoints yet (LoRA "
                       "adapters apply to float linear layers)")
        if method not in QUANTIZATION_METHODS:
            out.append(f"quantization ({method!r}) is not supported; supported: "
                       f"{list(QUANTIZATION_METHODS)}")
        elif method not in getattr(platform, "supported_quantization", ()):
            why = getattr(platform, "quantization_unsupported_reason", lambda m: None)(method)
            out.append(f"quantization ({method!r}) has no kernel on platform "
                       f"{platform.name!r} (it runs: "
                       f"{list(getattr(platform, 'supported_quantization', ())) or 'none'})"
                       + (f": {why}" if why else ""))
        elif self.compilation_config.compile:
            out.append(f"quantization ({method!r}) runs on the platform's own kernels, which "
                       "torch.compile does not trace; use optimization level 0 (-O0)")
        return out

    def _speculative_problems(self, hf) -> list[str]:
        """Checks of speculative_config that need the target's config (and the draft's)."""
        spec = self.speculative_config
        if spec is None:
            return []
        if self._runs_pooling():
            return ["speculative_config is not supported with the pooling runner: pooling "
                    "models generate no tokens to speculate on"]
        if spec.method not in ("draft_model", "eagle", "eagle3"):
            return []
        from backplane.core.loader.hf_config import load_hf_config

        try:
            draft = load_hf_config(spec.model, trust_remote_code=False)
        except Exception as exc:  # noqa: BLE001 - reported with the rest
            return [f"speculative_config.model ({spec.model!r}): cannot read its config ({exc})"]
        target_vocab = getattr(hf, "vocab_size", None)
        if spec.method == "draft_model" and getattr(draft, "vocab_size", None) != target_vocab:
            return [f"speculative_config.model ({spec.model!r}) has vocab_size "
                    f"{getattr(draft, 'vocab_size', None)}, the target has {target_vocab}: a "
                    "draft model must share the target's tokenizer"]
        if spec.method != "draft_model" and getattr(draft, "hidden_size", None) != getattr(
                hf, "hidden_size", None):
            return [f"speculative_config.model ({spec.model!r}) has hidden_size "
                    f"{getattr(draft, 'hidden_size', None)}, the target has "
                    f"{getattr(hf, 'hidden_size', None)}: an {spec.method} head must be trained "
                    "for this target"]
        return []

    def _resolve_engine_process(self, platform: Platform) -> list[str]:
        """Set ``parallel_config.engine_process`` (explicit, else the platform's default).

        Pooling models run in-process only: an explicit request for an engine
        process is refused, a platform default of True is overridden with a note.
        """
        pc = self.parallel_config
        pooling = self._runs_pooling()
        explicit = pc.engine_process
        if explicit is not None and not isinstance(explicit, bool):
            return [f"engine_process ({explicit!r}) must be true, false or unset"]
        if explicit is None:
            pc.engine_process, who = self._policy_default("engine_process", platform)
            if pooling and pc.engine_process:
                pc.engine_process = False
                self.notes.append(
                    f"engine_process: off (platform {platform.name}'s default is on, but "
                    "pooling models run in-process)"
                )
            else:
                self.notes.append(
                    f"engine_process defaults to {'on' if pc.engine_process else 'off'} ({who})"
                )
            return []
        if explicit and pooling:
            return [
                "engine_process (True) is not supported with the pooling runner: pooling "
                "models run in the front-end process; drop --engine-process (or use "
                "--no-engine-process)"
            ]
        self.notes.append(f"engine_process: {'on' if explicit else 'off'} (set explicitly)")
        return []

    def problems(self, model_limit: int | None = None) -> list[str]:
        """Checks that need neither the model nor a platform (ranges, names, combinations)."""
        mc, cc, sc, pc = (
            self.model_config, self.cache_config, self.scheduler_config, self.parallel_config
        )
        out = []
        if mc.max_model_len is not None and mc.max_model_len < 1:
            out.append(f"max_model_len ({mc.max_model_len}) must be >= 1")
        if cc.block_size < 1:
            out.append(f"block_size ({cc.block_size}) must be >= 1")
        if cc.memory_utilization is not None and not 0.0 < cc.memory_utilization <= 1.0:
            out.append(f"memory_utilization ({cc.memory_utilization}) must be in (0, 1]")
        if cc.kv_cache_memory_bytes is not None and cc.kv_cache_memory_bytes < 1:
            out.append(f"kv_cache_memory_bytes ({cc.kv_cache_memory_bytes}) must be >= 1")
        if cc.num_kv_blocks is not None and cc.num_kv_blocks < 1:
            out.append(f"num_kv_blocks ({cc.num_kv_blocks}) must be >= 1")
        if cc.kv_cache_dtype not in KNOWN_KV_CACHE_DTYPES:
            out.append(
                f"kv_cache_dtype ({cc.kv_cache_dtype!r}) is not one of {list(KNOWN_KV_CACHE_DTYPES)}"
            )
        elif cc.calculate_kv_scales and not cc.kv_cache_dtype.startswith("fp8"):
            # Scales only exist for an fp8 cache; silently ignoring the flag would hide
            # that the run is not the quantized one the user meant.
            out.append(
                f"calculate_kv_scales (True) needs an fp8 kv_cache_dtype (fp8, fp8_e4m3 or "
                f"fp8_e5m2), got kv_cache_dtype {cc.kv_cache_dtype!r}"
            )
        if self.load_config.load_format not in LOAD_FORMATS:
            out.append(
                f"load_format ({self.load_config.load_format!r}) is not one of "
                f"{list(LOAD_FORMATS)}; convert the checkpoint to safetensors"
            )
        if mc.dtype != "auto":
            try:
                parse_dtype(mc.dtype)
            except ValueError as exc:
                out.append(str(exc))
        if sc.max_num_seqs < 1:
            out.append(f"max_num_seqs ({sc.max_num_seqs}) must be >= 1")
        if sc.scheduling_policy not in ("fcfs", "priority"):
            out.append(
                f"scheduling_policy ({sc.scheduling_policy!r}) must be 'fcfs' or 'priority'"
            )
        for name in ("tensor_parallel_size", "pipeline_parallel_size"):
            if getattr(pc, name) < 1:
                out.append(f"{name} ({getattr(pc, name)}) must be >= 1")
        if mc.max_logprobs < -1:
            out.append(f"max_logprobs ({mc.max_logprobs}) must be -1 (no limit) or >= 0")
        if mc.revision is not None:
            out.append(
                f"revision ({mc.revision!r}) is not supported: Backplane loads local model "
                "directories only; check out that revision and pass its directory"
            )
        if self.load_config.download_dir is not None:
            out.append(
                f"download_dir ({self.load_config.download_dir!r}) is not supported: Backplane "
                "never downloads weights; pass a local model directory"
            )
        if mc.max_seq_len_to_capture is not None:
            out.append(
                f"max_seq_len_to_capture ({mc.max_seq_len_to_capture}) is not supported: "
                "Backplane's decode graphs read the block table and sequence lengths from "
                "buffers sized for max_model_len, so they replay any length and there is "
                "nothing to limit (vLLM V1 deprecated the option too)"
            )
        out += self._parallel_problems()
        out += self._data_parallel_problems()
        if self.optimization_level is not None and self.optimization_level not in (0, 1, 2, 3):
            out.append(f"optimization_level ({self.optimization_level}) must be 0, 1, 2 or 3")
        out += generation_config_problems(mc.generation_config, mc.override_generation_config)
        out += self._batched_tokens_problems()
        return out

    def _parallel_problems(self) -> list[str]:
        """The executor for the world size (default: in-process for one rank, ``mp`` for
        more), and the features a split model does not run yet."""
        pc = self.parallel_config
        world = max(1, pc.tensor_parallel_size) * max(1, pc.pipeline_parallel_size)
        if pc.distributed_executor_backend is None:
            pc.distributed_executor_backend = "uni" if world == 1 else "mp"
            self.notes.append(f"distributed_executor_backend defaults to "
                              f"{pc.distributed_executor_backend!r} (world size {world})")
        backend = pc.distributed_executor_backend
        if backend not in EXECUTOR_BACKENDS:
            return [f"distributed_executor_backend ({backend!r}) must be one of "
                    f"{list(EXECUTOR_BACKENDS)}"]
        if world == 1:
            return []
        out = []
        if backend == "uni":
            out.append(
                f"distributed_executor_backend 'uni' runs one rank in this process, but "
                f"tensor_parallel_size ({pc.tensor_parallel_size}) x pipeline_parallel_size "
                f"({pc.pipeline_parallel_size}) = {world}; use 'mp' (this host), 'ray' or "
                "'external_launcher' (torchrun)")
        split = (f"with tensor_parallel_size {pc.tensor_parallel_size} x "
                 f"pipeline_parallel_size {pc.pipeline_parallel_size}")
        if self.speculative_config is not None:
            out.append(f"speculative_config is not supported {split} yet: the draft would "
                       "need the same split; use tensor_parallel_size and "
                       "pipeline_parallel_size 1")
        if self.lora_config is not None:
            out.append(f"enable_lora is not supported {split} yet: adapter weights are not "
                       "split over ranks")
        if self.model_config.quantization is not None:
            out.append(f"quantization ({self.model_config.quantization!r}) is not supported "
                       f"{split} yet: quantized layers are not split over ranks")
        return out

    def _data_parallel_problems(self) -> list[str]:
        """data_parallel_size: a whole number >= 1; above 1 not with external_launcher
        (torchrun starts one program per rank, there is no front-end to balance)."""
        pc = self.parallel_config
        dp = pc.data_parallel_size
        if isinstance(dp, bool) or not isinstance(dp, int) or dp < 1:
            return [f"data_parallel_size ({dp!r}) must be an integer >= 1"]
        if dp > 1 and pc.distributed_executor_backend == "external_launcher":
            return [f"data_parallel_size ({dp}) is not supported with "
                    "distributed_executor_backend 'external_launcher': torchrun starts every "
                    "rank as the same program, with no front-end to balance requests over "
                    "engine cores; use the 'mp' or 'ray' backend, or data_parallel_size 1"]
        return []

    def _resolve_data_parallel(self, platform: Platform) -> list[str]:
        """Above one engine core: each runs in its own process (engine_process is implied,
        an explicit False refused), the model must generate (the pooling runner runs
        in-process), and a platform with devices must have one per rank of every core."""
        pc = self.parallel_config
        dp = pc.data_parallel_size
        if isinstance(dp, bool) or not isinstance(dp, int) or dp <= 1:
            return []
        if self._runs_pooling():
            return [f"data_parallel_size ({dp}) is not supported with the pooling runner: "
                    "pooling models run in the front-end process, with no engine core to "
                    "replicate; use data_parallel_size 1"]
        out = []
        if pc.engine_process is False:
            out.append(f"data_parallel_size ({dp}) runs each engine core in its own process, "
                       "but engine_process is False; drop --no-engine-process")
        elif pc.engine_process is None:
            pc.engine_process = True
            self.notes.append(f"engine_process: on (data_parallel_size {dp} runs each engine "
                              "core in its own process)")
        world = max(1, pc.tensor_parallel_size) * max(1, pc.pipeline_parallel_size)
        runtime = platform.runtime
        if getattr(runtime, "device_type", "cpu") != "cpu":
            try:
                visible = int(runtime.device_count())
            except Exception:  # noqa: BLE001 - the platform reports its own device problems
                visible = None
            if visible is not None and dp * world > visible:
                out.append(f"data_parallel_size ({dp}) x tensor_parallel_size "
                           f"({pc.tensor_parallel_size}) x pipeline_parallel_size "
                           f"({pc.pipeline_parallel_size}) = {dp * world} exceeds the "
                           f"{visible} device(s) visible to platform {platform.name!r}")
        return out

    def _generation_defaults_problems(self) -> list[str]:
        """Problems of the sampling defaults the model's (or the chosen) file sets."""
        mc = self.model_config
        source = mc.generation_config
        if source == "vllm":
            return []
        where = mc.model if source == "auto" else source
        try:
            defaults = generation_defaults(where, "auto")
        except (OSError, ValueError) as exc:
            return [f"generation_config: cannot read {where}/generation_config.json ({exc})"]
        return sampling_defaults_problems(defaults, f"{where}/generation_config.json")

    def _batched_tokens_problems(self) -> list[str]:
        mc, sc = self.model_config, self.scheduler_config
        if sc.max_num_batched_tokens is None:
            return []
        if sc.max_num_batched_tokens < 1:
            return [f"max_num_batched_tokens ({sc.max_num_batched_tokens}) must be >= 1"]
        if (
            not sc.enable_chunked_prefill
            and mc.max_model_len is not None
            and sc.max_num_batched_tokens < mc.max_model_len
        ):
            return [
                f"max_num_batched_tokens ({sc.max_num_batched_tokens}) is smaller than "
                f"max_model_len ({mc.max_model_len}) with chunked prefill disabled: a long "
                "prompt could never be scheduled; enable chunked prefill or raise "
                "max_num_batched_tokens"
            ]
        return []

    def _resolve_dtype(self, platform: Platform) -> str | None:
        """Set model_config.torch_dtype; return a problem message when impossible."""
        mc = self.model_config
        supported = platform.runtime.supported_dtypes
        names = [str(d).removeprefix("torch.") for d in supported]
        if mc.dtype == "auto":
            if mc.hf_config is None:
                return None  # decided once the model is known
            # `dtype` first: transformers 5 warns when `torch_dtype` is read.
            ckpt = getattr(mc.hf_config, "dtype", None) or getattr(
                mc.hf_config, "torch_dtype", None
            )
            try:
                resolved = parse_dtype(ckpt) if ckpt is not None else torch.float32
            except ValueError:
                resolved = platform.runtime.default_dtype()
            if resolved not in supported:
                fallback = platform.runtime.default_dtype()
                self.notes.append(
                    f"dtype auto: the checkpoint's {resolved} is not supported by platform "
                    f"{platform.name!r}; using {fallback}"
                )
                resolved = fallback
            mc.torch_dtype = resolved
            return None
        try:
            resolved = parse_dtype(mc.dtype)
        except ValueError:
            return None  # reported by problems()
        if resolved not in supported:
            return (
                f"dtype {mc.dtype!r} is not supported by platform {platform.name!r}; "
                f"supported: {names} (or 'auto')"
            )
        mc.torch_dtype = resolved
        return None

    def _model_problems(self, hf: Any) -> list[str]:
        """Checks of the parallel layout against the model's shape."""
        pc = self.parallel_config
        out = []
        tp = pc.tensor_parallel_size
        heads = getattr(hf, "num_attention_heads", None)
        kv_heads = getattr(hf, "num_key_value_heads", None) or heads
        if tp > 1 and heads:
            if heads % tp:
                out.append(
                    f"tensor_parallel_size ({tp}) must divide num_attention_heads ({heads}); "
                    f"use one of {[d for d in range(1, heads + 1) if heads % d == 0]}"
                )
            elif kv_heads and kv_heads % tp and tp % kv_heads:
                out.append(
                    f"tensor_parallel_size ({tp}) and num_key_value_heads ({kv_heads}) must "
                    "divide one another"
                )
        layers = getattr(hf, "num_hidden_layers", None)
        if layers and pc.pipeline_parallel_size > layers:
            out.append(
                f"pipeline_parallel_size ({pc.pipeline_parallel_size}) exceeds "
                f"num_hidden_layers ({layers})"
            )
        return out

    def attention_spec(self) -> AttentionSpec:
        """The AttentionSpec of the model as configured (needs the HF config and dtype)."""
        from backplane.config.attention_spec import attention_spec_from_config

        return attention_spec_from_config(self)

    def _select_attention_backend(self, platform: Platform) -> list[str]:
        try:
            spec = self.attention_spec()
        except ValueError as exc:
            return [str(exc)]
        try:
            backend = platform.select_attention_backend(
                spec, forced=self.device_config.attention_backend
            )
        except ValueError as exc:
            return [
                f"attention: {exc}. Change the setting named in the reason (e.g. --block-size, "
                "--kv-cache-dtype, --dtype) or pick another backend with --attention-backend"
            ]
        self.attention_backend_name = backend.name
        return []

    def compute_hash(self) -> str:
        """Stable sha256 of what changes compiled artefacts or numerics (see config.hashing)."""
        from backplane.config.hashing import compute_config_hash

        return compute_config_hash(self)

    def pad_for_graph(self, batch_size: int) -> int | None:
        """Smallest captured graph batch size >= ``batch_size``; None when no graph fits."""
        sizes = self.compilation_config.graph_capture_sizes
        if not self.compilation_config.use_graphs or not sizes:
            return None
        return next((s for s in sizes if s >= batch_size), None)


def apply_hf_overrides(hf_config: Any, overrides: dict[str, Any] | None) -> list[str]:
    """Set ``overrides`` on the HF config (``--hf-overrides``); problems for unknown keys.

    A mapping value for an attribute that is itself a config (``text_config``)
    is applied inside it. Keys the config does not have are refused: an
    override that nothing reads would be silently ignored.
    """
    problems = []
    for key, value in (overrides or {}).items():
        current = getattr(hf_config, key, _MISSING)
        if current is _MISSING:
            problems.append(f"hf_overrides: the model config has no attribute {key!r}")
        elif isinstance(value, dict) and hasattr(current, "to_dict"):
            problems += apply_hf_overrides(current, value)
        else:
            setattr(hf_config, key, value)
    return problems


_MISSING = object()


def _dynamic_factor(hf: Any) -> float | None:
    """The factor of dynamic-NTK rope scaling, when the model uses it."""
    from backplane.core.layers.rotary import rope_parameters

    try:
        params = rope_parameters(hf)
    except (ValueError, TypeError, KeyError):
        return None  # reported where the rope parameters are checked
    if params.get("rope_type") == "dynamic" and params.get("factor"):
        return float(params["factor"])
    return None


def _context_limit(hf: Any) -> int | None:
    """Longest max_model_len the model supports: max_position_embeddings, times the
    factor for dynamic-NTK rope (as vLLM computes it; the default stays unscaled)."""
    limit = getattr(hf, "max_position_embeddings", None)
    if limit is None:
        return None
    factor = _dynamic_factor(hf)
    return int(limit * factor) if factor else int(limit)
