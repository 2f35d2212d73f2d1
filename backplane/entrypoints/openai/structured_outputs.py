"""The request surface of structured outputs: request fields -> `StructuredOutputsParams`.

Three spellings reach the same constraint (docs/serving.md, "Structured outputs"):

* OpenAI's ``response_format``: ``{"type": "text"}`` (no constraint),
  ``{"type": "json_object"}``, ``{"type": "json_schema", "json_schema": {"name", "schema",
  "strict"?, "description"?}}`` and vLLM's ``{"type": "structural_tag", ...}``;
* vLLM's ``structured_outputs`` object (json, json_object, regex, choice, grammar,
  structural_tag, disable_any_whitespace, backend);
* vLLM's legacy ``guided_json`` / ``guided_regex`` / ``guided_choice`` /
  ``guided_grammar`` / ``guided_decoding_backend``: accepted with a deprecation warning
  (once per field per process); ``guided_whitespace_pattern`` is refused (neither
  backend takes a whitespace pattern).

At most one constraint per request; every shape error is a 400 naming the field. The
spec itself (schema, regex, grammar) is checked by the engine at add-request time;
`constraint_param` says which field to name when it refuses one.

``tool_choice`` ``"required"`` and a named function are constrained decoding too
(`forced_tool_schema`), as in vLLM: the output is a JSON array of ``{"name",
"parameters"}`` objects, or the named tool's arguments object.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any

from backplane.config.deprecation import (
    DeprecatedOption,
    is_removed,
    removal_message,
    warn_deprecated,
)
from backplane.core.structured_outputs.params import (
    CONSTRAINT_FIELDS,
    StructuredOutputsParams,
    canonical_backend_name,
)
from backplane.entrypoints.openai.errors import OpenAIServingError, bad_request

# Legacy field -> the structured_outputs key replacing it.
LEGACY_CONSTRAINTS = {
    "guided_json": "json",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
}
LEGACY_FIELDS = (*LEGACY_CONSTRAINTS, "guided_decoding_backend", "guided_whitespace_pattern")
_LEGACY_REASON = "vLLM replaced the guided_* request fields with the structured_outputs object"
LEGACY_DEPRECATIONS: dict[str, DeprecatedOption] = {
    old: DeprecatedOption(old, f"structured_outputs.{new}", "0.1.0", "0.3.0", _LEGACY_REASON)
    for old, new in {**LEGACY_CONSTRAINTS, "guided_decoding_backend": "backend"}.items()
}
_WHITESPACE_PATTERN = (
    "{name} is not supported: neither structured-output backend (xgrammar, guidance) takes "
    "a whitespace pattern; JSON output allows runs of up to 8 whitespace characters, or "
    "none with structured_outputs.disable_any_whitespace: true"
)
# Keys of the structured_outputs object (vLLM's names; ``whitespace_pattern`` is refused).
STRUCTURED_OUTPUTS_KEYS = (*CONSTRAINT_FIELDS, "disable_any_whitespace", "backend")


@dataclass(frozen=True)
class RequestConstraint:
    """The constraint of a request and the field that set it (named in 400s)."""

    params: StructuredOutputsParams
    param: str


def _legacy_warning(name: str, endpoint: str) -> None:
    entry = LEGACY_DEPRECATIONS[name]
    if is_removed(entry):
        raise bad_request(removal_message(entry, f"a {endpoint} request"), name)
    warn_deprecated(entry, f"a {endpoint} request")


def _build(param: str, **kwargs: Any) -> StructuredOutputsParams:
    try:
        return StructuredOutputsParams(**kwargs)
    except ValueError as exc:
        raise bad_request(f"{param}: {exc}", param) from None


def _backend(value: Any, param: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise bad_request(f"{param} must be a backend name (a string), got {value!r}", param)
    try:
        return canonical_backend_name(value)
    except ValueError as exc:
        raise bad_request(f"{param}: {exc}", param) from None


def _from_response_format(value: Any) -> StructuredOutputsParams | None:
    param = "response_format"
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise bad_request(
            'response_format must be an object with a "type": "text", "json_object", '
            f'"json_schema" or "structural_tag"; got {json.dumps(value)[:80]}', param)
    kind = value["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if kind == "structural_tag":
        tag = {k: v for k, v in value.items() if k != "type"}
        # vLLM's legacy form {"type": "structural_tag", "structures": ..., "triggers": ...};
        # the newer {"type": "structural_tag", "format": {...}} is passed on whole.
        return _build(param, structural_tag=tag if "format" not in tag else value)
    if kind != "json_schema":
        raise bad_request(
            f'response_format.type must be "text", "json_object", "json_schema" or '
            f'"structural_tag", got {kind!r}', param)
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise bad_request(
            'response_format of type "json_schema" needs a "json_schema" object with "name" '
            'and "schema"', param)
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise bad_request("response_format.json_schema.name must be a non-empty string", param)
    if "strict" in spec and not isinstance(spec["strict"], bool | None):
        raise bad_request("response_format.json_schema.strict must be a boolean", param)
    schema = spec.get("schema", spec.get("json_schema"))
    if not isinstance(schema, dict | bool) or schema is None:
        raise bad_request(
            "response_format.json_schema.schema must be a JSON schema (an object), got "
            f"{json.dumps(schema)[:80]}", param)
    if isinstance(schema, bool):
        schema = {} if schema else {"not": {}}
    return _build(param, json=schema)


def _from_structured_outputs(value: Any) -> StructuredOutputsParams:
    param = "structured_outputs"
    if not isinstance(value, dict):
        raise bad_request(
            f"structured_outputs must be an object with one of {', '.join(CONSTRAINT_FIELDS)}",
            param)
    if value.get("whitespace_pattern") is not None:
        raise bad_request(_WHITESPACE_PATTERN.format(name="structured_outputs.whitespace_pattern"),
                          param)
    unknown = sorted(k for k in value if k not in STRUCTURED_OUTPUTS_KEYS
                     and k != "whitespace_pattern")
    if unknown:
        raise bad_request(
            f"structured_outputs: unknown key(s) {unknown}; known: {list(STRUCTURED_OUTPUTS_KEYS)}",
            param)
    kwargs = {k: v for k, v in value.items() if k in STRUCTURED_OUTPUTS_KEYS and v is not None}
    if "backend" in kwargs:
        kwargs["backend"] = _backend(kwargs["backend"], "structured_outputs")
    if "disable_any_whitespace" in kwargs and not isinstance(kwargs["disable_any_whitespace"],
                                                             bool):
        raise bad_request("structured_outputs.disable_any_whitespace must be a boolean", param)
    if "json_object" in kwargs and not isinstance(kwargs["json_object"], bool):
        raise bad_request("structured_outputs.json_object must be a boolean", param)
    return _build(param, **kwargs)


def request_constraint(req: Any, endpoint: str) -> RequestConstraint | None:
    """The structured-output constraint a completion/chat request asks for, if any.

    400 (naming the field) for a bad shape or for more than one constraint; legacy
    ``guided_*`` fields log their deprecation once per field per process.
    """
    found: list[RequestConstraint] = []
    response_format = getattr(req, "response_format", None)
    if response_format is not None:
        params = _from_response_format(response_format)
        if params is not None:
            found.append(RequestConstraint(params, "response_format"))
    structured = getattr(req, "structured_outputs", None)
    if structured is not None:
        found.append(RequestConstraint(_from_structured_outputs(structured), "structured_outputs"))
    if getattr(req, "guided_whitespace_pattern", None) is not None:
        raise bad_request(_WHITESPACE_PATTERN.format(name="guided_whitespace_pattern"),
                          "guided_whitespace_pattern")
    for name, key in LEGACY_CONSTRAINTS.items():
        value = getattr(req, name, None)
        if value is None:
            continue
        _legacy_warning(name, endpoint)
        if key == "json" and not isinstance(value, dict | str):
            raise bad_request(f"{name} must be a JSON schema (an object or a string)", name)
        found.append(RequestConstraint(_build(name, **{key: value}), name))
    legacy_backend = getattr(req, "guided_decoding_backend", None)
    if legacy_backend is not None:
        _legacy_warning("guided_decoding_backend", endpoint)
        legacy_backend = _backend(legacy_backend, "guided_decoding_backend")
    if len(found) > 1:
        names = ", ".join(c.param for c in found)
        raise bad_request(
            f"a request takes at most one structured-output constraint, got {len(found)} "
            f"({names}); keep one", found[1].param)
    if not found:
        return None
    constraint = found[0]
    if legacy_backend is not None and constraint.params.backend is None:
        constraint.params.backend = legacy_backend
    return constraint


# ------------------------------------------------------------- forced tool calls


def _tool_parameters(tool) -> dict:
    params = tool.function.parameters
    return copy.deepcopy(params) if params else {"type": "object", "properties": {}}


def _hoist_defs(schema: dict, defs: dict[str, Any]) -> dict:
    """Move ``$defs`` of one tool's schema to the top level (refs stay ``#/$defs/...``)."""
    for key in ("$defs", "definitions"):
        own = schema.pop(key, None)
        if not own:
            continue
        for name, definition in own.items():
            if name in defs and defs[name] != definition:
                raise bad_request(
                    f"tools: two tools define ${key} {name!r} differently; rename one "
                    "(tool_choice \"required\" combines the tools' schemas)", "tools")
            defs[name] = definition
        if key == "definitions":
            text = json.dumps(schema).replace('"#/definitions/', '"#/$defs/')
            schema.clear()
            schema.update(json.loads(text))
    return schema


def forced_tool_schema(req) -> dict | None:
    """The JSON schema that ``tool_choice`` "required" or a named function forces, or None.

    "required": an array (at least one item) of ``{"name": <a tool's name>, "parameters":
    <that tool's arguments>}`` objects, one anyOf branch per tool (at most one item with
    ``parallel_tool_calls: false``); named: the named
    tool's parameters schema (the output is the arguments object). 400 (tool_choice)
    when there are no tools or the named one is not among them.
    """
    choice = req.tool_choice
    if choice is None or isinstance(choice, str) and choice in ("none", "auto"):
        return None
    tools = req.tools or []
    if choice == "required":
        if not tools:
            raise bad_request('tool_choice "required" needs tools', "tool_choice")
        defs: dict[str, Any] = {}
        branches = [
            {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "const": t.function.name},
                    "parameters": _hoist_defs(_tool_parameters(t), defs),
                },
                "required": ["name", "parameters"],
                "additionalProperties": False,
            }
            for t in tools
        ]
        schema: dict[str, Any] = {
            "type": "array", "minItems": 1,
            "items": branches[0] if len(branches) == 1 else {"anyOf": branches},
        }
        if (getattr(req, "model_extra", None) or {}).get("parallel_tool_calls") is False:
            schema["maxItems"] = 1  # one call only
        if defs:
            schema["$defs"] = defs
        return schema
    name = choice.function.name
    for tool in tools:
        if tool.function.name == name:
            return _tool_parameters(tool)
    known = ", ".join(repr(t.function.name) for t in tools) or "none"
    raise bad_request(
        f"tool_choice names the function {name!r}, which is not in tools (tools: {known})",
        "tool_choice")


def parse_required_calls(text: str) -> list[tuple[str, str]] | None:
    """``[(name, arguments JSON)]`` from the output of tool_choice "required"; None when
    the output is not a complete call list (e.g. cut off by max_tokens)."""
    try:
        calls = json.loads(text)
    except ValueError:
        return None
    if not isinstance(calls, list) or not calls:
        return None
    out = []
    for call in calls:
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return None
        out.append((call["name"], json.dumps(call.get("parameters", {}), ensure_ascii=False)))
    return out


def constraint_error(exc: OpenAIServingError, param: str | None) -> OpenAIServingError:
    """Name ``param`` in a 400 the engine raised for a constraint it refused."""
    if param is not None and exc.param is None:
        exc.param = param
    return exc
