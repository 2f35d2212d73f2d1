"""LLMEngine: tokenization, validation and output processing around EngineCore."""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass

from backplane.config import EngineArgs, EngineConfig
from backplane.config.resolve import ResolvedConfig, resolve
from backplane.core.engine.core_client import EngineCoreClient, InprocClient, MPClient
from backplane.core.engine.dp_client import DPClient
from backplane.core.engine.engine_core import EngineCore
from backplane.core.engine.output_processor import OutputProcessor, RequestState
from backplane.core.scheduler.request import Request, RequestStatus
from backplane.inputs import ParsedPrompt, PromptType, parse_prompt
from backplane.outputs import RequestOutput
from backplane.pooling_params import PoolingParams
from backplane.sampling_params import SamplingParams

logger = logging.getLogger(__name__)



@dataclass
class EngineStats:
    """A snapshot of the engine's load and cache state."""

    num_running: int
    num_waiting: int
    num_total_blocks: int
    num_free_blocks: int
    kv_cache_usage: float
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    block_size: int
    num_generated_tokens: int = 0
    # Speculative decoding counters (`SpecDecodeStats` as a dict); None when it is off.
    spec_decode: dict | None = None
    # Data parallel: each rank's own numbers (the fields above, as a dict), rank order;
    # the fields above are then the totals. None with one engine core.
    dp_ranks: list[dict] | None = None

    @property
    def spec_acceptance_rate(self) -> float | None:
        """Accepted draft tokens / verified draft tokens (None when speculation is off)."""
        if self.spec_decode is None:
            return None
        drafted = self.spec_decode["num_draft_tokens"]
        return self.spec_decode["num_accepted_tokens"] / drafted if drafted else 0.0

    @property
    def spec_mean_accepted_length(self) -> float | None:
        """Tokens per verification: accepted drafts + the sampled one (None when off)."""
        if self.spec_decode is None:
            return None
        drafts = self.spec_decode["num_drafts"]
        return 1 + self.spec_decode["num_accepted_tokens"] / drafts if drafts else 0.0


def _child_id(request_id: str, index: int, n: int) -> str:
    return request_id if n == 1 else f"{request_id}#{index}"


class LLMEngine:
    """Synchronous engine: add requests, call `step()` until none are left."""

    def __init__(self, config: EngineConfig | ResolvedConfig) -> None:
        from backplane.core.loader.tokenizer import load_tokenizer
        from backplane.platforms import log_platform_choice, resolve_platform

        self._load_general_plugins()
        # The device option selects the platform (and the log names who asked for it);
        # an EngineConfig is then resolved for it, a ResolvedConfig already was.
        device = config.device_config.device
        self.platform = resolve_platform(device)
        log_platform_choice(device)  # which platform, and asked by whom
        self.config = (
            config if isinstance(config, ResolvedConfig) else resolve(config, self.platform)
        )
        mc = self.config.model_config
        self.tokenizer = load_tokenizer(
            mc.tokenizer_path, trust_remote_code=mc.trust_remote_code,
            use_fast=mc.tokenizer_mode != "slow",
        )
        # Unseeded sampling draws from the global generator: --seed makes runs repeatable.
        self.platform.runtime.seed_everything(mc.seed)
        self.eos_token_ids = self._eos_token_ids()
        from backplane.config.runner import resolve_runner

        # "generate" or "pooling" (--runner; auto: detected from the checkpoint).
        self.runner_type = resolve_runner(mc.runner, mc.model, mc.hf_config)
        # The generate runner's engine core, behind a client: in this process, or in
        # a child process (--engine-process) fed over ZMQ. engine_core is the
        # in-process core object itself (None when it runs in the child).
        self.core: EngineCoreClient | None = None
        if self.runner_type == "pooling":
            from backplane.core.pooling.engine_core import PoolingEngineCore

            self.engine_core = PoolingEngineCore(self.config, self.platform)
        elif self.config.parallel_config.data_parallel_size > 1:
            # K engine cores, each in its own process; requests balanced by load.
            self.engine_core = None
            self.core = DPClient(self.config, self.platform)
        elif self.config.parallel_config.engine_process:
            self.engine_core = None
            self.core = MPClient(self.config)
        else:
            self.engine_core = EngineCore(self.config, self.platform, tokenizer=self.tokenizer)
            self.core = InprocClient(self.engine_core)
        # A cross-encoder (sequence classification) scores text pairs (LLM.score, /score).
        self.is_cross_encoder = bool(getattr(self.engine_core, "is_cross_encoder", False))
        self.output_processor = OutputProcessor(self.tokenizer)
        self._structured_validator = None  # built at the first structured-output request
        self.vocab_size = self.config.model_spec.vocab_size
        self._log_generation_defaults()
        self._seq_ids: dict[str, list[str]] = {}
        self._num_generated_tokens = 0

    def _log_generation_defaults(self) -> None:
        """Say which sampling defaults apply to fields a request leaves unset."""
        mc = self.config.model_config
        defaults = self.config.model_spec.sampling_defaults
        source = {
            "auto": "the model's generation_config.json",
            "vllm": "none (--generation-config vllm)",
        }.get(mc.generation_config, f"{mc.generation_config}/generation_config.json")
        if mc.override_generation_config:
            source += " + --override-generation-config"
        if defaults:
            logger.info(
                "default sampling parameters (from %s) for fields a request leaves unset: %s "
                "(--generation-config vllm ignores the model's)", source,
                ", ".join(f"{k}={v!r}" for k, v in sorted(defaults.items())),
            )
        else:
            logger.info("default sampling parameters: Backplane's own (%s sets none)", source)

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> LLMEngine:
        """Build the engine: the options are resolved for the selected platform first."""
        return cls(args.create_engine_config())

    @staticmethod
    def _load_general_plugins() -> None:
        try:
            from backplane.plugins import load_general_plugins
        except ImportError:  # general plugin support not installed in this tree
            return
        load_general_plugins()

    def _eos_token_ids(self) -> frozenset[int]:
        """The model's EOS ids (config and generation_config) plus the tokenizer's."""
        ids = set(self.config.model_spec.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return frozenset(ids)

    @property
    def max_model_len(self) -> int:
        return self.config.max_model_len

    @property
    def max_logprobs(self) -> int:
        """Most logprobs per position a request may ask for (--max-logprobs; -1: vocab)."""
        limit = self.config.model_config.max_logprobs
        return self.vocab_size if limit == -1 else limit

    # ------------------------------------------------------------------ input
    def tokenize_prompt(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        """(prompt text or None, token ids); raises ValueError/TypeError for unusable prompts."""
        return self._tokenize(parse_prompt(prompt))

    def _tokenize(self, parsed: ParsedPrompt) -> tuple[str | None, list[int]]:
        if parsed.token_ids is None:
            token_ids = self.tokenizer.encode(parsed.text)
        else:
            token_ids = parsed.token_ids
            bad = [t for t in token_ids if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(
                    f"prompt token id {bad[0]} is out of range: must be in [0, {self.vocab_size})"
                )
        if not token_ids:
            raise ValueError("prompt is empty: it must contain at least one token")
        return parsed.text, token_ids

    def validate_lengths(self, num_prompt_tokens: int, params: SamplingParams) -> None:
        limit = self.max_model_len
        if num_prompt_tokens >= limit:
            raise ValueError(
                f"prompt ({num_prompt_tokens} tokens) is too long: it must be shorter than "
                f"max_model_len ({limit}) to leave room for at least one generated token"
            )
        if params.max_tokens is not None and num_prompt_tokens + params.max_tokens > limit:
            raise ValueError(
                f"max_tokens ({params.max_tokens}) + prompt ({num_prompt_tokens} tokens) = "
                f"{params.max_tokens + num_prompt_tokens} exceeds max_model_len ({limit})"
            )
        limit = self.max_logprobs
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(params, name)
            if value is not None and value > limit:
                raise ValueError(
                    f"{name} ({value}) exceeds the maximum of {limit} (--max-logprobs)"
                )
        bad_bias = [t for t in (params.logit_bias or {}) if t >= self.vocab_size]
        if bad_bias:
            raise ValueError(
                f"logit_bias token id {bad_bias[0]} is out of range: must be < {self.vocab_size}"
            )
        bad_allowed = [t for t in params.allowed_token_ids or () if t >= self.vocab_size]
        if bad_allowed:
            raise ValueError(
                f"allowed_token_ids contains token id {bad_allowed[0]}, outside the vocabulary "
                f"[0, {self.vocab_size})"
            )
        bad_stop = [t for t in params.stop_token_ids if t >= self.vocab_size]
        if bad_stop:
            raise ValueError(
                f"stop_token_ids contains token id {bad_stop[0]}, outside the vocabulary "
                f"[0, {self.vocab_size})"
            )

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams,
                    priority: int = 0, arrival_time: float | None = None,
                    lora_request=None) -> None:
        """Queue a request; raises ValueError/TypeError (engine untouched) when it is invalid.

        ``prompt`` is a string, token ids, or a TextPrompt/TokensPrompt dict
        (`backplane.inputs`), whose ``cache_salt`` keeps its KV blocks apart
        from requests with another salt. ``lora_request`` (a
        `backplane.lora.LoRARequest`) runs the request with that adapter.
        """
        if self.runner_type == "pooling" or isinstance(params, PoolingParams):
            self._add_pooling_request(request_id, prompt, params)
            return
        if not isinstance(params, SamplingParams):
            raise TypeError(
                f"sampling params must be a SamplingParams, got {type(params).__name__}"
            )
        if request_id in self._seq_ids:
            raise ValueError(f"request_id {request_id!r} is already in use")
        self.validate_lora_request(lora_request)
        parsed = parse_prompt(prompt)
        text, token_ids = self._tokenize(parsed)
        self.validate_lengths(len(token_ids), params)
        self.validate_structured_outputs(params)
        params = copy.copy(params)
        params.eos_token_ids = self.eos_token_ids
        params.bad_words_token_ids = self._bad_words_token_ids(params.bad_words)
        params.all_stop_token_ids = set(params.stop_token_ids)
        arrival = time.monotonic() if arrival_time is None else arrival_time
        sequences, seq_ids = [], []
        for index in range(params.n):
            child = params.clone_for_child(index) if params.n > 1 else params
            seq_id = _child_id(request_id, index, params.n)
            sequences.append(
                self.output_processor.new_sequence(seq_id, index, child, token_ids)
            )
            seq_ids.append(seq_id)
        self.output_processor.add_request(RequestState(
            request_id, text, token_ids, sequences, arrival_time=arrival,
        ))
        self.core.add_requests([
            Request(
                seq.seq_id, token_ids, seq.params, self.max_model_len,
                eos_token_ids=self.eos_token_ids, priority=priority, arrival_time=arrival,
                cache_salt=parsed.cache_salt, lora_request=lora_request,
            )
            for seq in sequences
        ])
        self._seq_ids[request_id] = seq_ids

    def validate_lora_request(self, lora_request) -> None:
        """Raise ValueError (a 400) for an adapter that cannot be served: LoRA not enabled,
        or an adapter whose config breaks a limit (rank, bias, targets). Weights are read,
        and matched against the model, by the engine core off its step loop."""
        if lora_request is None:
            return
        from backplane.lora import LoRARequest, check_adapter_config

        if not isinstance(lora_request, LoRARequest):
            raise TypeError(f"lora_request must be a LoRARequest, got "
                            f"{type(lora_request).__name__}")
        lc = self.config.lora_config
        if lc is None:
            raise ValueError(f"lora_request ({lora_request.lora_name!r}) needs an engine "
                             "started with enable_lora (--enable-lora)")
        check_adapter_config(lora_request.lora_path, max_rank=lc.max_lora_rank)

    def validate_structured_outputs(self, params: SamplingParams) -> None:
        """Raise ValueError (a 400) for a schema, regex or grammar that cannot be used.

        Checked here, before the request is queued. In one process the engine core's
        grammar manager does it (one cache); an engine-core process compiles with its
        own afterwards.
        """
        constraint = params.structured_outputs
        if constraint is None:
            return
        if self._structured_validator is None and self.engine_core is not None:
            self._structured_validator = self.engine_core.structured_outputs
        if self._structured_validator is None:
            from backplane.core.structured_outputs import StructuredOutputManager

            self._structured_validator = StructuredOutputManager(
                self.tokenizer, self.vocab_size,
                default_backend=self.config.structured_outputs_config.backend,
                eos_token_ids=sorted(self.eos_token_ids))
        self._structured_validator.validate(constraint)

    def _add_pooling_request(self, request_id: str, prompt: PromptType, params) -> None:
        """Queue a pooling (embed / encode) request; ValueError when the model cannot pool."""
        if self.runner_type != "pooling":
            raise ValueError(
                f"model {self.config.model_spec.architecture} runs as a generation model "
                "(--runner generate): it cannot compute embeddings; start the engine with "
                "--runner pooling"
            )
        if not isinstance(params, PoolingParams):
            raise ValueError(
                f"model {self.config.model_spec.architecture} runs as a pooling model "
                "(--runner pooling): it computes embeddings, not text; use LLM.embed / "
                "LLM.encode (or /v1/embeddings, /pooling) instead of generation"
            )
        if request_id in self._seq_ids:
            raise ValueError(f"request_id {request_id!r} is already in use")
        token_type_ids = None
        if isinstance(prompt, dict) and "token_type_ids" in prompt:
            # A cross-encoder's text pair: token ids with their segment ids.
            prompt = dict(prompt)
            token_type_ids = [int(t) for t in prompt.pop("token_type_ids")]
        parsed = parse_prompt(prompt)
        text, token_ids = self._tokenize(parsed)
        if token_type_ids is not None and len(token_type_ids) != len(token_ids):
            raise ValueError(f"token_type_ids has {len(token_type_ids)} entries for "
                             f"{len(token_ids)} tokens")
        if len(token_ids) > self.max_model_len:
            raise ValueError(
                f"prompt ({len(token_ids)} tokens) is longer than max_model_len "
                f"({self.max_model_len})"
            )
        self.engine_core.check_params(params)
        from backplane.core.pooling.engine_core import PoolingRequest

        self.engine_core.add_request(PoolingRequest(request_id, text, token_ids, params,
                                                    token_type_ids))
        self._seq_ids[request_id] = [request_id]

    def _bad_words_token_ids(self, words: list[str] | None) -> list[list[int]]:
        """Each bad word as token ids, alone and after a space (as it appears mid-text)."""
        out: list[list[int]] = []
        for word in words or ():
            for text in (word, " " + word.lstrip()):
                ids = list(self.tokenizer.encode(text, add_special_tokens=False))
                if ids and ids not in out:
                    out.append(ids)
        return out

    # ------------------------------------------------------------------- step
    def step(self) -> list[RequestOutput]:
        if self.runner_type == "pooling":
            pooled = self.engine_core.step()
            for out in pooled:
                self._seq_ids.pop(out.request_id, None)
            return pooled
        core_outputs = self.core.step()
        self._num_generated_tokens += sum(len(o.new_token_ids) for o in core_outputs)
        outputs, stopped = self.output_processor.process(core_outputs)
        if stopped:
            self.core.finish_requests(stopped, RequestStatus.FINISHED_STOPPED)
        for out in outputs:
            if out.finished:
                self._seq_ids.pop(out.request_id, None)
        return outputs

    def abort_request(self, request_ids: list[str]) -> list[RequestOutput]:
        """Stop requests now and free their KV blocks; returns their final outputs."""
        if self.runner_type == "pooling":
            for request_id in request_ids:
                self._seq_ids.pop(request_id, None)
            self.engine_core.abort(request_ids)
            return []
        finals = []
        for request_id in request_ids:
            seq_ids = self._seq_ids.pop(request_id, None)
            if seq_ids is None:
                continue
            self.core.finish_requests(seq_ids, RequestStatus.FINISHED_ABORTED)
            final = self.output_processor.abort(request_id)
            if final is not None:
                finals.append(final)
        return finals

    def has_unfinished_requests(self) -> bool:
        core = self.engine_core if self.core is None else self.core
        return bool(self._seq_ids) or core.has_unfinished_requests()

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix; False (nothing changed) while a request holds KV blocks."""
        if self.runner_type == "pooling":
            return False  # no KV cache: nothing is cached
        return self.core.reset_prefix_cache()

    def get_num_unfinished_requests(self) -> int:
        return len(self._seq_ids)

    def get_stats(self) -> EngineStats:
        if self.runner_type == "pooling":
            return EngineStats(
                num_running=0, num_waiting=self.engine_core.num_waiting, num_total_blocks=0,
                num_free_blocks=0, kv_cache_usage=0.0, prefix_cache_queries=0,
                prefix_cache_hits=0, num_preemptions=0,
                block_size=self.config.cache_config.block_size,
            )
        # In the engine process's case, the snapshot sent with its latest message.
        return EngineStats(**self.core.stats(), num_generated_tokens=self._num_generated_tokens)

    @property
    def last_step_timing(self):
        """Timing of the most recent step (total vs model forward), for benchmarks; None
        with data-parallel engine cores, which each step on their own (a front-end step
        only collects what they sent, so no one model step belongs to it)."""
        if self.core is None:
            return self.engine_core.last_step
        if isinstance(self.core, DPClient):
            return None
        return self.core.last_step

    @property
    def engine_pid(self) -> int | None:
        """Pid of the engine-core process (--engine-process); None when it runs in this one."""
        return None if self.core is None else self.core.engine_pid

    def check_engine_alive(self) -> None:
        """Raise EngineDeadError when the engine core (process) can no longer serve."""
        if self.core is not None:
            self.core.check_alive()

    def shutdown(self) -> None:
        """Stop the engine-core process, if there is one (idempotent)."""
        if self.core is not None:
            self.core.shutdown()
