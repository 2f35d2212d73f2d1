"""Optimization levels O0..O3 and how they fill in the compilation settings.

- O0: eager PyTorch; no torch.compile, no graphs. Fastest start.
- O1: torch.compile with the platform's compile backend; no graphs.
- O2: O1 plus graph capture of decode steps at padded batch sizes. The default
  on platforms that can capture graphs.
- O3: O2 plus piecewise graphs: the model forward recorded in pieces between the
  attention calls at padded token counts, so prefill chunks and mixed batches
  replay too (attention runs eagerly between the pieces). More start-up time
  (every token count is traced and recorded) for less host time per step.

A level only fills CompilationConfig fields the user left as None; a field set
explicitly wins and the difference is recorded in ``config.notes`` (and logged).
When the user sets no level, the platform chooses: its ConfigPolicy may set
``default_optimization_level`` (an SDK class attribute, None by default);
otherwise platforms with graph capture get O2 and the others O0 (compiling
without graphs costs start-up time for a gain that is not measured yet; a
platform opts into O1 through its policy).
"""

from __future__ import annotations

from dataclasses import fields
from typing import TYPE_CHECKING, Any

from backplane.config.configs import CompilationConfig
from backplane.plugins_sdk.descriptor import GRAPH_CAPTURE, TORCH_COMPILE

if TYPE_CHECKING:
    from backplane.config.engine import EngineConfig
    from backplane.plugins_sdk import Platform

MAX_GRAPH_BATCH_SIZE = 512
LEVELS = (0, 1, 2, 3)

# What each level implies; backend None means "the platform's compile backend".
LEVEL_DEFAULTS: dict[int, dict[str, Any]] = {
    0: {"compile": False, "use_graphs": False, "piecewise_graphs": False},
    1: {"compile": True, "use_graphs": False, "piecewise_graphs": False},
    2: {"compile": True, "use_graphs": True, "piecewise_graphs": False},
    3: {"compile": True, "use_graphs": True, "piecewise_graphs": True},
}


def default_optimization_level(platform: Platform) -> int:
    """The level used when the user sets none: the policy's choice, else 2 with graphs, else 0."""
    chosen = getattr(platform.config_policy, "default_optimization_level", None)
    if chosen is not None:
        return int(chosen)
    return 2 if platform.supports_graph_capture else 0


def default_graph_capture_sizes(max_num_seqs: int) -> list[int]:
    """Batch sizes to capture: 1, 2, 4, then every 8 up to min(max_num_seqs, 512).

    A running batch is padded up to the next captured size, so the ladder
    bounds padding waste to 7 rows past 8 while keeping capture count small.
    """
    cap = max(1, min(max_num_seqs, MAX_GRAPH_BATCH_SIZE))
    sizes = [s for s in (1, 2, 4) if s <= cap]
    sizes += list(range(8, cap + 1, 8))
    if sizes[-1] < cap:
        sizes.append(cap)
    return sizes


def default_piecewise_capture_sizes(max_num_batched_tokens: int) -> list[int]:
    """Token counts to record pieces for: 1, 2, 4, then steps of about 1.5x (8, 12,
    16, 24, ...) up to min(max_num_batched_tokens, 512), and that cap itself.

    A step is padded by less than half its tokens, with few sizes to trace and
    record at start-up (every size traces the whole model once).
    """
    cap = max(1, min(max_num_batched_tokens, MAX_GRAPH_BATCH_SIZE))
    ladder = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
    sizes = [s for s in ladder if s <= cap]
    if sizes[-1] < cap:
        sizes.append(cap)
    return sizes


def apply_optimization_level(config: EngineConfig, platform: Platform) -> list[str]:
    """Resolve ``config.optimization_level`` and fill the compilation settings it implies.

    Returns problems (settings the platform cannot honour); appends notes about
    every decision to ``config.notes``.
    """
    cc = config.compilation_config
    notes = config.notes
    problems: list[str] = []
    explicit = {
        f.name: getattr(cc, f.name) for f in fields(CompilationConfig)
        if getattr(cc, f.name) is not None
    }

    level = config.optimization_level
    if config.enforce_eager:
        if level not in (None, 0):
            notes.append(f"enforce_eager=True overrides optimization_level={level}: running O0")
        level = 0
    elif level is None:
        level = default_optimization_level(platform)
        notes.append(f"optimization level O{level} (default of platform {platform.name!r})")
    if level not in LEVELS:
        problems.append(f"optimization_level ({level}) must be one of 0, 1, 2, 3")
        return problems
    config.optimization_level = level

    implied = dict(LEVEL_DEFAULTS[level])
    if implied["compile"] and platform.compile_backend is None and "backend" not in explicit:
        implied["compile"] = False
        notes.append(
            f"O{level} implies torch.compile, but platform {platform.name!r} has no compile "
            "backend: running without compilation"
        )
    if implied["use_graphs"] and not platform.supports_graph_capture:
        implied["use_graphs"] = implied["piecewise_graphs"] = False
        notes.append(
            f"O{level} implies graph capture, which platform {platform.name!r} does not offer: "
            "running without graphs"
        )
    compiles = explicit.get("compile", implied["compile"])
    implied["backend"] = platform.compile_backend if compiles else None

    for name, value in implied.items():
        if name not in explicit:
            setattr(cc, name, value)
        elif explicit[name] != value and not (name == "backend" and not compiles):
            notes.append(
                f"compilation_config.{name}={explicit[name]!r} set explicitly; it wins over "
                f"O{level}'s default ({value!r})"
            )

    if cc.use_graphs and not platform.supports_graph_capture:
        problems.append(
            f"graph capture (compilation_config.use_graphs=True) is not available on platform "
            f"{platform.name!r}; use -O0 or -O1, or drop use_graphs"
            + _runs_on("graph capture", GRAPH_CAPTURE, platform.name)
        )
        cc.use_graphs = False  # so the platform policy does not report it a second time
    if cc.compile and cc.backend is None:
        problems.append(
            f"torch.compile was requested (compilation_config.compile=True) but platform "
            f"{platform.name!r} has no compile backend; set compilation_config.backend or use -O0"
            + _runs_on("torch.compile", TORCH_COMPILE, platform.name)
        )
    if cc.piecewise_graphs and not platform.supports_graph_capture:
        problems.append(
            f"piecewise graphs (compilation_config.piecewise_graphs=True) need graph capture, "
            f"which platform {platform.name!r} does not offer; use -O0..-O2, or drop "
            "piecewise_graphs" + _runs_on("graph capture", GRAPH_CAPTURE, platform.name))
        cc.piecewise_graphs = False
    if not cc.piecewise_graphs and "piecewise_capture_sizes" in explicit:
        problems.append(
            f"compilation_config.piecewise_capture_sizes ({explicit['piecewise_capture_sizes']}) "
            "has no effect without piecewise graphs: use -O3 or set piecewise_graphs=True, "
            "or drop the sizes")
    if cc.use_graphs and cc.graph_capture_sizes is None:
        cc.graph_capture_sizes = default_graph_capture_sizes(config.scheduler_config.max_num_seqs)
    if cc.piecewise_graphs and cc.piecewise_capture_sizes is None:
        cc.piecewise_capture_sizes = default_piecewise_capture_sizes(
            config.scheduler_config.max_num_batched_tokens)
    for name in ("graph_capture_sizes", "piecewise_capture_sizes"):
        sizes = getattr(cc, name)
        if sizes is None:
            continue
        bad = [s for s in sizes if not isinstance(s, int) or s < 1]
        if bad:
            problems.append(f"compilation_config.{name} has invalid sizes {bad}; use positive "
                            "integers")
        else:
            setattr(cc, name, sorted(set(sizes)))
    return problems


def platforms_with(feature: str, exclude: str | None = None) -> list[str]:
    """Names of the installed platform plugins whose descriptor declares ``feature``.

    Read from the descriptors alone (no plugin is loaded), so it also lists
    platforms that are not usable on this machine.
    """
    from backplane.platforms.discovery import discover_platforms

    return sorted({
        p.display_name for p in discover_platforms()
        if feature in (getattr(p.descriptor, "features", None) or ())
        and p.display_name != exclude
    })


def _runs_on(what: str, feature: str, current: str) -> str:
    """``"; graph capture runs on the cuda, rocm platforms"`` (empty when none has it)."""
    others = platforms_with(feature, exclude=current)
    if not others:
        return ""
    return f"; {what} runs on the {', '.join(others)} platform{'s' if len(others) > 1 else ''}"
