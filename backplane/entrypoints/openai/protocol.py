"""Request and response bodies of the OpenAI-compatible API (pydantic models).

Field names and defaults follow OpenAI's API; the sampling extensions
(top_k, min_p, repetition_penalty, min_tokens, ignore_eos, priority, ...)
follow vLLM's so that clients written for `vllm serve` work unchanged.

Every integer is range-checked here, at the edge, so that no value can
overflow inside the engine. Text anywhere in a request must be valid Unicode
(a lone surrogate such as ``"\ud800"`` is a 400). Fields that OpenAI or vLLM
define but Backplane does not implement (``functions``, ``best_of``,
``prompt_embeds``, ...) are refused by name unless they carry their neutral
value (``tools`` and ``tool_choice`` are fields of chat requests only; see
`ChatCompletionRequest`); the structured-output fields (``response_format``,
``structured_outputs``, legacy ``guided_*``) are kept as sent and mapped by
`backplane.entrypoints.openai.structured_outputs`; fields nobody defines are ignored with a warning in the server log,
as vLLM does, so that clients sending extra metadata keep working.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from backplane.sampling_params import INT64_MAX, INT64_MIN

logger = logging.getLogger(__name__)

Int64 = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]
NonNegativeInt64 = Annotated[int, Field(ge=0, le=INT64_MAX)]
TokenId = NonNegativeInt64


class FieldError(ValueError):
    """A request field the server refuses; ``param`` names it in the 400 body."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def find_lone_surrogate(value: Any, path: str = "") -> tuple[str, int, str] | None:
    """(path, index, character) of the first lone surrogate in any string of ``value``."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return path or "body", exc.start, value[exc.start]
        return None
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        if isinstance(key, str) and (found := find_lone_surrogate(key, path)):
            return found
        where = f"{path}[{key}]" if isinstance(key, int) else (f"{path}.{key}" if path else key)
        if found := find_lone_surrogate(item, where):
            return found
    return None


# Fields OpenAI or vLLM define that Backplane does not implement. Each is refused
# with its reason unless its value is the neutral one (the predicate says which),
# so that clients sending defaults keep working and nothing is silently ignored.
_TOOLS = "tool calling is only available in /v1/chat/completions (tools and tool_choice)"
_LEGACY_FUNCTIONS = (
    "the legacy functions/function_call fields are not supported; use tools and tool_choice"
)
UNSUPPORTED_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "tools": (lambda v: not v, _TOOLS),
    "tool_choice": (lambda v: v in (None, "none", "auto"), _TOOLS),
    "functions": (lambda v: not v, _LEGACY_FUNCTIONS),
    "function_call": (lambda v: v in (None, "none", "auto"), _LEGACY_FUNCTIONS),
    "best_of": (lambda v: v in (None, 1), "best_of is not supported (vLLM V1 dropped it); "
                "use n and rank the completions by their logprobs"),
    "logits_processors": (lambda v: not v, "per-request logits processors are not supported; "
                          "install them as a general plugin"),
    "prompt_embeds": (lambda v: v is None, "prompt embeddings are not supported"),
    "multi_modal_data": (lambda v: v is None, "multimodal inputs are not supported"),
    "mm_processor_kwargs": (lambda v: not v, "multimodal inputs are not supported"),
    "audio": (lambda v: v is None, "audio output is not supported"),
    "modalities": (lambda v: v in (None, ["text"]), "only text output is supported"),
    "prediction": (lambda v: v is None, "predicted outputs are not supported"),
    "web_search_options": (lambda v: v is None, "web search is not supported"),
    "reasoning_effort": (lambda v: v is None, "reasoning controls are not supported"),
    "store": (lambda v: not v, "this server does not store completions"),
    "kv_transfer_params": (lambda v: v is None, "disaggregated prefill is not supported"),
    "vllm_xargs": (lambda v: not v, "vllm_xargs is not supported"),
    "documents": (lambda v: not v, "documents for RAG chat templates are not supported"),
}
# Fields clients send that are meaningless here whatever their value (no warning).
INERT_FIELDS = frozenset({"parallel_tool_calls", "service_tier", "metadata"})


def random_id(prefix: str) -> str:
    """A unique response id such as ``cmpl-3f2a...``."""
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    """Unix seconds, for ``created`` fields."""
    return int(time.time())


class _Request(BaseModel):
    """Base of request bodies: valid Unicode only; unsupported fields refused by name."""

    # Extra fields are kept (in model_extra) so they can be refused or reported.
    model_config = ConfigDict(extra="allow")
    # Where this request's unknown fields are reported (top-level requests only).
    _report_extra: ClassVar[bool] = True

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        found = find_lone_surrogate(data)
        if found is not None:
            path, index, char = found
            raise FieldError(
                path.split(".", 1)[0].split("[", 1)[0],
                f"{path} contains a lone surrogate (U+{ord(char):04X}) at character {index}, "
                "which is not valid Unicode text",
            )
        return data

    @model_validator(mode="after")
    def _refuse_unsupported(self):
        extra = self.model_extra or {}
        for name, value in extra.items():
            rule = UNSUPPORTED_FIELDS.get(name)
            if rule is not None and not rule[0](value):
                raise FieldError(name, f"{name} is not supported: {rule[1]}")
        unknown = sorted(k for k in extra if k not in UNSUPPORTED_FIELDS and k not in INERT_FIELDS)
        if unknown and self._report_extra:
            logger.warning(
                "%s: ignoring unknown field(s) %s", type(self).__name__, ", ".join(unknown)
            )
        return self


class StreamOptions(_Request):
    """``stream_options``: token usage in a final chunk (and in every chunk, vLLM's
    ``continuous_usage_stats``)."""

    _report_extra: ClassVar[bool] = False

    include_usage: bool = False
    continuous_usage_stats: bool = False


class _SamplingFields(_Request):
    """Fields shared by completions and chat completions."""

    model: str | None = None
    n: Annotated[int, Field(ge=1, le=INT64_MAX)] = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: Annotated[int, Field(ge=-1, le=INT64_MAX)] | None = None
    min_p: float | None = None
    seed: Int64 | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[TokenId] | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = False
    min_tokens: NonNegativeInt64 = 0
    priority: Int64 = 0
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    request_id: str | None = Field(
        default=None,
        description="caller-chosen id, shown back as the response id (engine ids stay unique)",
    )
    prompt_logprobs: NonNegativeInt64 | None = None
    truncate_prompt_tokens: Annotated[int, Field(ge=-1, le=INT64_MAX)] | None = None
    cache_salt: str | None = Field(default=None, min_length=1)
    return_tokens_as_token_ids: bool = False
    allowed_token_ids: list[TokenId] | None = None
    bad_words: list[str] | None = None
    # vLLM's beam search: n beams, ranked with length_penalty (see serving_beam_search).
    use_beam_search: bool = False
    length_penalty: float = 1.0
    # Structured outputs (constrained decoding), checked and mapped onto
    # StructuredOutputsParams by entrypoints/openai/structured_outputs.py so that every
    # shape error is a 400 naming its field. At most one constraint per request.
    response_format: Any = None  # OpenAI: text, json_object, json_schema (+ structural_tag)
    structured_outputs: Any = None  # vLLM: {json|json_object|regex|choice|grammar|...}
    # vLLM's legacy spellings (deprecated: a warning once per field per process).
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    guided_decoding_backend: Any = None
    guided_whitespace_pattern: Any = None  # refused: no backend takes a whitespace pattern

    @model_validator(mode="after")
    def _length_penalty_needs_beam_search(self):
        if self.length_penalty != 1.0 and not self.use_beam_search:
            raise FieldError(
                "length_penalty", "length_penalty only applies with use_beam_search: true"
            )
        return self


class CompletionRequest(_SamplingFields):
    """``POST /v1/completions``."""

    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    max_tokens: Int64 | None = 16
    logprobs: NonNegativeInt64 | None = None
    echo: bool = False
    suffix: str | None = None
    add_special_tokens: bool = True


class FunctionDefinition(BaseModel):
    """``tools[i].function``: a function the model may call."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(min_length=1)
    description: str | None = None
    # A JSON schema (an object) of the arguments.
    parameters: dict[str, Any] | None = None


class ChatCompletionTool(BaseModel):
    """One entry of ``tools`` (OpenAI's function tools; the only kind there is)."""

    model_config = ConfigDict(extra="allow")

    type: Literal["function"]
    function: FunctionDefinition


class NamedToolChoiceFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    """``tool_choice: {"type": "function", "function": {"name": ...}}``."""

    type: Literal["function"]
    function: NamedToolChoiceFunction


class MessageFunctionCall(BaseModel):
    """``function`` of a tool call in an assistant message of the history."""

    model_config = ConfigDict(extra="allow")

    name: str
    # OpenAI sends a JSON string; an object is accepted too.
    arguments: str | dict[str, Any]


class MessageToolCall(BaseModel):
    """One of ``tool_calls`` in an assistant message of the history."""

    model_config = ConfigDict(extra="allow")

    id: str | None = None
    type: Literal["function"] = "function"
    function: MessageFunctionCall


class ChatMessage(_Request):
    """One chat message; ``content`` may be a string or a list of content parts.

    Assistant messages may carry ``tool_calls`` (``content`` null), tool
    results come as ``role: "tool"`` with ``tool_call_id``. Other keys
    (``reasoning_content``, ...) are passed to the chat template, which may use
    them.
    """

    _report_extra: ClassVar[bool] = False

    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None


class ChatCompletionRequest(_SamplingFields):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Int64 | None = None
    max_completion_tokens: Int64 | None = None
    logprobs: bool = False
    top_logprobs: NonNegativeInt64 | None = 0
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_special_tokens: bool = False
    # Function tools, passed to the chat template. Calls written by the model are
    # parsed into tool_calls with tool_choice "auto" on a server started with
    # --enable-auto-tool-choice (serving_chat.tool_choice_mode decides); "required" and
    # a named function constrain the output to calls (structured outputs).
    tools: list[ChatCompletionTool] | None = None
    # None: "auto" when tools are given, else "none" (OpenAI's and vLLM's default).
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None


class TokenizeRequest(_Request):
    """``POST /tokenize``: a prompt, or chat messages rendered through the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    return_token_strs: bool = False


class TokenizeResponse(BaseModel):
    """Token ids of the prompt, their number and the server's max_model_len."""

    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_Request):
    """``POST /detokenize``."""

    model: str | None = None
    tokens: list[TokenId]


class DetokenizeResponse(BaseModel):
    """The text of the token ids."""

    prompt: str


# ----- responses -----


class UsageInfo(BaseModel):
    """Token counts of a response."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionLogprobs(BaseModel):
    """Completions-API logprobs: parallel lists, one entry per token."""

    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    """One choice of a completion (also one choice of a stream chunk)."""

    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # vLLM's prompt_logprobs: per prompt position {token_id: {logprob, rank, decoded_token}}.
    prompt_logprobs: list[dict[str, dict[str, Any]] | None] | None = None


class CompletionResponse(BaseModel):
    """Body of a non-streaming completion and of each streamed chunk."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(BaseModel):
    """One alternative token in chat logprobs."""

    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    """Chat logprobs of one generated token, with its top alternatives."""

    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    """Chat-API logprobs: one entry per generated token."""

    content: list[ChatTokenLogprob] | None = None


class ResponseFunctionCall(BaseModel):
    name: str
    arguments: str  # a JSON object, serialized


class ResponseToolCall(BaseModel):
    """A tool call the model made (OpenAI's shape)."""

    id: str
    type: Literal["function"] = "function"
    function: ResponseFunctionCall


class ChatResponseMessage(BaseModel):
    """The assistant's reply.

    ``reasoning_content`` (vLLM's name) is set with --reasoning-parser,
    ``tool_calls`` when a tool-call parser found calls; both are null otherwise.
    """

    role: str = "assistant"
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ResponseToolCall] | None = None


class ChatChoice(BaseModel):
    """One choice of a chat completion."""

    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    """Body of a non-streaming chat completion."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    prompt_logprobs: list[dict[str, dict[str, Any]] | None] | None = None


class DeltaFunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(BaseModel):
    """A piece of a streamed tool call: ``index`` says which call; ``id``, ``type``
    and ``function.name`` come on its first piece, ``function.arguments``
    fragments after."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall | None = None


class DeltaMessage(BaseModel):
    """The part of the assistant's message added by one stream chunk."""

    role: str | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatStreamChoice(BaseModel):
    """One choice of a chat stream chunk."""

    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(BaseModel):
    """One Server-Sent Event of a streaming chat completion."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    """One entry of ``GET /v1/models``."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "backplane"
    root: str | None = None
    # vLLM's: a LoRA adapter's base model (its ``root`` is the adapter's path); null
    # for a base model.
    parent: str | None = None
    max_model_len: int | None = None
    # Backplane's addition: the sampling defaults (SamplingParams names) that fill
    # request fields the client leaves unset (--generation-config and its override).
    generation_defaults: dict[str, Any] = Field(default_factory=dict)


class ModelList(BaseModel):
    """Body of ``GET /v1/models``."""

    object: Literal["list"] = "list"
    data: list[ModelCard]
