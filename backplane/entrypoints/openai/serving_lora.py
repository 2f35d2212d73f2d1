"""LoRA adapters served by name: ``--lora-modules`` and the runtime load/unload routes.

A request picks an adapter by its ``model`` field. `LoRAAdapters` maps each
adapter name to the `LoRARequest` the engine runs it with (ids 1, 2, ... in
the order adapters were added; an id is never reused, so an adapter reloaded
under an old name is a new adapter to the engine). Every adapter is checked
by the engine (`LLMEngine.validate_lora_request`) before it is served; its
weights are read by the engine core on first use.

With ``--allow-runtime-lora-updating`` (or ``VLLM_ALLOW_RUNTIME_LORA_UPDATING``)
the server also answers vLLM's routes:

    POST /v1/load_lora_adapter    {"lora_name": ..., "lora_path": ...}
    POST /v1/unload_lora_adapter  {"lora_name": ...}

Unloading stops new requests from naming the adapter; requests already
running with it finish.
"""

from __future__ import annotations

import asyncio
import logging
from http import HTTPStatus

from pydantic import BaseModel, ConfigDict

from backplane.config.server_options import LoRAModule
from backplane.entrypoints.openai.errors import OpenAIServingError, bad_request
from backplane.lora import LoRARequest

logger = logging.getLogger(__name__)


class LoadLoRAAdapterRequest(BaseModel):
    """Body of ``POST /v1/load_lora_adapter`` (vLLM's)."""

    model_config = ConfigDict(extra="ignore")

    lora_name: str
    lora_path: str


class UnloadLoRAAdapterRequest(BaseModel):
    """Body of ``POST /v1/unload_lora_adapter`` (vLLM's; ``lora_int_id`` is ignored)."""

    model_config = ConfigDict(extra="ignore")

    lora_name: str
    lora_int_id: int | None = None


class LoRAAdapters:
    """The adapters a server serves, by name.

    Args:
        engine: the AsyncEngine (its synchronous ``engine`` validates adapters).
        base_names: the served model names, which no adapter may take.
    """

    def __init__(self, engine, base_names: list[str]) -> None:
        self._engine = engine
        self._base_names = frozenset(base_names)
        self._adapters: dict[str, LoRARequest] = {}
        self._next_id = 1
        self._lock = asyncio.Lock()

    def __contains__(self, name: object) -> bool:
        return name in self._adapters

    def __len__(self) -> int:
        return len(self._adapters)

    def get(self, name: str | None) -> LoRARequest | None:
        """The adapter named ``name``, or None."""
        return None if name is None else self._adapters.get(name)

    def all(self) -> list[LoRARequest]:
        """Every adapter served now, in the order they were added."""
        return list(self._adapters.values())

    @property
    def enabled(self) -> bool:
        """Whether the engine serves LoRA adapters at all (``--enable-lora``)."""
        return getattr(self._engine.config, "lora_config", None) is not None

    # ----- adding and removing -----

    def _check_name(self, name: str) -> None:
        if not name or not name.strip():
            raise ValueError("the adapter name must not be empty")
        if name in self._base_names:
            raise ValueError(f"the adapter name {name!r} is a served model name; pick another")
        if name in self._adapters:
            raise ValueError(f"the LoRA adapter {name!r} has already been loaded")

    def _request(self, name: str, path: str, base_model_name: str | None) -> LoRARequest:
        lora = LoRARequest(name, self._next_id, path, base_model_name=base_model_name)
        self._validate(lora)
        return lora

    def _validate(self, lora: LoRARequest) -> None:
        """ValueError (the engine's message) unless the engine can serve ``lora``."""
        if not self.enabled:
            raise ValueError(
                f"LoRA adapter {lora.lora_name!r}: this server was not started with "
                "--enable-lora, so it serves no adapters"
            )
        try:
            self._engine.engine.validate_lora_request(lora)
        except ValueError:
            raise
        except OSError as exc:  # an unreadable path: the caller's mistake, not the server's
            raise ValueError(f"LoRA adapter {lora.lora_name!r} at {lora.lora_path!r}: {exc}") \
                from None

    def _insert(self, lora: LoRARequest) -> None:
        self._adapters[lora.lora_name] = lora
        self._next_id = max(self._next_id, lora.lora_int_id) + 1
        logger.info("LoRA adapter %r (id %d) served from %s", lora.lora_name,
                    lora.lora_int_id, lora.lora_path)

    def add_startup(self, modules: list[LoRAModule]) -> None:
        """Serve the ``--lora-modules`` adapters; ValueError naming the first bad one."""
        if modules and not self.enabled:
            names = ", ".join(repr(m.name) for m in modules)
            raise ValueError(
                f"--lora-modules ({names}) needs --enable-lora: without it the engine serves "
                "no adapters"
            )
        for m in modules:
            try:
                self._check_name(m.name)
                lora = self._request(m.name, m.path, m.base_model_name)
            except ValueError as exc:
                raise ValueError(f"--lora-modules adapter {m.name!r} ({m.path}): {exc}") \
                    from None
            self._insert(lora)

    async def load(self, name: str, path: str) -> LoRARequest:
        """Serve a new adapter (``/v1/load_lora_adapter``); 400 if it cannot be served."""
        async with self._lock:
            try:
                if not path or not path.strip():
                    raise ValueError("lora_path must not be empty")
                self._check_name(name)
                lora = LoRARequest(name, self._next_id, path)
                # The engine reads the adapter's config: off the event loop.
                await asyncio.to_thread(self._validate, lora)
            except ValueError as exc:
                raise bad_request(str(exc), "lora_name" if name in self._adapters
                                  or name in self._base_names else "lora_path") from None
            self._insert(lora)
            return lora

    async def unload(self, name: str) -> LoRARequest:
        """Stop serving ``name`` (``/v1/unload_lora_adapter``); 404 if it is not served.

        Requests already running with it finish; new ones get 404 model_not_found.
        """
        async with self._lock:
            lora = self._adapters.pop(name, None)
            if lora is None:
                raise OpenAIServingError(
                    f"The LoRA adapter {name!r} cannot be found"
                    + (f"; this server serves {', '.join(map(repr, self._adapters))}"
                       if self._adapters else ""),
                    HTTPStatus.NOT_FOUND,
                    param="lora_name",
                    code="lora_adapter_not_found",
                )
            logger.info("LoRA adapter %r (id %d) unloaded", name, lora.lora_int_id)
            return lora
