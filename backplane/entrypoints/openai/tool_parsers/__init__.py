"""Tool-call parsers: turn a model's raw text into OpenAI ``tool_calls``.

Usage, one parser instance per request::

    parser = get_tool_parser("hermes")()
    result = parser.extract(full_text)                        # non-streaming
    delta = parser.extract_streaming(previous_text, delta)    # streaming, per chunk
    delta = parser.finish()                                   # at the end of the stream
"""

from __future__ import annotations

from backplane.entrypoints.openai.tool_parsers.base import (
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    ExtractedToolCalls,
    FunctionCall,
    ToolCall,
    ToolParser,
)
from backplane.entrypoints.openai.tool_parsers.hermes import HermesToolParser
from backplane.entrypoints.openai.tool_parsers.llama3_json import Llama3JsonToolParser
from backplane.entrypoints.openai.tool_parsers.mistral import MistralToolParser
from backplane.entrypoints.openai.tool_parsers.pythonic import PythonicToolParser

_REGISTRY: dict[str, type[ToolParser]] = {
    cls.name: cls
    for cls in (HermesToolParser, Llama3JsonToolParser, MistralToolParser, PythonicToolParser)
}
# The values accepted by --tool-call-parser.
TOOL_PARSERS: tuple[str, ...] = tuple(sorted(_REGISTRY))


def get_tool_parser(name: str) -> type[ToolParser]:
    """The parser class registered as ``name``; instantiate it once per request."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown tool call parser {name!r}; valid ones: {', '.join(TOOL_PARSERS)}"
        ) from None


__all__ = [
    "TOOL_PARSERS",
    "DeltaFunctionCall",
    "DeltaMessage",
    "DeltaToolCall",
    "ExtractedToolCalls",
    "FunctionCall",
    "HermesToolParser",
    "Llama3JsonToolParser",
    "MistralToolParser",
    "PythonicToolParser",
    "ToolCall",
    "ToolParser",
    "get_tool_parser",
]
