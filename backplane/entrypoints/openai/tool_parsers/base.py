"""Result types and the base class shared by every tool-call parser.

The types here are deliberately independent of ``protocol.py``: the parsers
are pure text-to-structure functions, and the chat endpoint maps their
results onto its own response models.

A parser instance holds the streaming state of ONE request: create a new
instance per request (``get_tool_parser(name)()``).
"""

from __future__ import annotations

import secrets
from typing import ClassVar, Literal

from pydantic import BaseModel, Field


def random_call_id() -> str:
    """OpenAI-style tool call id: ``call_`` and 24 random hex digits."""
    return f"call_{secrets.token_hex(12)}"


class FunctionCall(BaseModel):
    name: str
    arguments: str  # a JSON object, serialized


class ToolCall(BaseModel):
    id: str = Field(default_factory=random_call_id)
    type: Literal["function"] = "function"
    function: FunctionCall


class ExtractedToolCalls(BaseModel):
    """What one complete model output contains."""

    tools_called: bool
    tool_calls: list[ToolCall] = Field(default_factory=list)
    # The text outside the tool calls; None when there is none.
    content: str | None = None


class DeltaFunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(BaseModel):
    index: int
    # id, type and function.name come only on the first delta of a call.
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


class DeltaMessage(BaseModel):
    """One streamed chunk: plain text, tool-call pieces, or both."""

    content: str | None = None
    tool_calls: list[DeltaToolCall] = Field(default_factory=list)


class ContentStream:
    """Streams the text outside tool calls with the same whitespace rules as
    :func:`join_outside`, so that streamed and non-streamed content agree.

    Whitespace right before a tool call and right after one is dropped; to
    know which whitespace is "right before a call", trailing whitespace is
    held back until non-blank text (emit it) or a call (drop it) follows, or
    the stream ends (emit it).
    """

    def __init__(self) -> None:
        self._pending_ws = ""
        self._after_call = False

    def text(self, text: str) -> str:
        if self._after_call:
            text = text.lstrip()
            if not text:
                return ""
            self._after_call = False
        body = text.rstrip()
        if not body:
            self._pending_ws += text
            return ""
        out = self._pending_ws + body
        self._pending_ws = text[len(body) :]
        return out

    def call_started(self) -> None:
        self._pending_ws = ""

    def call_ended(self) -> None:
        self._after_call = True

    def flush(self) -> str:
        out, self._pending_ws = self._pending_ws, ""
        return out


def join_outside(segments: list[str]) -> str | None:
    """Content from the text segments around N tool calls (N+1 segments).

    Whitespace next to a tool call is dropped, text in between is kept as is.
    """
    last = len(segments) - 1
    parts = []
    for i, seg in enumerate(segments):
        if i > 0:
            seg = seg.lstrip()
        if i < last:
            seg = seg.rstrip()
        parts.append(seg)
    return "".join(parts) or None


class ToolParser:
    """Base class: subclasses implement :meth:`_parse` (whole output) and
    :meth:`_stream` / :meth:`_finish` (incremental), using the ``_emit_*``
    helpers to produce deltas."""

    name: ClassVar[str]

    def __init__(self) -> None:
        self._content = ContentStream()
        self._calls_started = 0
        self._out_content: list[str] = []
        self._out_calls: list[DeltaToolCall] = []

    # ---- non-streaming -------------------------------------------------

    def extract(self, model_output: str) -> ExtractedToolCalls:
        try:
            parsed = self._parse(model_output)
        except Exception:  # a parser bug must not fail the request
            parsed = None
        if not parsed or not parsed[0]:
            return ExtractedToolCalls(tools_called=False, content=model_output or None)
        calls, content = parsed
        return ExtractedToolCalls(
            tools_called=True,
            tool_calls=[
                ToolCall(id=self.make_call_id(), function=FunctionCall(name=n, arguments=a))
                for n, a in calls
            ],
            content=content,
        )

    def _parse(self, text: str) -> tuple[list[tuple[str, str]], str | None] | None:
        """``([(name, arguments_json), ...], content)``, or None if malformed."""
        raise NotImplementedError

    def make_call_id(self) -> str:
        return random_call_id()

    # ---- streaming -----------------------------------------------------

    def extract_streaming(self, previous_text: str, delta_text: str) -> DeltaMessage | None:
        """Feed the next piece of output; ``previous_text`` is everything fed
        before (the parser keeps its own copy, it is accepted for parity with
        vLLM's signature). Returns what can be sent now, or None."""
        if delta_text:
            self._stream(delta_text)
        return self._collect()

    def finish(self) -> DeltaMessage | None:
        """End of output: release text held back in case it began a tag."""
        self._finish()
        self._emit_content_raw(self._content.flush())
        return self._collect()

    def _stream(self, delta_text: str) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        raise NotImplementedError

    def _emit_content(self, text: str) -> None:
        self._emit_content_raw(self._content.text(text))

    def _emit_content_raw(self, text: str) -> None:
        if text:
            self._out_content.append(text)

    def _start_call(self, name: str) -> int:
        index = self._calls_started
        self._calls_started += 1
        self._content.call_started()
        self._out_calls.append(
            DeltaToolCall(
                index=index,
                id=self.make_call_id(),
                type="function",
                function=DeltaFunctionCall(name=name, arguments=""),
            )
        )
        return index

    def _emit_arguments(self, index: int, fragment: str) -> None:
        if not fragment:
            return
        last = self._out_calls[-1] if self._out_calls else None
        if last is not None and last.index == index:
            last.function.arguments = (last.function.arguments or "") + fragment
        else:
            self._out_calls.append(
                DeltaToolCall(index=index, function=DeltaFunctionCall(arguments=fragment))
            )

    def _end_call(self) -> None:
        self._content.call_ended()

    def _collect(self) -> DeltaMessage | None:
        content = "".join(self._out_content) or None
        calls = self._out_calls
        self._out_content, self._out_calls = [], []
        if content is None and not calls:
            return None
        return DeltaMessage(content=content, tool_calls=calls)
