"""Backplane: an LLM inference and serving engine with a hardware-agnostic core."""

from backplane.version import __version__

__all__ = [
    "LLM", "AsyncLLM", "SamplingParams", "BeamSearchParams", "RequestOutput", "CompletionOutput",
    "__version__",
]


def __getattr__(name: str):
    # Lazy so that `import backplane` (CLI start-up, plugin discovery) stays light.
    if name == "LLM":
        from backplane.entrypoints.llm import LLM

        return LLM
    if name == "AsyncLLM":
        from backplane.entrypoints.async_llm import AsyncLLM

        return AsyncLLM
    if name in ("SamplingParams", "BeamSearchParams"):
        from backplane import sampling_params

        return getattr(sampling_params, name)
    if name in ("RequestOutput", "CompletionOutput"):
        from backplane import outputs

        return getattr(outputs, name)
    raise AttributeError(f"module 'backplane' has no attribute {name!r}")
