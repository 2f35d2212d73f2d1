"""Options of `backplane serve` that are not engine options, declared once.

Each field of `ServerOptions` carries its help text (and any extra CLI
spellings) in its metadata; the CLI flags, the YAML keys of ``--config`` and
the docs table all come from this one declaration. Spellings are vLLM's.
"""

from __future__ import annotations

import argparse
import json
import os
import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from backplane.entrypoints.openai.reasoning_parsers import REASONING_PARSERS
from backplane.entrypoints.openai.tool_parsers import TOOL_PARSERS

API_KEY_ENV = "BACKPLANE_API_KEY"
# Either turns --allow-runtime-lora-updating on ("1" or "true"); vLLM's name first.
RUNTIME_LORA_ENVS = ("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "BACKPLANE_ALLOW_RUNTIME_LORA_UPDATING")


@dataclass(frozen=True)
class LoRAModule:
    """One ``--lora-modules`` entry: an adapter served under ``name`` from ``path``."""

    name: str
    path: str
    base_model_name: str | None = None


def parse_lora_module(entry: str) -> LoRAModule:
    """``name=path`` or a JSON object ``{"name", "path", "base_model_name"?}``; ValueError."""
    text = entry.strip()
    if text.startswith("{"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--lora-modules {entry!r}: invalid JSON ({exc})") from None
        unknown = sorted(set(obj) - {"name", "path", "base_model_name"})
        if unknown:
            raise ValueError(f"--lora-modules {entry!r}: unknown key(s) {unknown}; expected "
                             "name, path and optionally base_model_name")
        name, path, base = obj.get("name"), obj.get("path"), obj.get("base_model_name")
        if base is not None and (not isinstance(base, str) or not base):
            raise ValueError(f"--lora-modules {entry!r}: base_model_name must be a string")
    else:
        name, sep, path = text.partition("=")
        if not sep:
            raise ValueError(f"--lora-modules {entry!r}: expected name=path or a JSON object "
                             '{"name": ..., "path": ...}')
        name, path, base = name.strip(), path.strip(), None
    if not isinstance(name, str) or not name:
        raise ValueError(f"--lora-modules {entry!r}: the adapter name is missing or empty")
    if not isinstance(path, str) or not path:
        raise ValueError(f"--lora-modules {entry!r}: the adapter path is missing or empty")
    return LoRAModule(name, path, base)


def parse_lora_modules(entries: list[str]) -> list[LoRAModule]:
    """Every ``--lora-modules`` entry parsed; ValueError for a bad one or a repeated name."""
    modules = [parse_lora_module(e) for e in entries]
    seen: set[str] = set()
    for m in modules:
        if m.name in seen:
            raise ValueError(f"--lora-modules: the adapter name {m.name!r} is given twice")
        seen.add(m.name)
    return modules


def runtime_lora_updating_from_env() -> bool | None:
    """True/False when VLLM_/BACKPLANE_ALLOW_RUNTIME_LORA_UPDATING is set, else None."""
    found = None
    for name in RUNTIME_LORA_ENVS:
        value = os.environ.get(name)
        if value is not None and value.strip():
            found = bool(found) or value.strip().lower() in ("1", "true")
    return found


def _opt(default: Any, help: str, **meta: Any) -> Any:
    """A dataclass field with its help text (and CLI extras) in the metadata."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


@dataclass(frozen=True)
class ServerOptions:
    """Every server option with its default; see each field's help."""

    host: str = _opt("0.0.0.0", "address to bind")
    port: int = _opt(8000, "port to bind")
    api_key: str | None = _opt(
        None, f"require 'Authorization: Bearer KEY' on the API routes (also {API_KEY_ENV})"
    )
    chat_template: str | None = _opt(
        None, "Jinja chat template (a file path or the template itself) overriding the "
        "tokenizer's", metavar="FILE_OR_TEMPLATE", default_doc="the tokenizer's",
    )
    trust_request_chat_template: bool = _opt(
        False, "render chat_template sent in requests (templates are code: off by default)"
    )
    chat_template_timeout: float = _opt(
        2.0, "seconds a chat template may take to render before the request is refused"
    )
    response_role: str = _opt(
        "assistant", "role of the generated message in chat responses (streamed and not)"
    )
    uvicorn_log_level: str = _opt(
        "info", "uvicorn's log level (`critical`, `error`, `warning`, `info`, `debug`, "
        "`trace`)",
        choices=("critical", "error", "warning", "info", "debug", "trace"),
    )
    root_path: str = _opt("", "ASGI root_path when served behind a path-prefixing proxy")
    graceful_shutdown_timeout: float = _opt(
        10.0, "seconds in-flight requests may take to finish after SIGINT/SIGTERM; past that "
        "each gets an error and the server exits"
    )
    max_n: int = _opt(128, "most completions (n) one request may ask for")
    max_sequences_per_request: int = _opt(
        1024, "most sequences (prompts x n) one completions request may start"
    )
    max_request_body_bytes: int = _opt(
        32 * 2**20, "largest request body accepted; larger ones get 413 (with an OpenAI "
        "error body)", default_doc="`33554432` (32 MiB)",
    )
    limit_concurrency: int | None = _opt(
        None, "most connections and tasks at once; past it new connections get 503 "
        "(uvicorn's limit)"
    )
    timeout_keep_alive: float = _opt(5.0, "seconds an idle keep-alive connection stays open")
    header_timeout: float = _opt(
        10.0, "seconds a new connection has to send its request headers before it is closed"
    )
    enable_request_id_headers: bool = _opt(
        False, "answer with an X-Request-Id header (the client's own, or a new id)"
    )
    expose_model_path: bool = _opt(
        False, "report the model's filesystem path as 'root' in /v1/models (off: the "
        "served name, so the server's layout is not revealed)"
    )
    ssl_keyfile: str | None = _opt(None, "TLS private key file (serve HTTPS)")
    ssl_certfile: str | None = _opt(None, "TLS certificate file (serve HTTPS)")
    allowed_origins: list[str] = _opt(
        [], "CORS allowed origins (JSON list or several values); CORS is off when empty"
    )
    allowed_methods: list[str] = _opt(["*"], "CORS allowed methods")
    allowed_headers: list[str] = _opt(["*"], "CORS allowed headers")
    allow_credentials: bool = _opt(False, "CORS: allow credentials")
    enable_log_requests: bool = _opt(
        False, "log each request's id, prompt length and sampling parameters",
        negative=("--disable-log-requests",),
    )
    disable_log_stats: bool = _opt(
        False, "do not log engine throughput and cache usage every 10 s"
    )
    disable_fastapi_docs: bool = _opt(False, "do not serve /docs, /redoc and /openapi.json")
    middleware: list[str] = _opt(
        [], "import path of an ASGI middleware class or an HTTP middleware function "
        "(`module.attr`, an `async def (request, call_next)`); repeatable"
    )
    stream_interval: int = _opt(
        1, "stream a chunk every N generated tokens (fewer, larger chunks)"
    )
    enable_auto_tool_choice: bool = _opt(
        False, "parse the tool calls the model writes into `tool_calls` (chat requests with "
        "`tools` and `tool_choice` `auto`); needs --tool-call-parser"
    )
    tool_call_parser: str | None = _opt(
        None, "how the model writes tool calls (see docs/tool_calling.md): "
        + ", ".join(f"`{n}`" for n in TOOL_PARSERS),
        choices=TOOL_PARSERS, metavar="{" + ",".join(TOOL_PARSERS) + "}",
    )
    reasoning_parser: str | None = _opt(
        None, "split chat replies into `reasoning_content` and `content` (see "
        "docs/tool_calling.md): " + ", ".join(f"`{n}`" for n in REASONING_PARSERS),
        choices=REASONING_PARSERS, metavar="{" + ",".join(REASONING_PARSERS) + "}",
    )

    lora_modules: list[str] = _opt(
        [], "LoRA adapters to serve (needs --enable-lora): `name=path` or a JSON object "
        '`{"name": ..., "path": ..., "base_model_name": ...}`, several values; a request '
        "picks one by its `model` field",
        metavar="NAME=PATH",
    )
    allow_runtime_lora_updating: bool = _opt(
        False, "serve `POST /v1/load_lora_adapter` and `/v1/unload_lora_adapter` (also "
        "`VLLM_ALLOW_RUNTIME_LORA_UPDATING=True` or `BACKPLANE_ALLOW_RUNTIME_LORA_UPDATING=1`)"
    )

    def __post_init__(self) -> None:
        problems = []
        try:
            parse_lora_modules(self.lora_modules)
        except ValueError as exc:
            problems.append(str(exc))
        if not 0 <= self.port <= 65535:
            problems.append(f"port must be in [0, 65535], got {self.port}")
        for name in ("max_n", "max_sequences_per_request", "max_request_body_bytes",
                     "stream_interval"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("chat_template_timeout", "timeout_keep_alive", "header_timeout",
                     "graceful_shutdown_timeout"):
            if not getattr(self, name) > 0:
                problems.append(f"{name} must be > 0, got {getattr(self, name)}")
        if self.limit_concurrency is not None and self.limit_concurrency < 1:
            problems.append(f"limit_concurrency must be >= 1, got {self.limit_concurrency}")
        if bool(self.ssl_keyfile) != bool(self.ssl_certfile):
            problems.append("ssl_keyfile and ssl_certfile must be given together")
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            problems.append(
                "--enable-auto-tool-choice requires --tool-call-parser to be set (one of "
                f"{', '.join(TOOL_PARSERS)})"
            )
        if self.tool_call_parser is not None and self.tool_call_parser not in TOOL_PARSERS:
            problems.append(f"tool_call_parser must be one of {', '.join(TOOL_PARSERS)}, got "
                            f"{self.tool_call_parser!r}")
        if self.reasoning_parser is not None and self.reasoning_parser not in REASONING_PARSERS:
            problems.append(f"reasoning_parser must be one of {', '.join(REASONING_PARSERS)}, "
                            f"got {self.reasoning_parser!r}")
        if problems:
            raise ValueError("; ".join(problems))


SERVER_OPTION_KEYS = frozenset(f.name for f in fields(ServerOptions)) | {"disable_log_requests"}


def _base_type(annotation: Any) -> tuple[Any, bool]:
    args = typing.get_args(annotation)
    if isinstance(annotation, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        return non_none[0], True
    return annotation, False


def _field_types() -> dict[str, tuple[Any, bool]]:
    hints = typing.get_type_hints(ServerOptions)
    return {name: _base_type(hint) for name, hint in hints.items()}


def convert_value(name: str, value: Any) -> Any:
    """``value`` (from YAML or a flag) as option ``name``'s type; ValueError naming it."""
    base, optional = _field_types()[name]
    if value is None:
        if optional:
            return None
        raise ValueError(f"{name}: None is not allowed")
    try:
        if base is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                return value.lower() in ("true", "1")
            return bool(value)
        if typing.get_origin(base) is list:
            items = [value] if isinstance(value, str) else list(value)
            out: list[str] = []
            for item in items:  # a JSON list (vLLM's spelling) or plain values
                if isinstance(item, str) and item.lstrip().startswith("["):
                    out.extend(_list_item(v) for v in json.loads(item))
                else:
                    out.append(_list_item(item))
            return out
        if base is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return base(value)
    except (TypeError, ValueError, json.JSONDecodeError):
        raise ValueError(f"{name}: {value!r} is not a valid {getattr(base, '__name__', base)}") \
            from None


def _list_item(value: Any) -> str:
    """One item of a list option as text (a mapping, as in --lora-modules, as JSON)."""
    return json.dumps(value) if isinstance(value, dict) else str(value)


def add_server_args(parser: argparse.ArgumentParser) -> None:
    """One flag per ServerOptions field (defaults SUPPRESS so a config file can set them)."""
    group = parser.add_argument_group("server")
    sup = argparse.SUPPRESS
    types_ = _field_types()
    for f in fields(ServerOptions):
        base, _ = types_[f.name]
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else f.default_factory()
        help_text = f.metadata["help"] + (f" [default: {default}]" if default not in
                                          (None, [], "") else "")
        if base is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                               default=sup, help=help_text)
            for negative in f.metadata.get("negative", ()):
                group.add_argument(negative, dest=f.name, action="store_false", default=sup,
                                   help=f"same as --no-{flag[2:]}")
        elif typing.get_origin(base) is list:
            group.add_argument(flag, dest=f.name, nargs="+", action="extend", default=sup,
                               metavar=f.metadata.get("metavar", f.name.upper()),
                               help=help_text)
        else:
            group.add_argument(
                flag, dest=f.name, default=sup, help=help_text,
                type=lambda text, name=f.name: _argparse_convert(name, text),
                choices=f.metadata.get("choices"), metavar=f.metadata.get("metavar"),
            )


def _argparse_convert(name: str, text: str) -> Any:
    try:
        return convert_value(name, text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def resolve_server_options(args: argparse.Namespace, from_file: dict | None = None,
                           where: str = "config file") -> ServerOptions:
    """Server options from defaults < config file < environment (API key) < flags."""
    values: dict[str, Any] = {}
    for key, value in (from_file or {}).items():
        if key == "disable_log_requests":
            key, value = "enable_log_requests", not convert_value("enable_log_requests", value)
        if key in _field_types() and value is not None:
            try:
                values[key] = convert_value(key, value)
            except ValueError as exc:
                raise ValueError(f"{where}: {exc}") from None
    if os.environ.get(API_KEY_ENV):
        values["api_key"] = os.environ[API_KEY_ENV]
    runtime_lora = runtime_lora_updating_from_env()
    if runtime_lora is not None:
        values["allow_runtime_lora_updating"] = runtime_lora
    for f in fields(ServerOptions):
        if hasattr(args, f.name):
            value = getattr(args, f.name)
            values[f.name] = convert_value(f.name, value) if isinstance(value, list) else value
    return ServerOptions(**values)
