"""Optimization levels fill compilation defaults; explicit settings win and are reported."""

from __future__ import annotations

import pytest

from backplane.config.levels import default_graph_capture_sizes, default_optimization_level
from backplane.plugins_sdk import ConfigPolicy
from tests.config.helpers import GraphPlatform, cpu_platform, engine_config


def _finalized(platform, **args):
    return engine_config(**args).finalize(platform)


@pytest.mark.parametrize(
    "level, compile_, graphs",
    [(0, False, False), (1, True, False), (2, True, True), (3, True, True)],
)
def test_levels_fill_compilation_on_graph_platform(level, compile_, graphs):
    cfg = _finalized(GraphPlatform(), optimization_level=level, max_num_seqs=20)
    cc = cfg.compilation_config
    assert (cfg.optimization_level, cc.compile, cc.use_graphs) == (level, compile_, graphs)
    assert cc.backend == ("fake_backend" if compile_ else None)
    assert cc.graph_capture_sizes == ([1, 2, 4, 8, 16, 20] if graphs else None)
    # O3 adds piecewise graphs, at token counts up to the step's token budget.
    assert cc.piecewise_graphs == (level == 3)
    budget = cfg.scheduler_config.max_num_batched_tokens
    assert cc.piecewise_capture_sizes == (
        [s for s in (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
         if s <= budget] if level == 3 else None)


def test_platform_defaults_graph_platform_o2_cpu_o0():
    assert _finalized(GraphPlatform()).optimization_level == 2
    cpu = _finalized(cpu_platform())
    assert cpu.optimization_level == 0
    assert (cpu.compilation_config.compile, cpu.compilation_config.use_graphs) == (False, False)
    assert any("default of platform 'cpu'" in n for n in cpu.notes)


def test_policy_may_choose_the_default_level():
    class PreferO1(ConfigPolicy):
        default_optimization_level = 1

    platform = GraphPlatform(PreferO1())
    assert default_optimization_level(platform) == 1
    assert _finalized(platform).compilation_config.use_graphs is False


def test_o2_on_cpu_runs_without_graphs_and_says_so():
    cfg = _finalized(cpu_platform(), optimization_level=2)
    assert cfg.compilation_config.compile is True
    assert cfg.compilation_config.backend == "inductor"
    assert cfg.compilation_config.use_graphs is False
    assert any("does not offer" in n for n in cfg.notes)


def test_enforce_eager_means_o0_and_reports_conflict():
    cfg = _finalized(GraphPlatform(), enforce_eager=True, optimization_level=2)
    assert cfg.optimization_level == 0
    assert cfg.compilation_config.compile is False
    assert any("enforce_eager=True overrides optimization_level=2" in n for n in cfg.notes)


def test_explicit_settings_win_and_are_reported():
    cfg = _finalized(
        GraphPlatform(), optimization_level=2,
        compilation_config={"use_graphs": False, "backend": "eager"},
    )
    cc = cfg.compilation_config
    assert (cc.compile, cc.use_graphs, cc.backend) == (True, False, "eager")
    joined = "\n".join(cfg.notes)
    assert "compilation_config.use_graphs=False set explicitly" in joined
    assert "compilation_config.backend='eager' set explicitly" in joined

    o0 = _finalized(GraphPlatform(), optimization_level=0,
                    compilation_config={"compile": True})
    assert (o0.compilation_config.compile, o0.compilation_config.backend) == (True, "fake_backend")
    assert any("compilation_config.compile=True" in n for n in o0.notes)


def test_explicit_capture_sizes_are_kept_sorted():
    cfg = _finalized(GraphPlatform(), compilation_config={"graph_capture_sizes": [8, 1, 4]})
    assert cfg.compilation_config.graph_capture_sizes == [1, 4, 8]
    assert cfg.pad_for_graph(3) == 4 and cfg.pad_for_graph(9) is None


def test_default_capture_ladder():
    assert default_graph_capture_sizes(1) == [1]
    assert default_graph_capture_sizes(256)[-3:] == [240, 248, 256]
    assert default_graph_capture_sizes(10_000)[-1] == 512
