"""Hook specifications for general plugins (entry point group ``backplane.plugins``).

A general plugin implements any subset of these hooks with
`backplane.plugins_sdk.hookimpl`; the names and arguments below are part of the
plugin SDK contract (docs/plugins.md). An implementation may accept fewer
arguments than the spec (pluggy passes only the ones it names).
"""

from __future__ import annotations

from typing import Any

from backplane.plugins_sdk.hooks import hookspec


@hookspec
def register_models(registry: Any) -> None:
    """Add model architectures: call ``registry.register_model(architecture, model_cls)``.

    ``architecture`` is the name in a checkpoint's config.json ``architectures``
    list; ``model_cls`` is a Backplane model class (built as ``cls(hf_config, dtype)``,
    see `backplane.core.models.base.CausalLM`) or a lazy ``"package.module:Class"``
    string. Registering an existing name replaces the built-in implementation.
    """


@hookspec
def register_attention_backends(platform_name: str) -> list[type] | None:
    """Attention backends (AttentionBackend subclasses) to offer on ``platform_name``.

    Called once per process when that platform is loaded; the returned backends
    are registered on it (`Platform.register_attention_backend`) and listed by
    ``platform.all_attention_backends()`` after the platform's own, so they are
    used when forced by name with ``attention_backend=...`` or when no built-in
    backend can serve a model. The platform's ``attention_backends()`` is left
    as its class defines it. Return None or [] for platforms the plugin does
    not target.
    """


@hookspec
def register_logits_processors() -> list[Any] | None:
    """Logits processors applied by the engine to every step's logits, in order.

    Each is a callable ``processor(logits, output_token_ids) -> logits`` where
    ``logits`` is the ``[num_reqs, vocab]`` float tensor about to be sampled and
    ``output_token_ids`` the list (per request, same order) of tokens generated
    so far. It returns the (possibly in-place) modified logits.
    """
