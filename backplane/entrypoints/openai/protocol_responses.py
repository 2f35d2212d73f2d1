"""Request, response and stream-event bodies of ``POST /v1/responses`` (OpenAI's Responses API).

Text only. The request model declares what the server implements plus the
OpenAI fields that it accepts only with their neutral value (``store: false``,
``tools: []``, ``text.format`` plain text, ...); every other field is kept in
``model_extra`` so that the handler can refuse it with a 400 naming it
(nothing is accepted and silently ignored). The response and event shapes are
the ones the official ``openai`` client parses (``Response``,
``ResponseStreamEvent``).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field

from backplane.entrypoints.openai.protocol import Int64, _Request

ResponseStatus = Literal["completed", "incomplete", "in_progress", "failed", "cancelled"]


def response_item_id(prefix: str) -> str:
    """An OpenAI-style object id such as ``resp_3f2a...`` or ``msg_3f2a...``."""
    return f"{prefix}_{uuid.uuid4().hex}"


class ResponsesRequest(_Request):
    """``POST /v1/responses``.

    Like every request body: valid Unicode only, integers within int64.
    Unknown and unsupported fields stay in ``model_extra``; the handler refuses
    them (so they are not merely logged here).
    """

    _report_extra: ClassVar[bool] = False

    input: str | list[dict[str, Any]]
    model: str | None = None
    instructions: str | None = None
    max_output_tokens: Int64 | None = None
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False
    metadata: dict[str, str] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    # Accepted only with the value that means "nothing to do" (checked by the handler).
    store: bool | None = None
    background: bool | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    include: list[str] | None = None
    truncation: str | None = None
    text: dict[str, Any] | None = None
    stream_options: dict[str, Any] | None = None
    # vLLM's extensions.
    priority: Int64 = 0
    request_id: str | None = Field(
        default=None, description="optional caller-chosen response id (unique while running)"
    )


# ----- the response object -----


class ResponseOutputText(BaseModel):
    """The text part of the assistant's message."""

    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Any] = Field(default_factory=list)


class ResponseOutputMessage(BaseModel):
    """The assistant's message, the one output item of a text response."""

    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    status: Literal["in_progress", "completed", "incomplete"]
    content: list[ResponseOutputText] = Field(default_factory=list)


class InputTokensDetails(BaseModel):
    """Prompt tokens served from the prefix cache."""

    cached_tokens: int = 0


class OutputTokensDetails(BaseModel):
    """Reasoning tokens (always 0: no reasoning parser)."""

    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    """Token counts of a response, in the Responses API's names."""

    input_tokens: int
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class IncompleteDetails(BaseModel):
    """Why a response is incomplete."""

    reason: Literal["max_output_tokens", "content_filter"] | None = None


class ResponseError(BaseModel):
    """Why a response failed."""

    code: str
    message: str


class TextFormat(BaseModel):
    """``text.format``: only plain text is produced."""

    type: Literal["text"] = "text"


class TextConfig(BaseModel):
    """``text`` of a response."""

    format: TextFormat = Field(default_factory=TextFormat)


class ResponsesResponse(BaseModel):
    """A response object (``object: "response"``), final or as carried by stream events."""

    id: str
    object: Literal["response"] = "response"
    created_at: int = Field(default_factory=lambda: int(time.time()))
    completed_at: int | None = None
    status: ResponseStatus
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    model: str
    output: list[ResponseOutputMessage] = Field(default_factory=list)
    parallel_tool_calls: bool = True
    previous_response_id: None = None
    reasoning: None = None
    background: bool = False
    store: bool = False
    temperature: float
    top_p: float
    text: TextConfig = Field(default_factory=TextConfig)
    tool_choice: str = "auto"
    tools: list[Any] = Field(default_factory=list)
    truncation: Literal["disabled"] = "disabled"
    usage: ResponseUsage | None = None
    user: str | None = None
    safety_identifier: str | None = None


# ----- stream events (each carries a sequence_number, set when it is sent) -----


class _Event(BaseModel):
    sequence_number: int = 0


class ResponseLifecycleEvent(_Event):
    """``response.created`` / ``in_progress`` / ``completed`` / ``incomplete`` / ``failed``."""

    type: Literal[
        "response.created",
        "response.in_progress",
        "response.completed",
        "response.incomplete",
        "response.failed",
    ]
    response: ResponsesResponse


class ResponseOutputItemEvent(_Event):
    """``response.output_item.added`` / ``response.output_item.done``."""

    type: Literal["response.output_item.added", "response.output_item.done"]
    output_index: int = 0
    item: ResponseOutputMessage


class _PartEvent(_Event):
    """An event about one content part of one output item."""

    item_id: str
    output_index: int = 0
    content_index: int = 0


class ResponseContentPartEvent(_PartEvent):
    """``response.content_part.added`` / ``response.content_part.done``."""

    type: Literal["response.content_part.added", "response.content_part.done"]
    part: ResponseOutputText


class ResponseTextDeltaEvent(_PartEvent):
    """``response.output_text.delta``: text added since the previous delta."""

    type: Literal["response.output_text.delta"] = "response.output_text.delta"
    delta: str
    logprobs: list[Any] = Field(default_factory=list)


class ResponseTextDoneEvent(_PartEvent):
    """``response.output_text.done``: the whole text of the part."""

    type: Literal["response.output_text.done"] = "response.output_text.done"
    text: str
    logprobs: list[Any] = Field(default_factory=list)


class ResponseErrorEvent(_Event):
    """``error``: the stream failed after it started (followed by ``response.failed``)."""

    type: Literal["error"] = "error"
    code: str | None = None
    message: str
    param: str | None = None
