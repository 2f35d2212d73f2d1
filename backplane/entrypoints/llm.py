"""The offline API: `LLM(model=...).generate(prompts, sampling_params)` and `.chat(...)`."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from backplane.beam_search import (
    BeamSearch,
    BeamSearchOutput,
    check_beam_width,
    run_beam_search,
    step_result,
)
from backplane.config import EngineArgs
from backplane.config.sources import engine_args_from_sources
from backplane.core.engine.llm_engine import LLMEngine
from backplane.inputs import PromptType, parse_prompt
from backplane.outputs import (
    EmbeddingRequestOutput,
    PoolingRequestOutput,
    RequestOutput,
    ScoringOutput,
    ScoringRequestOutput,
)
from backplane.pooling_params import PoolingParams
from backplane.sampling_params import BeamSearchParams, SamplingParams


class LLM:
    """An engine for offline batch generation, with vLLM's constructor and methods.

    Keyword arguments are EngineArgs fields (model, dtype, max_model_len,
    block_size, enable_prefix_caching, max_num_seqs, max_num_batched_tokens,
    seed, device, ...). Unknown keywords raise ValueError naming them and the
    closest known options.
    """

    def __init__(self, model: str, **kwargs: Any) -> None:
        engine_args = self._engine_args(model, kwargs)
        self.llm_engine = LLMEngine.from_engine_args(engine_args)
        self._counter = itertools.count()

    @staticmethod
    def _engine_args(model: str, kwargs: dict[str, Any]) -> EngineArgs:
        # Keyword arguments rank with CLI flags: above BACKPLANE_* variables, a
        # config file and the defaults (docs/configuration.md).
        return engine_args_from_sources(kwargs={"model": model, **kwargs})

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        priority: Sequence[int] | None = None,
        lora_request=None,
    ) -> list[RequestOutput]:
        """Generate completions for every prompt; outputs come back in input order.

        ``lora_request``: a `backplane.lora.LoRARequest` for every prompt, or one per
        prompt (None entries use the base model); needs ``enable_lora``.

        ``prompts`` may be a string, a list of token ids, a TextPrompt or
        TokensPrompt dict (`backplane.inputs`), or a list of any of these.
        ``sampling_params`` is one SamplingParams for all prompts or one per prompt;
        None uses `get_default_sampling_params()` (the model's generation defaults),
        with a default max_tokens from ``max_new_tokens`` capped to fit max_model_len.
        Every prompt and parameter set is checked before any request is queued:
        a bad one raises TypeError/ValueError naming it.
        """
        prompt_list = self._normalize_prompts(prompts)
        defaulted = sampling_params is None
        if defaulted:
            sampling_params = self.get_default_sampling_params()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompt_list)
        else:
            if isinstance(sampling_params, str | bytes | dict) or not hasattr(
                sampling_params, "__iter__"
            ):
                raise TypeError(
                    "sampling_params must be a SamplingParams or a list of them, got "
                    f"{type(sampling_params).__name__}"
                )
            params_list = list(sampling_params)
            if len(params_list) != len(prompt_list):
                raise ValueError(
                    f"got {len(params_list)} sampling_params for {len(prompt_list)} prompts; "
                    "pass one SamplingParams or one per prompt"
                )
            for i, params in enumerate(params_list):
                if not isinstance(params, SamplingParams):
                    raise TypeError(
                        f"sampling_params[{i}] must be a SamplingParams, got "
                        f"{type(params).__name__}"
                    )
        if defaulted:
            params_list = self._fit_default_max_tokens(prompt_list, params_list)
        if priority is not None and len(priority) != len(prompt_list):
            raise ValueError(f"got {len(priority)} priorities for {len(prompt_list)} prompts")
        loras = self._lora_list(lora_request, len(prompt_list))
        engine = self.llm_engine
        request_ids = []
        try:
            for i, (prompt, params) in enumerate(zip(prompt_list, params_list, strict=True)):
                request_id = str(next(self._counter))
                engine.add_request(request_id, prompt, params,
                                   priority=priority[i] if priority else 0,
                                   lora_request=loras[i])
                request_ids.append(request_id)
        except Exception:
            engine.abort_request(request_ids)  # leave the engine clean for the next call
            raise
        return self._run(request_ids, use_tqdm)

    @staticmethod
    def _lora_list(lora_request, count: int) -> list:
        """One adapter (or None) per prompt, from one LoRARequest or a list of them."""
        if lora_request is None or not isinstance(lora_request, list | tuple):
            return [lora_request] * count
        if len(lora_request) != count:
            raise ValueError(f"got {len(lora_request)} lora_request entries for {count} prompts; "
                             "pass one LoRARequest or one per prompt")
        return list(lora_request)

    def get_default_sampling_params(self) -> SamplingParams:
        """What `generate` and `chat` use when no SamplingParams is passed (vLLM's method).

        ``SamplingParams()`` with the model's generation defaults (its
        generation_config.json, as ``generation_config`` and
        ``override_generation_config`` select them) applied; ``max_new_tokens``
        becomes ``max_tokens``.
        """
        return SamplingParams(**self.llm_engine.config.model_spec.sampling_defaults)

    def _fit_default_max_tokens(
        self, prompts: list[PromptType], params_list: list[SamplingParams]
    ) -> list[SamplingParams]:
        """Cap a default max_tokens from max_new_tokens so that each prompt fits max_model_len."""
        if "max_tokens" not in self.llm_engine.config.model_spec.sampling_defaults:
            return params_list
        engine = self.llm_engine
        fitted = []
        for prompt, params in zip(prompts, params_list, strict=True):
            _, token_ids = engine.tokenize_prompt(prompt)
            room = engine.max_model_len - len(token_ids)
            if params.max_tokens is not None and 1 <= room < params.max_tokens:
                params = copy.copy(params)
                params.max_tokens = room
            fitted.append(params)
        return fitted

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        wanted = set(request_ids)
        finished: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(request_ids), desc="Processed prompts", disable=not use_tqdm,
                   dynamic_ncols=True)
        try:
            while len(finished) < len(request_ids) and engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished and out.request_id in wanted:
                        finished[out.request_id] = out
                        bar.update(1)
        except BaseException:
            engine.abort_request([r for r in request_ids if r not in finished])
            raise
        finally:
            bar.close()
        return [finished[r] for r in request_ids]

    # ---------------------------------------------------------------- pooling
    def encode(
        self,
        prompts: PromptType | Sequence[PromptType],
        pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
        use_tqdm: bool = True,
        pooling_task: str = "encode",
    ) -> list[PoolingRequestOutput]:
        """Run a pooling model (``--runner pooling``) over every prompt; outputs in input order.

        Each output's ``outputs.data`` is a float32 tensor: the pooled hidden
        state (``pooling_task="encode"``: never normalised; ``"embed"``: as
        `embed`). A generation model refuses with ValueError.
        """
        prompt_list = self._normalize_prompts(prompts)
        if pooling_params is None:
            pooling_params = PoolingParams()
        if isinstance(pooling_params, PoolingParams):
            params_list = [pooling_params] * len(prompt_list)
        else:
            params_list = list(pooling_params)
            if len(params_list) != len(prompt_list):
                raise ValueError(f"got {len(params_list)} pooling_params for "
                                 f"{len(prompt_list)} prompts; pass one or one per prompt")
        for i, params in enumerate(params_list):
            if not isinstance(params, PoolingParams):
                raise TypeError(f"pooling_params[{i}] must be a PoolingParams, got "
                                f"{type(params).__name__}")
        params_list = [
            p if p.task is not None else PoolingParams(pooling_task, p.dimensions, p.normalize)
            for p in params_list
        ]
        engine = self.llm_engine
        request_ids = []
        try:
            for prompt, params in zip(prompt_list, params_list, strict=True):
                request_id = str(next(self._counter))
                engine.add_request(request_id, prompt, params)
                request_ids.append(request_id)
        except Exception:
            engine.abort_request(request_ids)
            raise
        return self._run(request_ids, use_tqdm)

    def embed(
        self,
        prompts: PromptType | Sequence[PromptType],
        pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[EmbeddingRequestOutput]:
        """One embedding per prompt (``outputs.embedding``, a list of floats), in input order.

        The model's pooling (sentence-transformers' modules.json, else CLS for
        encoders / last token for decoders) and normalisation apply;
        ``PoolingParams(dimensions=k)`` shortens matryoshka embeddings.
        """
        outs = self.encode(prompts, pooling_params, use_tqdm=use_tqdm, pooling_task="embed")
        return [EmbeddingRequestOutput.from_base(o) for o in outs]

    def score(
        self,
        text_1: str | Sequence[str],
        text_2: str | Sequence[str],
        use_tqdm: bool = True,
    ) -> list[ScoringRequestOutput]:
        """Relevance score of each text pair, as vLLM's ``LLM.score``.

        ``text_1`` is one text (scored against each of ``text_2``) or as many
        texts as ``text_2`` (scored pairwise). A cross-encoder (sequence
        classification, e.g. BertForSequenceClassification) reads each pair as
        one prompt ``[CLS] a [SEP] b [SEP]`` and the score is its logit after
        the model's activation (sigmoid for one label); an embedding model
        scores by the cosine similarity of the two embeddings.
        """
        first = [text_1] if isinstance(text_1, str) else list(text_1)
        second = [text_2] if isinstance(text_2, str) else list(text_2)
        if not first or not second:
            raise ValueError("score needs at least one text on each side")
        if len(first) == 1:
            first = first * len(second)
        if len(first) != len(second):
            raise ValueError(f"text_1 has {len(first)} texts and text_2 {len(second)}: pass one "
                             "text_1 or as many as text_2")
        engine = self.llm_engine
        if getattr(engine, "is_cross_encoder", False):
            from backplane.core.pooling.pooler import encode_pair

            pairs = [encode_pair(engine.tokenizer, a, b, engine.max_model_len)
                     for a, b in zip(first, second, strict=True)]
            outs = self.encode(pairs, PoolingParams(task="score"), use_tqdm=use_tqdm)
            return [ScoringRequestOutput(o.request_id, ScoringOutput(float(o.outputs.data[0])),
                                         o.prompt_token_ids, True) for o in outs]
        outs = self.encode(first + second, PoolingParams(task="embed", normalize=True),
                           use_tqdm=use_tqdm)
        n = len(first)
        results = []
        for i in range(n):
            a, b = outs[i], outs[n + i]
            value = float((a.outputs.data * b.outputs.data).sum())
            results.append(ScoringRequestOutput(
                f"{a.request_id}_{b.request_id}", ScoringOutput(value),
                a.prompt_token_ids + b.prompt_token_ids, True))
        return results

    def beam_search(
        self,
        prompts: PromptType | Sequence[PromptType],
        params: BeamSearchParams,
        use_tqdm: bool = False,
    ) -> list[BeamSearchOutput]:
        """Beam search for every prompt (vLLM's algorithm); one output per prompt, in order.

        ``prompts`` are what `generate` takes. Each output's ``sequences`` are
        the ``params.beam_width`` best, best first; see `backplane.beam_search`
        for the algorithm. Every step submits all live beams of all prompts
        together as one-token requests; prompts and lengths are checked before
        the first one is queued.
        """
        if not isinstance(params, BeamSearchParams):
            raise TypeError(f"params must be a BeamSearchParams, got {type(params).__name__}")
        engine = self.llm_engine
        check_beam_width(params.beam_width, engine.max_logprobs)
        limits = SamplingParams(max_tokens=params.max_tokens)
        beam_prompts = []
        for i, prompt in enumerate(self._normalize_prompts(prompts)):
            _, token_ids = engine.tokenize_prompt(prompt)
            engine.validate_lengths(len(token_ids), limits)
            beam_prompts.append((token_ids, parse_prompt(prompt, f"prompts[{i}]").cache_salt))
        search = BeamSearch(beam_prompts, params, engine.eos_token_ids, engine.tokenizer)
        bar = tqdm(total=params.max_tokens, desc="Beam search steps", disable=not use_tqdm,
                   dynamic_ncols=True)

        def step(step_prompts: list, step_params: list[SamplingParams]):
            outputs = self.generate(step_prompts, step_params, use_tqdm=False)
            bar.update(1)
            return [step_result(out) for out in outputs]

        with bar:
            return run_beam_search(search, step).outputs()

    @staticmethod
    def _normalize_prompts(prompts) -> list[PromptType]:
        """The prompts as a list, each checked for type and shape (nothing queued yet)."""
        if isinstance(prompts, str | dict):
            prompts = [prompts]
        elif isinstance(prompts, list | tuple):
            prompts = list(prompts)
            if prompts and all(isinstance(t, int) and not isinstance(t, bool) for t in prompts):
                prompts = [prompts]  # a single token-id prompt
        else:
            raise TypeError(
                "prompts must be a string, a list of token ids, a prompt dict, or a list of "
                f"those, got {type(prompts).__name__}"
            )
        if not prompts:
            raise ValueError("prompts is empty: pass at least one prompt")
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, dict) and "token_type_ids" in prompt:
                # A cross-encoder pair (`score`); the pooling engine checks the segment ids.
                prompt = {k: v for k, v in prompt.items() if k != "token_type_ids"}
            parse_prompt(prompt, f"prompts[{i}]")
        return prompts

    def chat(
        self,
        messages: list[dict[str, str]] | list[list[dict[str, str]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        lora_request=None,
    ) -> list[RequestOutput]:
        """Apply the tokenizer's chat template to one conversation or a list of them
        (``lora_request`` as in `generate`)."""
        conversations = (
            [messages] if messages and isinstance(messages[0], dict) else list(messages)
        )
        tokenizer = self.llm_engine.tokenizer
        if chat_template is None and not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "the tokenizer has no chat template; pass chat_template= or use generate()"
            )
        prompts = []
        for conversation in conversations:
            ids = tokenizer.apply_chat_template(
                conversation, chat_template=chat_template,
                add_generation_prompt=add_generation_prompt, tokenize=True,
            )
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
            prompts.append(list(ids))
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm,
                             lora_request=lora_request)
