"""`StructuredOutputsParams`: the constraint a request carries, validated and keyed."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

from backplane.core.structured_outputs.errors import InvalidSpecError

# The constraint fields, in the order they are reported; exactly one must be set.
CONSTRAINT_FIELDS = ("json", "json_object", "regex", "choice", "grammar", "structural_tag")
BACKEND_NAMES = ("auto", "xgrammar", "guidance")
# Longest run of free whitespace JSON output may hold between tokens. Unbounded
# whitespace lets a weak model fill max_tokens with blanks instead of JSON (a common
# failure); 8 still allows pretty-printed output (newline plus indentation) a few
# levels deep.
MAX_JSON_WHITESPACE = 8
_BACKEND_ALIASES = {"llguidance": "guidance"}


def canonical_backend_name(name: str) -> str:
    """``"llguidance"`` -> ``"guidance"``; raises ValueError on an unknown name."""
    name = _BACKEND_ALIASES.get(name, name)
    if name not in BACKEND_NAMES:
        raise ValueError(
            f"unknown structured-output backend {name!r}; expected one of {list(BACKEND_NAMES)}")
    return name


def _canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@dataclass
class StructuredOutputsParams:
    """One request's output constraint (the OpenAI-style ``response_format`` / vLLM
    ``structured_outputs`` shapes map onto it one to one).

    Exactly one of the constraint fields is set:

    * ``json``: a JSON schema, as a dict or a JSON string;
    * ``json_object``: any JSON object (``{"type": "object"}``);
    * ``regex``: the whole output matches this regular expression;
    * ``choice``: the output is exactly one of these strings;
    * ``grammar``: an EBNF/GBNF grammar (``root ::= ...``, both backends) or a Lark
      grammar (``start: ...``, guidance only);
    * ``structural_tag``: an xgrammar structural tag (dict or JSON string); the legacy
      ``{"structures": [...], "triggers": [...]}`` form works on both backends.

    ``disable_any_whitespace`` makes JSON output compact (no free whitespace between
    tokens). ``backend`` overrides the engine's default backend for this request.
    Construction validates the shape (not the spec itself: see
    `StructuredOutputManager.validate`).
    """

    json: str | dict | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    structural_tag: str | dict | None = None
    disable_any_whitespace: bool = False
    backend: str | None = None

    def __post_init__(self) -> None:
        set_fields = [name for name in CONSTRAINT_FIELDS if self._is_set(name)]
        if len(set_fields) != 1:
            if not set_fields:
                raise ValueError(
                    "structured outputs need exactly one constraint, got none; set one of "
                    + ", ".join(CONSTRAINT_FIELDS))
            raise ValueError(
                "structured outputs need exactly one constraint, got "
                f"{len(set_fields)}: {', '.join(set_fields)}")
        if self.backend is not None:
            self.backend = canonical_backend_name(self.backend)
        kind = set_fields[0]
        if kind == "json" and isinstance(self.json, str):
            try:
                json.loads(self.json)
            except json.JSONDecodeError as exc:
                raise InvalidSpecError(f"json: the schema is not valid JSON: {exc}") from exc
        elif kind == "json" and not isinstance(self.json, dict):
            raise InvalidSpecError(
                f"json: expected a JSON schema (dict or string), got {type(self.json).__name__}")
        elif kind == "regex" and not isinstance(self.regex, str):
            raise InvalidSpecError("regex: expected a string")
        elif kind == "grammar" and not isinstance(self.grammar, str):
            raise InvalidSpecError("grammar: expected a string")
        elif kind == "choice":
            if not isinstance(self.choice, list | tuple) or not all(
                    isinstance(c, str) for c in self.choice):
                raise InvalidSpecError("choice: expected a list of strings")
            if not self.choice:
                raise InvalidSpecError("choice: the list of choices is empty")
            self.choice = list(self.choice)
        elif kind == "structural_tag":
            if isinstance(self.structural_tag, str):
                try:
                    tag = json.loads(self.structural_tag)
                except json.JSONDecodeError as exc:
                    raise InvalidSpecError(
                        f"structural_tag: not valid JSON: {exc}") from exc
            else:
                tag = self.structural_tag
            if not isinstance(tag, dict):
                raise InvalidSpecError("structural_tag: expected a JSON object")

    def _is_set(self, name: str) -> bool:
        value = getattr(self, name)
        if name == "json_object":
            return bool(value)
        if name == "choice":
            # An empty list is a set-but-invalid constraint, reported below.
            return value is not None
        return value is not None

    @property
    def kind(self) -> str:
        """The name of the one constraint field that is set."""
        for name in CONSTRAINT_FIELDS:
            if self._is_set(name):
                return name
        raise AssertionError("unreachable: validated in __post_init__")

    def json_schema(self) -> dict | bool:
        """The JSON schema for ``json`` / ``json_object`` constraints."""
        if self.kind == "json_object":
            return {"type": "object"}
        if self.kind != "json":
            raise ValueError(f"a {self.kind} constraint has no JSON schema")
        return json.loads(self.json) if isinstance(self.json, str) else self.json

    def structural_tag_dict(self) -> dict:
        tag = self.structural_tag
        return json.loads(tag) if isinstance(tag, str) else dict(tag)

    def key(self) -> tuple[str, str]:
        """``(kind, canonical spec string)``: equal for constraints that compile to the same
        grammar (JSON is re-serialised with sorted keys; the whitespace option, which changes
        the grammar of JSON kinds, is part of the spec string). The per-request ``backend``
        is not part of the key: caches key on ``(backend, key)``."""
        kind = self.kind
        if kind in ("json", "json_object"):
            spec = _canonical_json(self.json_schema())
            if self.disable_any_whitespace:
                spec += "\x00compact"
        elif kind == "choice":
            spec = _canonical_json(self.choice)
        elif kind == "structural_tag":
            spec = _canonical_json(self.structural_tag_dict())
        else:
            spec = getattr(self, kind)
        return kind, spec

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}
