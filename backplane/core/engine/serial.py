"""msgpack encoding of what crosses the front-end / engine-core process boundary.

Only plain data travels: each type has a small explicit encoder and decoder
(no pickle), so a message can never run code in the receiver and a field
that is added to a type without being added here fails loudly in the tests
instead of silently not travelling.

Messages are ``[kind, *fields]`` lists; the kinds are listed below.
"""

from __future__ import annotations

from dataclasses import fields, is_dataclass
from typing import Any

import msgpack
import numpy as np

from backplane.core.engine.engine_core import EngineCoreOutput, StepTiming
from backplane.core.model_runner.runner import TokenLogprobs
from backplane.core.scheduler.request import Request, RequestStatus
from backplane.sampling_params import SamplingParams

# Front-end -> engine core.
ADD = "add"  # [ADD, [request, ...]]
FINISH = "finish"  # [FINISH, [request_id, ...], status value]
UTILITY = "utility"  # [UTILITY, call_id, method name]
SHUTDOWN = "shutdown"  # [SHUTDOWN]
# Engine core -> front-end.
READY = "ready"  # [READY, stats]
OUTPUTS = "outputs"  # [OUTPUTS, [output, ...], stats, timing or None]
STEP_ERROR = "step_error"  # [STEP_ERROR, message, stats]: a step raised, the core serves on
UTILITY_RESULT = "utility_result"  # [UTILITY_RESULT, call_id, result, error or None]
FATAL = "fatal"  # [FATAL, message]: start-up failed or the loop crashed; the process exits

# SamplingParams fields that are sets (msgpack has no set type).
_SET_FIELDS = frozenset({"all_stop_token_ids", "eos_token_ids"})
_PARAM_FIELDS = tuple(f.name for f in fields(SamplingParams))


def pack(message: list) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def unpack(data: bytes) -> list:
    # Integer map keys (logit_bias) need strict_map_key off.
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def encode_params(params: SamplingParams) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in _PARAM_FIELDS:
        value = getattr(params, name)
        if name in _SET_FIELDS:
            value = sorted(value)
        elif is_dataclass(value):
            # A nested params record (structured_outputs): its fields, which
            # SamplingParams turns back into the record from a dict.
            value = {f.name: getattr(value, f.name) for f in fields(value)}
        out[name] = value
    return out


def decode_params(data: dict[str, Any]) -> SamplingParams:
    """Rebuild (and so re-validate) the params; the engine-filled fields are set after."""
    unknown = set(data) - set(_PARAM_FIELDS)
    if unknown:
        raise ValueError(f"SamplingParams has no field(s) {sorted(unknown)}")
    init = {k: v for k, v in data.items() if k not in _SET_FIELDS
            and k != "bad_words_token_ids"}
    params = SamplingParams(**init)
    params.all_stop_token_ids = set(data["all_stop_token_ids"])
    params.eos_token_ids = frozenset(data["eos_token_ids"])
    params.bad_words_token_ids = [list(ids) for ids in data["bad_words_token_ids"]]
    return params


def encode_request(request: Request, max_model_len: int) -> list:
    return [
        request.request_id, request.prompt_token_ids, encode_params(request.params),
        max_model_len, sorted(request.eos_token_ids), request.priority, request.arrival_time,
        request.cache_salt,
        None if request.lora_request is None else [
            request.lora_request.lora_name, request.lora_request.lora_int_id,
            request.lora_request.lora_path],
    ]


def decode_request(data: list) -> Request:
    rid, prompt, params, max_model_len, eos, priority, arrival, salt, lora = data
    lora_request = None
    if lora is not None:
        from backplane.lora import LoRARequest

        lora_request = LoRARequest(*lora)
    return Request(
        rid, prompt, decode_params(params), max_model_len, eos_token_ids=frozenset(eos),
        priority=priority, arrival_time=arrival, cache_salt=salt, lora_request=lora_request,
    )


def _encode_array(a: np.ndarray) -> list:
    a = np.ascontiguousarray(a)
    return [a.dtype.str, list(a.shape), a.tobytes()]


def _decode_array(data: list) -> np.ndarray:
    dtype, shape, buf = data
    # frombuffer is read-only over the message bytes; copy so consumers may write.
    return np.frombuffer(buf, dtype=np.dtype(dtype)).reshape(shape).copy()


def _encode_logprobs(lp: TokenLogprobs | None) -> list | None:
    if lp is None:
        return None
    return [_encode_array(lp.ids), _encode_array(lp.logprobs), _encode_array(lp.ranks)]


def _decode_logprobs(data: list | None) -> TokenLogprobs | None:
    if data is None:
        return None
    ids, logprobs, ranks = data
    return TokenLogprobs(_decode_array(ids), _decode_array(logprobs), _decode_array(ranks))


def encode_output(out: EngineCoreOutput) -> list:
    return [
        out.request_id, [int(t) for t in out.new_token_ids], _encode_logprobs(out.logprobs),
        _encode_logprobs(out.prompt_logprobs),
        out.finish_status.value if out.finish_status is not None else None,
        out.stop_reason, out.num_cached_tokens,
    ]


def decode_output(data: list) -> EngineCoreOutput:
    rid, new_ids, logprobs, prompt_logprobs, status, stop_reason, cached = data
    return EngineCoreOutput(
        request_id=rid, new_token_ids=new_ids, logprobs=_decode_logprobs(logprobs),
        prompt_logprobs=_decode_logprobs(prompt_logprobs),
        finish_status=RequestStatus(status) if status is not None else None,
        stop_reason=stop_reason, num_cached_tokens=cached,
    )


def encode_timing(t: StepTiming) -> list:
    return [t.total_seconds, t.forward_seconds, t.num_tokens, t.num_reqs,
            t.grammar_mask_seconds, t.comm_seconds]


def decode_timing(data: list) -> StepTiming:
    return StepTiming(*data)
