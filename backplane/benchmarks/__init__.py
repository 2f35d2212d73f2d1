"""Benchmark tools behind `backplane bench`: one module per tool.

- `make_model`: random models of real shapes plus a locally trained tokenizer.
- `workload`: random token-id prompts (mixed lengths, shared prefix).
- `throughput`: offline engine throughput, optional transformers baseline and ceiling.
- `ceiling`: the linear-layer (weight streaming + matmul) floor of a decode step.
- `latency`: decode step time per batch size and prefill time per prompt length.
- `serve`: online load generator for any OpenAI-compatible server.
- `step_timing`, `memory`, `report`: shared measuring and printing helpers.
"""
