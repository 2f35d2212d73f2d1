"""Backplane: an LLM inference and serving engine with a hardware-agnostic core."""

from backplane.version import __version__

__all__ = [
    "LLM", "AsyncLLM", "SamplingParams", "RequestOutput", "CompletionOutput", "__version__",
]


def __getattr__(name: str):
    # Lazy so that `import backplane` (CLI start-up, plugin discovery) stays light.
    if name == "LLM":
        from backplane.entrypoints.llm import LLM

        return LLM
    if name == "AsyncLLM":
        from backplane.entrypoints.async_llm import AsyncLLM

        return AsyncLLM
    if name == "SamplingParams":
        from backplane.sampling_params import SamplingParams

        return SamplingParams
    if name in ("RequestOutput", "CompletionOutput"):
        from backplane import outputs

        return getattr(outputs, name)
    raise AttributeError(f"module 'backplane' has no attribute {name!r}")
