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


def test_graph_replay_static_sees_in_place_updates(backplane_platform, backplane_device):
    """The model runner's way (SDK 1.1): record over its buffers, rewrite them, replay."""
    runner = backplane_platform.make_graph_runner()
    if runner is None:
        pytest.skip(f"platform {backplane_platform.name!r} offers no GraphRunner "
                    "(supports_graph_capture=False)")
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(WIDTH, WIDTH, generator=gen).to(backplane_device)
    state = torch.zeros(2 * max(SIZES), WIDTH, device=backplane_device)  # like a KV cache

    def step(x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        # Writes rows of a tensor it closes over at ``slots``, then reads all of it.
        state.index_copy_(0, slots, torch.tanh(x @ weight))
        return x + state.sum(dim=0, keepdim=True)

    x_buf = torch.zeros(max(SIZES), WIDTH, device=backplane_device)
    slot_buf = torch.arange(max(SIZES), device=backplane_device)
    for size in sorted(SIZES, reverse=True):
        runner.capture_static(step, [x_buf[:size], slot_buf[:size]], size)
    for size in SIZES:
        x = torch.randn(size, WIDTH, generator=gen).to(backplane_device)
        slots = torch.randperm(2 * max(SIZES), generator=gen)[:size].to(backplane_device)
        x_buf[:size].copy_(x)
        slot_buf[:size].copy_(slots)
        before = state.clone()
        replayed = runner.replay_static(size)[:size].clone()
        after_replay = state.clone()
        state.copy_(before)
        eager = step(x, slots)
        assert torch.allclose(after_replay, state, atol=1e-5, rtol=1e-5), (
            f"batch {size}: replay wrote other rows of the closed-over tensor than eager")
        assert torch.allclose(replayed, eager, atol=1e-5, rtol=1e-5), (
            f"batch {size}: replay over in-place-updated buffers differs from eager by "
            f"{(replayed - eager).abs().max().item():.3g}")
