"""The multi-LoRA contract (`Platform.add_lora`): the SDK's torch default vs a per-token loop."""

from __future__ import annotations

import pytest
import torch

from backplane.plugins_sdk import LoRAMapping, Platform, add_lora_torch


def make_lora_inputs(n, in_features, out_features, num_slots, rank, dtype=torch.float32,
                     seed=0):
    """Random ``(out, x, lora_a, lora_b)`` with deltas the size of the base output."""
    gen = torch.Generator().manual_seed(seed)
    out = torch.randn(n, out_features, generator=gen).to(dtype)
    x = torch.randn(n, in_features, generator=gen).to(dtype)
    lora_a = (torch.randn(num_slots, rank, in_features, generator=gen)
              * in_features**-0.5).to(dtype)
    lora_b = (torch.randn(num_slots, out_features, rank, generator=gen) * rank**-0.5).to(dtype)
    return out, x, lora_a, lora_b


def naive_add_lora(out, x, lora_a, lora_b, token_slots, output_slices=None):
    """The contract token by token (and part by part), in float64; returns a new tensor."""
    result = out.double().clone()
    slices = output_slices or (out.shape[1],)
    part_rank = lora_a.shape[1] // len(slices)
    for t, slot in enumerate(torch.as_tensor(token_slots).tolist()):
        if slot < 0:
            continue
        offset = 0
        for p, size in enumerate(slices):
            ranks = slice(p * part_rank, (p + 1) * part_rank)
            shrunk = lora_a[slot, ranks].double() @ x[t].double()
            result[t, offset:offset + size] += lora_b[slot, offset:offset + size, ranks].double() @ shrunk
            offset += size
    return result


def block_diagonal(lora_b, output_slices):
    """``lora_b`` with everything outside each part's (rows, ranks) block zeroed: the
    contract's promise for fused layers."""
    if not output_slices:
        return lora_b
    masked = torch.zeros_like(lora_b)
    offset, part = 0, lora_b.shape[2] // len(output_slices)
    for p, size in enumerate(output_slices):
        masked[:, offset:offset + size, p * part:(p + 1) * part] = \
            lora_b[:, offset:offset + size, p * part:(p + 1) * part]
        offset += size
    return masked


def check_against_naive(token_slots, in_features=24, out_features=20, num_slots=4, rank=8,
                        output_slices=None, dtype=torch.float32, tol=1e-5, seed=0):
    n = len(token_slots)
    out, x, lora_a, lora_b = make_lora_inputs(n, in_features, out_features, num_slots, rank,
                                              dtype, seed)
    lora_b = block_diagonal(lora_b, output_slices)
    want = naive_add_lora(out, x, lora_a, lora_b, token_slots, output_slices)
    inputs = [x.clone(), lora_a.clone(), lora_b.clone()]
    mapping = LoRAMapping.build(torch.tensor(token_slots, dtype=torch.int32))
    got = add_lora_torch(out, x, lora_a, lora_b, mapping, output_slices)
    assert got is out and got.dtype == dtype
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    for before, after in zip(inputs, [x, lora_a, lora_b], strict=True):
        assert torch.equal(before, after), "add_lora changed an input"
    return got


def test_mixed_slots_with_base_model_tokens():
    slots = [2, -1, 0, 2, 3, -1, 0, 0, 2]
    before = make_lora_inputs(len(slots), 24, 20, 4, 8)[0]
    got = check_against_naive(slots)
    for t in (1, 5):  # base-model rows untouched, bit for bit
        assert torch.equal(got[t], before[t])


def test_no_active_slot_leaves_out_alone():
    out, x, a, b = make_lora_inputs(5, 16, 12, 3, 4)
    before = out.clone()
    mapping = LoRAMapping.build(torch.full((5,), -1, dtype=torch.int32))
    assert mapping.active_slots == [] and mapping.slot_token_indices == []
    assert torch.equal(add_lora_torch(out, x, a, b, mapping), before)
    empty = LoRAMapping.build(torch.zeros(0, dtype=torch.int32))
    assert empty.active_slots == []
    add_lora_torch(out[:0], x[:0], a, b, empty)


def test_one_slot_for_every_token():
    check_against_naive([1] * 7, seed=1)


@pytest.mark.parametrize("slices", [(12, 8), (16, 4, 4)], ids=["gate-up", "qkv"])
@pytest.mark.parametrize("slots", [[0, 3, -1, 1, 3, 3], [-1, 1, 1, 3, 3, 3, 0]],
                         ids=["gathered", "contiguous-runs"])
def test_fused_output_slices(slices, slots):
    rank = 6 * len(slices)
    check_against_naive(slots, out_features=sum(slices), rank=rank, output_slices=slices,
                        seed=len(slices))


def test_contiguous_runs_are_detected():
    assert LoRAMapping.build([-1, 1, 1, 3, 3, 0]).slot_ranges == [(5, 6), (1, 3), (3, 5)]
    assert LoRAMapping.build([1, 0, 1]).slot_ranges is None


def test_bfloat16_within_rounding():
    check_against_naive([0, 1, -1, 1, 2, 0, 3, 3], dtype=torch.bfloat16, tol=5e-2, seed=4)


def test_mapping_from_host_and_device_tensors():
    slots = torch.tensor([3, -1, 0, 3, 3, 0], dtype=torch.int32)
    host = LoRAMapping.build(slots)
    assert host.active_slots == [0, 3]
    assert [i.tolist() for i in host.slot_token_indices] == [[2, 5], [0, 3, 4]]
    assert host.token_slots.dtype == torch.int32 and torch.equal(host.token_slots, slots)
    assert all(i.dtype == torch.int64 for i in host.slot_token_indices)
    from_list = LoRAMapping.build([3, -1, 0, 3, 3, 0])
    assert from_list.active_slots == host.active_slots
    device = torch.device("meta")  # any non-host device: the mapping lands there
    moved = LoRAMapping.build(slots, device=device)
    assert moved.token_slots.device == device
    assert all(i.device == device for i in moved.slot_token_indices)
    if torch.cuda.is_available():
        on_gpu = LoRAMapping.build(slots.to("cuda", torch.int64))
        assert on_gpu.active_slots == [0, 3] and on_gpu.token_slots.dtype == torch.int32
        assert [i.tolist() for i in on_gpu.slot_token_indices] == [[2, 5], [0, 3, 4]]


def test_mapping_and_shapes_are_checked():
    with pytest.raises(ValueError, match="below -1"):
        LoRAMapping.build(torch.tensor([0, -2]))
    with pytest.raises(ValueError, match="1-D"):
        LoRAMapping.build(torch.zeros(2, 2, dtype=torch.int32))
    out, x, a, b = make_lora_inputs(3, 8, 6, 2, 4)
    with pytest.raises(ValueError, match="out of range"):
        add_lora_torch(out, x, a, b, LoRAMapping.build([0, 2, 1]))
    with pytest.raises(ValueError, match="equal parts"):
        add_lora_torch(out, x, a, b, LoRAMapping.build([0, 1, 1]), (2, 2, 2))
    with pytest.raises(ValueError, match="partition"):
        add_lora_torch(out, x, a, b, LoRAMapping.build([0, 1, 1]), (3, 2))
    with pytest.raises(ValueError, match="rows"):
        add_lora_torch(out, x, a, b, LoRAMapping.build([0, 1]))


def test_platform_default_is_the_sdk_op():
    class Bare(Platform):
        pass

    platform = Bare.__new__(Bare)  # the method needs no platform state
    out, x, a, b = make_lora_inputs(5, 16, 12, 3, 6)
    mapping = LoRAMapping.build([0, 2, -1, 2, 1])
    want = add_lora_torch(out.clone(), x, a, b, mapping, (8, 4))
    torch.testing.assert_close(platform.add_lora(out, x, a, b, mapping, (8, 4)), want)
