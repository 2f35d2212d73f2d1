"""Per-step cost of sending the scheduler's plan to the other ranks (docs/distributed.md).

Builds the plan of a decode step with N running requests (each advancing one
token, a new KV block every 16 steps) and of a step admitting N new requests,
then times msgpack encoding on the driver and decoding on a worker, and one
ZMQ IPC hop (PUSH -> PULL, one worker) of the encoded bytes.

    python scripts/bench_plan_wire.py --running 64
"""

from __future__ import annotations

import argparse
import tempfile
import time

import zmq

from backplane.core.executor.wire import decode_message, decode_plan, encode_plan
from backplane.core.scheduler.output import CachedRequestData, NewRequestData, SchedulerOutput
from backplane.sampling_params import SamplingParams


def decode_step(n: int) -> SchedulerOutput:
    cached = [CachedRequestData(f"req-{i}", [1000 + i] if i % 16 == 0 else [], 300 + i)
              for i in range(n)]
    return SchedulerOutput([], cached, {f"req-{i}": 1 for i in range(n)}, n)


def admit_step(n: int, prompt_len: int) -> SchedulerOutput:
    new = [NewRequestData(f"new-{i}", list(range(prompt_len)), prompt_len,
                          list(range(prompt_len // 16 + 1)), 0,
                          SamplingParams(max_tokens=128, temperature=0.0))
           for i in range(n)]
    return SchedulerOutput(new, [], {f"new-{i}": prompt_len for i in range(n)}, n * prompt_len)


def timed(fn, reps: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--running", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--reps", type=int, default=2000)
    args = parser.parse_args()
    ctx = zmq.Context.instance()
    with tempfile.TemporaryDirectory() as d:
        push, pull = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
        push.bind(f"ipc://{d}/plan")
        pull.connect(f"ipc://{d}/plan")
        for name, out, reps in (("decode", decode_step(args.running), args.reps),
                                ("admit", admit_step(args.running, args.prompt_len),
                                 max(1, args.reps // 20))):
            data = encode_plan(out, 0)
            enc = timed(lambda out=out: encode_plan(out, 0), reps)
            dec = timed(lambda data=data: decode_plan(decode_message(data)[3]), reps)

            def hop(data=data):
                push.send(data)
                pull.recv()

            wire = timed(hop, reps)
            print(f"{name} step, {args.running} requests: {len(data)} bytes, encode "
                  f"{enc * 1e6:.1f} us, decode {dec * 1e6:.1f} us, IPC hop {wire * 1e6:.1f} us")
        push.close()
        pull.close()


if __name__ == "__main__":
    main()
