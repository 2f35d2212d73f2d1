"""Every rank runs this same program (SPMD), as RL trainers do: start it with torchrun.

    torchrun --nproc-per-node 2 examples/torchrun_external_launcher.py MODEL_DIR [--pp 1]

Each rank builds the same `LLM` with ``distributed_executor_backend="external_launcher"``:
its own scheduler plans the same steps, its model runner holds this rank's
slice, and rank 0's sampled tokens are shared, so every rank prints the same
completions. With ``--json-dir DIR`` each rank writes ``DIR/rank<N>.json`` instead.
"""

from __future__ import annotations

import argparse
import json
import os

from backplane import LLM, SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model")
    parser.add_argument("--pp", type=int, default=1, help="pipeline_parallel_size")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--json-dir", help="write each rank's tokens to DIR/rank<N>.json")
    args = parser.parse_args()
    world = int(os.environ["WORLD_SIZE"])
    llm = LLM(args.model, tensor_parallel_size=world // args.pp, pipeline_parallel_size=args.pp,
              distributed_executor_backend="external_launcher", dtype="float32",
              max_model_len=128, num_kv_blocks=64, seed=0)
    prompts = [[1, 5, 9, 13, 200, 17], [1, 44, 45, 46]]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                           SamplingParams(max_tokens=args.max_tokens, temperature=0.8,
                                          seed=1234), use_tqdm=False)
    rank = int(os.environ["RANK"])
    tokens = [o.outputs[0].token_ids for o in outputs]
    if args.json_dir:
        with open(os.path.join(args.json_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"rank": rank, "tokens": tokens}, f)
    else:
        for prompt, out in zip(prompts, tokens, strict=True):
            print(f"rank {rank}: {prompt} -> {out}")
    llm.llm_engine.shutdown()


if __name__ == "__main__":
    main()
