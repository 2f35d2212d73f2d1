"""msgpack encoding of the per-step plan the driver sends to the other ranks.

Only what a worker's model runner reads travels: the new requests' tokens,
blocks and sampling parameters (so every rank builds the same batch and the
same sampling inputs), the cached requests' new blocks, the token counts and
the removed ids. The structured-output matcher, the planned request objects
and the LoRA weights stay with the driver: only rank 0 samples (its tokens
are broadcast to the other ranks by the runner), and LoRA is refused under
tensor or pipeline parallelism.
"""

from __future__ import annotations

from backplane.core.engine.serial import decode_params, encode_params, pack, unpack
from backplane.core.scheduler.output import CachedRequestData, NewRequestData, SchedulerOutput

# [LAUNCH, step number, plan, collect at once]: start the step's forward, and with
# the flag set finish it too (one message per step without a pipeline).
LAUNCH = "launch"
# [COLLECT]: finish the oldest launched step (pipeline: several are in flight).
COLLECT = "collect"
SHUTDOWN = "shutdown"  # [SHUTDOWN]


def encode_collect() -> bytes:
    return pack([COLLECT])


def encode_plan(out: SchedulerOutput, step: int, collect: bool = True) -> bytes:
    return pack([LAUNCH, step, collect, [
        [[r.request_id, r.token_ids, r.num_prompt_tokens, r.block_ids, r.num_computed_tokens,
          encode_params(r.params)] for r in out.new_requests],
        [[c.request_id, c.new_block_ids, c.num_computed_tokens] for c in out.cached_requests],
        out.num_scheduled_tokens,
        out.total_num_scheduled_tokens,
        sorted(out.removed_request_ids),
        sorted(out.preempted_request_ids),
        out.scheduled_spec_tokens,
    ]])


def decode_message(data: bytes) -> list:
    return unpack(data)


def decode_plan(fields: list) -> SchedulerOutput:
    new, cached, counts, total, removed, preempted, spec = fields
    return SchedulerOutput(
        new_requests=[NewRequestData(rid, list(tokens), n_prompt, list(blocks), n_computed,
                                     decode_params(params))
                      for rid, tokens, n_prompt, blocks, n_computed, params in new],
        cached_requests=[CachedRequestData(rid, list(blocks), n_computed)
                         for rid, blocks, n_computed in cached],
        num_scheduled_tokens=dict(counts),
        total_num_scheduled_tokens=total,
        removed_request_ids=set(removed),
        preempted_request_ids=set(preempted),
        scheduled_spec_tokens={rid: list(tokens) for rid, tokens in spec.items()},
    )


def encode_shutdown() -> bytes:
    return pack([SHUTDOWN])
