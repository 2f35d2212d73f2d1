"""Errors of the structured-output layer; both are ValueErrors (HTTP 400 at the API)."""

from __future__ import annotations


class StructuredOutputError(ValueError):
    """Base class: a constraint that cannot be honoured."""


class InvalidSpecError(StructuredOutputError):
    """The spec itself is wrong (malformed JSON schema, bad regex, grammar syntax error)."""


class UnsupportedSpecError(StructuredOutputError):
    """The spec may be valid but this backend cannot enforce it (e.g. a JSON-schema keyword
    it does not implement). ``auto`` falls back to the next backend on this error."""

    def __init__(self, message: str, backend: str | None = None) -> None:
        super().__init__(message)
        self.backend = backend
