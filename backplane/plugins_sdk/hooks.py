"""pluggy markers for general plugins (entry point group ``backplane.plugins``).

A general plugin is a module (or object) whose functions are decorated with
`hookimpl` and named after the hook specs in `backplane.plugins.hookspecs`::

    from backplane.plugins_sdk import hookimpl

    @hookimpl
    def register_models(registry):
        registry.register_model("AcmeForCausalLM", AcmeForCausalLM)

Only pluggy is imported here, so plugin modules stay cheap to load.
"""

from __future__ import annotations

import pluggy

PROJECT_NAME = "backplane"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)
