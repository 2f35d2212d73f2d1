"""Conformance: the platform's Communicator in a two-process group.

One spawn per session runs every collective (see `..collectives`); each test
checks one op on both ranks, so a failure names the op that broke.
"""

from __future__ import annotations

import pytest
import torch

from backplane.plugins_sdk.testing.collectives import OPS, expected_results

pytestmark = pytest.mark.backplane_conformance

WORLD_SIZE = 2


def test_communicator_group_setup(backplane_collectives):
    for rank, saved in enumerate(backplane_collectives):
        assert saved.get("setup") is not None, f"rank {rank} failed:\n{saved.get('error')}"
        assert saved["setup"] == {"rank": rank, "world_size": WORLD_SIZE}


@pytest.mark.parametrize("op", OPS)
def test_communicator_collective(backplane_collectives, op):
    expected = expected_results(WORLD_SIZE)[op]
    for rank, saved in enumerate(backplane_collectives):
        if saved.get("setup") is None:
            pytest.fail(f"rank {rank} could not set up the group:\n{saved.get('error')}")
        got = saved["results"][op]
        if isinstance(got, str):
            pytest.fail(f"{op} raised on rank {rank}:\n{got}")
        assert got.shape == expected[rank].shape, (
            f"{op} on rank {rank}: shape {tuple(got.shape)}, expected {tuple(expected[rank].shape)}")
        assert torch.equal(got, expected[rank]), f"{op} on rank {rank}: wrong values\n{got}"
