"""Conformance: graph capture replays exactly what eager execution computes."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.backplane_conformance

SIZES = [1, 2, 4, 8]
WIDTH = 16


def test_graph_flag_matches_runner(backplane_platform):
    runner = backplane_platform.make_graph_runner()
    assert backplane_platform.supports_graph_capture == (runner is not None), (
        f"supports_graph_capture={backplane_platform.supports_graph_capture} but "
        f"make_graph_runner() returned {runner!r}")


@pytest.fixture
def captured(backplane_platform, backplane_device):
    runner = backplane_platform.make_graph_runner()
    if runner is None:
        pytest.skip(f"platform {backplane_platform.name!r} offers no GraphRunner "
                    "(supports_graph_capture=False)")
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(WIDTH, WIDTH, generator=gen).to(backplane_device)

    def step(x: torch.Tensor) -> torch.Tensor:
        # A small "decode step": matmul, non-linearity, reduction and broadcast.
        hidden = torch.tanh(x @ weight)
        return hidden * torch.softmax(hidden, dim=-1) + x.sum(dim=-1, keepdim=True)

    for size in SIZES:
        runner.capture(step, [torch.zeros(size, WIDTH, device=backplane_device)], size)
    return runner, step, gen


def test_graph_captured_sizes(captured):
    runner, _, _ = captured
    assert runner.captured_sizes() == SIZES
    assert runner.padded_size(3) == 4
    assert runner.padded_size(8) == 8
    assert runner.padded_size(9) is None


def test_graph_replay_equals_eager(captured, backplane_device):
    runner, step, gen = captured
    for size in SIZES:
        for _ in range(2):  # fresh inputs each time: replay must not reuse the capture's
            x = torch.randn(size, WIDTH, generator=gen).to(backplane_device)
            replayed = runner.replay([x], size).clone()
            eager = step(x)
            assert torch.allclose(replayed, eager, atol=1e-5, rtol=1e-5), (
                f"batch {size}: replay differs from eager by "
                f"{(replayed - eager).abs().max().item():.3g}")
