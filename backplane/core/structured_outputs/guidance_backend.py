"""The llguidance ("guidance") backend: JSON schema, regex, choice, Lark or GBNF grammars and
legacy structural tags. Wider JSON-schema and regex coverage than xgrammar in places
(``(?i)`` flags, ``\\p{..}`` classes); the fallback of ``auto``."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import llguidance
import llguidance.hf
import llguidance.torch
import torch

from backplane.core.structured_outputs.backend import Grammar, GrammarBackend
from backplane.core.structured_outputs.errors import InvalidSpecError, UnsupportedSpecError
from backplane.core.structured_outputs.params import MAX_JSON_WHITESPACE, StructuredOutputsParams

# The same bound on free JSON whitespace as the xgrammar backend (params.py says why).
_WHITESPACE = rf"[\x20\x0A\x0D\x09]{{0,{MAX_JSON_WHITESPACE}}}"

# llguidance error messages that mean "valid, but not implemented here".
_UNSUPPORTED_MESSAGE = re.compile(
    r"unimplemented|not supported|only supported|unknown format|not implemented", re.I)


@dataclass
class GuidanceCompiled:
    """A validated llguidance grammar plus a pristine matcher that per-request matchers are
    deep-copied from (cheaper than building the lexer again)."""

    grammar: str
    template: Any
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def new_matcher(self) -> Any:
        with self.lock:
            return self.template.deep_copy()


class GuidanceGrammar(Grammar):
    backend_name = "guidance"

    def __init__(self, compiled: GuidanceCompiled, vocab_size: int,
                 eos_token_ids: Sequence[int]) -> None:
        super().__init__(compiled, vocab_size, eos_token_ids)
        self._matcher = compiled.new_matcher()
        self._eos = frozenset(eos_token_ids)
        # One entry per accepted token: (forwarded to the matcher, is a stop token). An EOS
        # that arrives after the matcher stopped is accepted without being forwarded.
        self._history: list[tuple[bool, bool]] = []

    def _step(self, tok: int) -> tuple[bool, bool] | None:
        if self.is_terminated():
            return None
        is_eos = tok in self._eos
        if is_eos and self._matcher.is_stopped() and not self._matcher.is_error():
            return (False, True)
        # Check first: a failed consume leaves the matcher in a permanent error state.
        if self._matcher.validate_tokens([tok]) != 1 or not self._matcher.consume_token(tok):
            return None
        return (True, is_eos)

    def accept_tokens(self, token_ids: Sequence[int]) -> bool:
        start = len(self._history)
        for tok in token_ids:
            entry = self._step(int(tok))
            if entry is None:
                self._undo(len(self._history) - start)
                return False
            self._history.append(entry)
        self.num_processed_tokens = len(self._history)
        return True

    def validate_tokens(self, token_ids: Sequence[int]) -> int:
        before = len(self._history)
        if self.accept_tokens(token_ids):
            self._undo(len(token_ids))
            return len(token_ids)
        # Find the accepted prefix one token at a time (rare: only on a reject).
        count = 0
        for tok in token_ids:
            entry = self._step(int(tok))
            if entry is None:
                break
            self._history.append(entry)
            count += 1
        self._undo(len(self._history) - before)
        return count

    def _undo(self, n: int) -> None:
        if n <= 0:
            return
        popped = self._history[-n:]
        del self._history[-n:]
        forwarded = sum(1 for fwd, _ in popped if fwd)
        if forwarded:
            self._matcher.rollback(forwarded)
        self.num_processed_tokens = len(self._history)

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        llguidance.torch.fill_next_token_bitmask(self._matcher, bitmask, row)

    def is_terminated(self) -> bool:
        return bool(self._history) and self._history[-1][1]

    def rollback(self, num_tokens: int) -> None:
        if num_tokens > len(self._history):
            raise ValueError(
                f"cannot roll back {num_tokens} tokens; only {len(self._history)} accepted")
        self._undo(num_tokens)

    def reset(self) -> None:
        self._matcher.reset()
        self._history.clear()
        self.num_processed_tokens = 0


class GuidanceBackend(GrammarBackend):
    name = "guidance"

    def __init__(self, tokenizer: Any, vocab_size: int,
                 eos_token_ids: Sequence[int] | None = None) -> None:
        super().__init__(tokenizer, vocab_size, eos_token_ids)
        # n_vocab pads to the model's vocabulary; ids past the tokenizer have no bytes and
        # are never allowed.
        eos = self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else self.eos_token_ids
        self.ll_tokenizer = llguidance.hf.from_tokenizer(
            tokenizer, n_vocab=self.vocab_size, eos_token=eos)

    def _grammar_text(self, params: StructuredOutputsParams) -> str:
        kind = params.kind
        try:
            if kind in ("json", "json_object"):
                return llguidance.LLMatcher.grammar_from_json_schema(
                    json.dumps(params.json_schema()),
                    defaults={"whitespace_flexible": not params.disable_any_whitespace,
                              "whitespace_pattern": _WHITESPACE})
            if kind == "regex":
                return llguidance.LLMatcher.grammar_from_regex(params.regex)
            if kind == "choice":
                return llguidance.grammar_from("choice", json.dumps(params.choice))
            if kind == "grammar":
                if not params.grammar.strip():
                    raise InvalidSpecError("grammar: the grammar is empty")
                return llguidance.grammar_from("grammar", params.grammar)
            if kind == "structural_tag":
                return self._structural_tag(params.structural_tag_dict())
        except (InvalidSpecError, UnsupportedSpecError):
            raise
        except (ValueError, TypeError, RuntimeError) as exc:
            self._raise(params, str(exc), exc)
        raise AssertionError(f"unhandled constraint kind {kind}")

    def _structural_tag(self, tag: dict) -> str:
        if "structures" not in tag:
            raise UnsupportedSpecError(
                "structural_tag: guidance supports only the legacy "
                '{"structures": [...], "triggers": [...]} form', backend=self.name)
        tags = []
        try:
            triggers = list(tag["triggers"])
            for s in tag["structures"]:
                trigger = next((t for t in triggers if s["begin"].startswith(t)), None)
                if trigger is None:
                    raise InvalidSpecError(
                        f"structural_tag: no trigger is a prefix of begin {s['begin']!r}")
                tags.append(llguidance.StructTag(trigger=trigger, begin=s["begin"],
                                                 grammar=s["schema"], end=s["end"]))
        except (KeyError, TypeError, AssertionError) as exc:
            raise InvalidSpecError(f"structural_tag: malformed legacy tag: {exc!r}") from exc
        return llguidance.StructTag.to_grammar(tags)

    def _raise(self, params: StructuredOutputsParams, message: str,
               cause: BaseException | None = None) -> None:
        text = f"{params.kind}: {message.strip()}"
        if _UNSUPPORTED_MESSAGE.search(message):
            raise UnsupportedSpecError(f"guidance cannot enforce this {text}",
                                       backend=self.name) from cause
        raise InvalidSpecError(f"invalid {text}") from cause

    def validate(self, params: StructuredOutputsParams) -> None:
        grammar = self._grammar_text(params)
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, None)
        if is_error:
            self._raise(params, messages[0] if messages else "invalid grammar")

    def compile_spec(self, params: StructuredOutputsParams) -> GuidanceCompiled:
        grammar = self._grammar_text(params)
        matcher = llguidance.LLMatcher(self.ll_tokenizer, grammar, log_level=0)
        if matcher.is_error():
            self._raise(params, matcher.get_error())
        return GuidanceCompiled(grammar=grammar, template=matcher)

    def new_grammar(self, compiled: GuidanceCompiled) -> GuidanceGrammar:
        return GuidanceGrammar(compiled, self.vocab_size, self.eos_token_ids)
