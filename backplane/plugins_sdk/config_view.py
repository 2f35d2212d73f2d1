"""PlatformConfigView: what a platform's ConfigPolicy may read and change (SDK 1.1).

The core builds one view from the engine configuration after the model's
config was read, the dtype resolved and the optimization level applied, hands
it to `ConfigPolicy.check_and_update(view)`, and afterwards copies the fields
the policy changed back into the engine configuration. A policy therefore
never sees the core's config classes: everything it may look at is a typed
field here, and everything it may change is one of `WRITABLE_FIELDS`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch

_READ: dict[str, Any] = {"writable": False}
_WRITE: dict[str, Any] = {"writable": True}


def _read(**kwargs: Any) -> Any:
    return field(metadata=_READ, **kwargs)


def _write(**kwargs: Any) -> Any:
    return field(metadata=_WRITE, **kwargs)


@dataclass(kw_only=True)
class PlatformConfigView:
    """The engine configuration as a platform's `ConfigPolicy` sees it.

    The core builds it after reading the model's config, resolving the dtype
    and applying the optimization level (so ``compile``, ``use_graphs`` and
    ``graph_capture_sizes`` already hold what the level implies), and copies
    the writable fields the policy changed back afterwards (`updates`).
    Report every change in ``ConfigDecision.changes`` with its reason.

    Assigning a read-only field (or a name that is not a field) raises
    AttributeError naming it and listing the writable fields; a writable
    field checks what it is given (TypeError / ValueError naming the field).
    The core reports either as a problem of the policy, next to every other
    problem of the configuration.

    ============================  ======================  =====  ===================================
    field                         type                    r/w    meaning
    ============================  ======================  =====  ===================================
    architecture                  str | None              read   the model's HF ``architectures[0]``
    num_layers                    int | None              read   decoder layers
    num_heads                     int | None              read   query heads, whole model
    num_kv_heads                  int | None              read   key/value heads, whole model
    head_size                     int | None              read   dimension of one head
    sliding_window                int | None              read   window in tokens; None: full
    max_model_len                 int | None              read   longest prompt + output (tokens)
    vocab_size                    int | None              read   vocabulary size
    tensor_parallel_size          int                     read   ranks the model is split over
    pipeline_parallel_size        int                     read   pipeline stages
    distributed_executor_backend  str                     read   ``uni`` (in-process), ``mp``...
    max_num_seqs                  int                     read   most requests in one step
    max_num_batched_tokens        int | None              read   token budget of one step
    optimization_level            int | None              read   the resolved level, 0..3
    compile_backend               str | None              read   compile backend; None: no compile
    kv_cache_dtype                str                     read   ``auto`` (model dtype), ``fp8``...
    dtype                         torch.dtype | None      write  the resolved model dtype
    block_size                    int                     write  tokens per KV block, >= 1
    memory_utilization            float | None            write  share of available memory, (0, 1];
                                                                 None: not set (the core then uses 0.9)
    kv_cache_memory_bytes         int | None              write  explicit KV cache bytes, >= 1
    num_kv_blocks                 int | None              write  explicit KV block count, >= 1
    compile                       bool                    write  torch.compile the model forward
    use_graphs                    bool                    write  capture decode steps as graphs
    graph_capture_sizes           tuple[int, ...] | None  write  batch sizes to capture
    attention_backend             str | None              write  forced backend; None: selection
    ============================  ======================  =====  ===================================

    Notes on the fields:

    * Model geometry (``architecture`` .. ``vocab_size``) is None when the
      model's config is not known (``backplane config validate`` without the
      model); a policy must accept that. Head counts are the whole model's: one
      tensor-parallel rank holds ``num_heads // tensor_parallel_size``.
    * ``sliding_window``: a query at position p sees the keys at positions
      ``p - sliding_window + 1 .. p`` (itself and the ``sliding_window - 1``
      before it, the transformers convention; see `AttentionSpec`). None when
      the model has no window, disables it, or the window is at least
      ``max_model_len`` (then it changes nothing).
    * ``dtype`` is None only while the user asked for ``"auto"`` and the
      model's config is unknown.
    * ``optimization_level`` is the user's level or, when none was set, the
      platform's default (`ConfigPolicy.default_optimization_level`);
      ``compile_backend`` is None when the model is not compiled.
    * Graphs: when the policy sets ``use_graphs`` and leaves
      ``graph_capture_sizes`` None, the core fills its default ladder (1, 2, 4,
      then every 8 up to ``max_num_seqs``, at most 512). Assigned sizes are
      stored sorted and without repeats.
    * ``attention_backend`` is what the user forced with
      ``--attention-backend``; selection then uses that backend or fails.

    KV cache sizing (done by the core when the model runner starts, from the
    values the policy left): ``num_kv_blocks`` when set, used as is; else
    ``kv_cache_memory_bytes`` when set; else ``memory_utilization`` x
    ``runtime.available_memory()``. A block count derived from memory (the
    last two) is capped at what ``max_num_seqs`` requests of ``max_model_len``
    tokens can use, and one request of ``max_model_len`` tokens must fit or
    start-up fails. A device whose memory is host RAM shared with the rest of
    the machine (the cpu platform) should not size from
    ``available_memory()`` unless asked to: when none of
    ``kv_cache_memory_bytes``, ``num_kv_blocks`` and ``memory_utilization`` is
    set (``memory_utilization`` reads None then), its policy sets
    ``kv_cache_memory_bytes`` to a fixed default (cpu: 4 GiB) and reports that
    change. The core uses 0.9 for a ``memory_utilization`` left unset.

    Build one in a plugin's tests with `PlatformConfigView.for_testing`
    (no import of Backplane's core).
    """

    # Model geometry (read).
    architecture: str | None = _read()
    num_layers: int | None = _read()
    num_heads: int | None = _read()
    num_kv_heads: int | None = _read()
    head_size: int | None = _read()
    sliding_window: int | None = _read()
    max_model_len: int | None = _read()
    vocab_size: int | None = _read()
    # Parallel layout and scheduler (read).
    tensor_parallel_size: int = _read()
    pipeline_parallel_size: int = _read()
    distributed_executor_backend: str = _read()
    max_num_seqs: int = _read()
    max_num_batched_tokens: int | None = _read()
    # Optimization level and cache dtype (read).
    optimization_level: int | None = _read()
    compile_backend: str | None = _read()
    kv_cache_dtype: str = _read()
    # What a policy may change.
    dtype: torch.dtype | None = _write()
    block_size: int = _write()
    memory_utilization: float | None = _write()
    kv_cache_memory_bytes: int | None = _write()
    num_kv_blocks: int | None = _write()
    compile: bool = _write()
    use_graphs: bool = _write()
    graph_capture_sizes: tuple[int, ...] | None = _write()
    attention_backend: str | None = _write()

    WRITABLE_FIELDS: ClassVar[tuple[str, ...]]
    READ_ONLY_FIELDS: ClassVar[tuple[str, ...]]

    def __post_init__(self) -> None:
        if self.graph_capture_sizes is not None:
            object.__setattr__(self, "graph_capture_sizes", tuple(self.graph_capture_sizes))
        object.__setattr__(self, "_initial", self._writable_values())
        object.__setattr__(self, "_sealed", True)

    def __setattr__(self, name: str, value: Any) -> None:
        if not self.__dict__.get("_sealed"):
            object.__setattr__(self, name, value)  # the dataclass __init__
            return
        if name not in self.WRITABLE_FIELDS:
            what = "is read-only" if name in self.READ_ONLY_FIELDS else "is not a field"
            raise AttributeError(
                f"PlatformConfigView.{name} {what}; a ConfigPolicy may change only "
                f"{', '.join(self.WRITABLE_FIELDS)}"
            )
        object.__setattr__(self, name, _checked(name, value))

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"PlatformConfigView.{name} cannot be deleted")

    def _writable_values(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.WRITABLE_FIELDS}

    def updates(self) -> dict[str, Any]:
        """The writable fields whose value changed since the view was built: {name: value}."""
        initial = self.__dict__["_initial"]
        return {name: value for name, value in self._writable_values().items()
                if value != initial[name]}

    @classmethod
    def for_testing(cls, **overrides: Any) -> PlatformConfigView:
        """A view of a small Llama-shaped model at the engine's defaults, for a plugin's tests.

        Any field (read-only ones included) can be given; the defaults are the
        core's defaults after resolution at O0: a 2-layer model with 4 query
        heads, 2 KV heads, head size 32, 256 tokens of context and a 256-token
        vocabulary, float32, block size 16, memory utilization 0.9 and no
        explicit KV size, no compilation nor graphs, no forced backend.
        """
        values: dict[str, Any] = dict(
            architecture="LlamaForCausalLM", num_layers=2, num_heads=4, num_kv_heads=2,
            head_size=32, sliding_window=None, max_model_len=256, vocab_size=256,
            tensor_parallel_size=1, pipeline_parallel_size=1,
            distributed_executor_backend="uni", max_num_seqs=256, max_num_batched_tokens=2048,
            optimization_level=0, compile_backend=None, kv_cache_dtype="auto",
            dtype=torch.float32, block_size=16, memory_utilization=0.9,
            kv_cache_memory_bytes=None, num_kv_blocks=None, compile=False, use_graphs=False,
            graph_capture_sizes=None, attention_backend=None,
        )
        unknown = sorted(set(overrides) - set(values))
        if unknown:
            raise TypeError(
                f"PlatformConfigView has no field(s) {unknown}; fields: {', '.join(values)}")
        return cls(**(values | overrides))


PlatformConfigView.WRITABLE_FIELDS = tuple(
    f.name for f in fields(PlatformConfigView) if f.metadata["writable"])
PlatformConfigView.READ_ONLY_FIELDS = tuple(
    f.name for f in fields(PlatformConfigView) if not f.metadata["writable"])


def _checked(name: str, value: Any) -> Any:
    """``value`` for writable field ``name`` (normalised), or TypeError/ValueError naming it."""
    where = f"PlatformConfigView.{name}"
    if name == "dtype":
        if not isinstance(value, torch.dtype):
            raise TypeError(f"{where} must be a torch.dtype, got {value!r}")
        return value
    if name in ("compile", "use_graphs"):
        if not isinstance(value, bool):
            raise TypeError(f"{where} must be True or False, got {value!r}")
        return value
    if name == "memory_utilization":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{where} must be a number in (0, 1], got {value!r}")
        if not (math.isfinite(value) and 0.0 < value <= 1.0):
            raise ValueError(f"{where} must be in (0, 1], got {value!r}")
        return float(value)
    if name == "attention_backend":
        if value is not None and not (isinstance(value, str) and value):
            raise TypeError(f"{where} must be a backend name or None, got {value!r}")
        return value
    if name == "graph_capture_sizes":
        if value is None:
            return None
        sizes = list(value) if isinstance(value, (list, tuple, set, frozenset, range)) else None
        if sizes is None or not sizes or not all(_positive_int(s) for s in sizes):
            raise ValueError(f"{where} must be None or positive integers, got {value!r}")
        return tuple(sorted(set(sizes)))
    # block_size, kv_cache_memory_bytes, num_kv_blocks: positive ints (the last two optional).
    if value is None and name != "block_size":
        return None
    if not _positive_int(value):
        raise ValueError(f"{where} must be an integer >= 1, got {value!r}")
    return value


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1
