"""The xgrammar backend (the default): JSON schema, regex, choice, EBNF/Lark grammars and
structural tags compiled against the tokenizer's vocabulary."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

import torch
import xgrammar as xgr

from backplane.core.structured_outputs.backend import Grammar, GrammarBackend
from backplane.core.structured_outputs.errors import InvalidSpecError, UnsupportedSpecError
from backplane.core.structured_outputs.params import MAX_JSON_WHITESPACE, StructuredOutputsParams

# JSON-schema keywords xgrammar accepts but does not enforce: a schema using one is refused
# (UnsupportedSpecError) rather than silently producing output that violates it.
XGRAMMAR_UNENFORCED_KEYWORDS = frozenset({
    "uniqueItems", "contains", "minContains", "maxContains", "propertyNames", "not",
    "if", "then", "else", "dependentRequired", "dependentSchemas",
    "unevaluatedProperties", "unevaluatedItems",
})
# Keywords whose value maps names to subschemas.
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
# Keywords whose value is data, not a schema.
_DATA_KEYWORDS = ("enum", "const", "default", "examples", "required", "description", "title")
# xgrammar error messages that mean "valid, but I can't do it".
_UNSUPPORTED_MESSAGE = re.compile(r"not supported|not implemented|unsupported feature", re.I)


def unenforced_keywords(schema: Any) -> list[str]:
    """The keywords of ``schema`` (recursively) that xgrammar would silently ignore."""
    found: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, list):
            for item in node:
                walk(item)
            return
        if not isinstance(node, dict):
            return
        for key, value in node.items():
            if key in XGRAMMAR_UNENFORCED_KEYWORDS:
                found.add(key)
            if key in _SCHEMA_MAPS and isinstance(value, dict):
                for sub in value.values():
                    walk(sub)
            elif key not in _DATA_KEYWORDS:
                walk(value)

    walk(schema)
    return sorted(found)


def choice_as_ebnf(choices: Sequence[str]) -> str:
    """``root ::= "a" | "b"`` with each choice escaped as an EBNF string literal."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def _is_ebnf(grammar: str) -> bool:
    return "::=" in grammar


def _message(exc: BaseException) -> str:
    # xgrammar's C++ errors start with "[time] file.cc:line: "; keep the useful tail.
    text = str(exc).strip()
    return re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", text) or type(exc).__name__


def _raise_spec_error(params: StructuredOutputsParams, exc: BaseException) -> None:
    message = f"{params.kind}: {_message(exc)}"
    if _UNSUPPORTED_MESSAGE.search(str(exc)):
        raise UnsupportedSpecError(f"xgrammar cannot enforce this {message}",
                                   backend="xgrammar") from exc
    raise InvalidSpecError(f"invalid {message}") from exc


def _legacy_structural_tag(tag: dict) -> tuple[list[Any], list[str]] | None:
    """The vLLM legacy form ``{"structures": [{"begin", "schema", "end"}], "triggers"}``."""
    if "structures" not in tag:
        return None
    try:
        items = [xgr.StructuralTagItem(begin=s["begin"], schema=json.dumps(s["schema"]),
                                       end=s["end"]) for s in tag["structures"]]
        triggers = list(tag["triggers"])
    except (KeyError, TypeError) as exc:
        raise InvalidSpecError(f"structural_tag: malformed legacy tag: {exc!r}") from exc
    return items, triggers


class XgrammarGrammar(Grammar):
    backend_name = "xgrammar"

    def __init__(self, compiled: Any, vocab_size: int, eos_token_ids: Sequence[int]) -> None:
        super().__init__(compiled, vocab_size, eos_token_ids)
        self._matcher = xgr.GrammarMatcher(compiled, override_stop_tokens=list(eos_token_ids))

    def accept_tokens(self, token_ids: Sequence[int]) -> bool:
        accepted = 0
        for tok in token_ids:
            if not self._matcher.accept_token(int(tok)):
                if accepted:
                    self._matcher.rollback(accepted)
                return False
            accepted += 1
        self.num_processed_tokens += accepted
        return True

    def validate_tokens(self, token_ids: Sequence[int]) -> int:
        accepted = 0
        for tok in token_ids:
            if not self._matcher.accept_token(int(tok)):
                break
            accepted += 1
        if accepted:
            self._matcher.rollback(accepted)
        return accepted

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        self._matcher.fill_next_token_bitmask(bitmask, row)

    def is_terminated(self) -> bool:
        return self._matcher.is_terminated()

    def rollback(self, num_tokens: int) -> None:
        if num_tokens <= 0:
            return
        if num_tokens > self.num_processed_tokens:
            raise ValueError(
                f"cannot roll back {num_tokens} tokens; only {self.num_processed_tokens} accepted")
        self._matcher.rollback(num_tokens)
        self.num_processed_tokens -= num_tokens

    def reset(self) -> None:
        self._matcher.reset()
        self.num_processed_tokens = 0


class XgrammarBackend(GrammarBackend):
    name = "xgrammar"

    def __init__(self, tokenizer: Any, vocab_size: int,
                 eos_token_ids: Sequence[int] | None = None, *, max_threads: int = 2) -> None:
        super().__init__(tokenizer, vocab_size, eos_token_ids)
        # vocab_size pads the tokenizer's vocabulary to the model's: xgrammar treats the
        # extra ids as special tokens and never allows them.
        self.tokenizer_info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.eos_token_ids)
        # The manager caches compiled grammars itself.
        self._compiler = xgr.GrammarCompiler(
            self.tokenizer_info, max_threads=max_threads, cache_enabled=False)

    # One function for both steps: ``build`` is either the tokenizer-free ``xgr.Grammar``
    # constructors (validate) or the compiler (compile_spec).
    def _build(self, params: StructuredOutputsParams, compile_: bool) -> Any:
        kind = params.kind
        if kind in ("json", "json_object"):
            schema = params.json_schema()
            bad = unenforced_keywords(schema)
            if bad:
                raise UnsupportedSpecError(
                    f"json: xgrammar does not enforce the JSON-schema keyword(s) {bad}",
                    backend=self.name)
        if kind == "structural_tag":
            tag = params.structural_tag_dict()
            legacy = _legacy_structural_tag(tag)
        try:
            if kind in ("json", "json_object"):
                text = json.dumps(schema)
                any_ws = not params.disable_any_whitespace
                limit = MAX_JSON_WHITESPACE if any_ws else None
                if compile_:
                    return self._compiler.compile_json_schema(
                        text, any_whitespace=any_ws, max_whitespace_cnt=limit)
                return xgr.Grammar.from_json_schema(text, any_whitespace=any_ws,
                                                    max_whitespace_cnt=limit)
            if kind == "regex":
                return (self._compiler.compile_regex(params.regex) if compile_
                        else xgr.Grammar.from_regex(params.regex))
            if kind in ("choice", "grammar"):
                text = choice_as_ebnf(params.choice) if kind == "choice" else params.grammar
                if not text.strip():
                    raise InvalidSpecError(f"{kind}: the grammar is empty")
                grammar = (xgr.Grammar.from_ebnf(text) if _is_ebnf(text)
                           else xgr.Grammar.from_lark(text))
                return self._compiler.compile_grammar(grammar) if compile_ else grammar
            if kind == "structural_tag":
                if legacy is not None:
                    items, triggers = legacy
                    if compile_:
                        return self._compiler.compile_structural_tag(items, triggers)
                    return xgr.Grammar.from_structural_tag(items, triggers)
                text = json.dumps(tag)
                return (self._compiler.compile_structural_tag(text) if compile_
                        else xgr.Grammar.from_structural_tag(text))
        except (InvalidSpecError, UnsupportedSpecError):
            raise
        except (RuntimeError, ValueError, TypeError, xgr.InvalidJSONError,
                xgr.InvalidStructuralTagError) as exc:
            _raise_spec_error(params, exc)
        raise AssertionError(f"unhandled constraint kind {kind}")

    def validate(self, params: StructuredOutputsParams) -> None:
        self._build(params, compile_=False)

    def compile_spec(self, params: StructuredOutputsParams) -> Any:
        return self._build(params, compile_=True)

    def new_grammar(self, compiled: Any) -> XgrammarGrammar:
        return XgrammarGrammar(compiled, self.vocab_size, self.eos_token_ids)
