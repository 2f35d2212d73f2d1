"""External baselines of `bench throughput --baseline vllm|llama.cpp`.

Each engine (Backplane included) runs in a fresh process of its own, so one
engine's allocator state, threads or page cache warmth cannot help or hurt the
next, and each process's peak RSS is its own. The runner scripts here are
started by path in other interpreters (vLLM's venv pins its own torch), so they
import nothing from Backplane.
"""
