"""Structured outputs: constrain sampling to a JSON schema, regex, choice list, grammar or
structural tag (vLLM V1 semantics).

Modules
-------
* ``params``: `StructuredOutputsParams`, the request's constraint (exactly one of json,
  json_object, regex, choice, grammar, structural_tag; plus disable_any_whitespace and a
  per-request ``backend``), its validation and its cache ``key()``.
* ``errors``: `InvalidSpecError` (the spec is wrong) and `UnsupportedSpecError` (this backend
  cannot enforce it); both are ValueErrors, i.e. HTTP 400.
* ``backend``: the `GrammarBackend` / `Grammar` interfaces. A backend compiles a constraint
  once against the tokenizer and the model's vocabulary size; a `Grammar` is one request's
  matcher over that compiled form.
* ``xgrammar_backend`` (default) and ``guidance_backend`` (llguidance): the two
  implementations. Both mask ids past the tokenizer's vocabulary and allow EOS only where
  the grammar may end.
* ``manager``: `StructuredOutputManager`: backend choice ("auto" = xgrammar, then guidance
  when xgrammar raises UnsupportedSpecError; a backend named explicitly never falls back),
  a compiled-grammar cache keyed by (backend, params.key()), compilation on a small thread
  pool, and the batch bitmask helpers. `apply_bitmask` (the SDK's `apply_token_bitmask`,
  which platforms may override as `Platform.apply_token_bitmask`) masks logits with tensor
  ops on the logits' device.

How the engine uses it
----------------------
1. At add-request time: ``manager.validate(params)`` (cheap, synchronous) so a bad schema
   is a 400 before scheduling; then ``fut = manager.submit(params)``.
2. The scheduler treats a request whose ``fut.done()`` is False as waiting for its grammar
   and schedules others meanwhile (never ``fut.result()`` on the engine thread); once done,
   ``request.grammar = fut.result()`` (raises the spec error: finish the request with it).
3. Each step: ``bitmask = manager.allocate_bitmask(n)`` (reuse it across steps),
   ``manager.fill_bitmasks([r.grammar or None for r in batch], bitmask)`` for the scheduled
   rows (only constrained requests cost anything), then in the sampler
   ``apply_bitmask(logits, bitmask, rows)`` before temperature/top-k/top-p.
4. After sampling: ``grammar.accept_tokens(new_token_ids)`` (False means the model produced
   a token the grammar rejects: finish the request with an error); with speculative
   decoding, ``validate_tokens`` / ``rollback(n)`` for rejected drafts.
5. On preemption with recompute: ``grammar.reset()`` and re-accept the output tokens kept
   (or just reset when they are dropped). ``is_terminated()`` turns True after EOS.

The core never imports a platform package: bitmasks are filled on the CPU and moved to
the logits' device by `apply_bitmask`.
"""

from backplane.core.structured_outputs.backend import Grammar, GrammarBackend, bitmask_width
from backplane.core.structured_outputs.errors import (
    InvalidSpecError,
    StructuredOutputError,
    UnsupportedSpecError,
)
from backplane.core.structured_outputs.manager import StructuredOutputManager
from backplane.core.structured_outputs.params import StructuredOutputsParams
from backplane.plugins_sdk.token_bitmask import apply_token_bitmask as apply_bitmask
from backplane.plugins_sdk.token_bitmask import unpack_bitmask

__all__ = [
    "Grammar", "GrammarBackend", "InvalidSpecError", "StructuredOutputError",
    "StructuredOutputManager", "StructuredOutputsParams", "UnsupportedSpecError",
    "apply_bitmask", "bitmask_width", "unpack_bitmask",
]
