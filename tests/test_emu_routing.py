"""topk_softmax and moe_align CUDA kernels, run under the CPU emulator (tests/emu/) against the
golden reference: ties, NaN logits, k up to 40, E up to 300, empty and odd slot counts, dropped
and out-of-range ids, int32 and int64 ids, two scheduling seeds."""

import pytest
import torch

import emu_kernels
from pearlmoe import reference

pytestmark = pytest.mark.emu  # bench/device_check.sh skips these: the GPU runs the kernels

SEEDS = [0, 3]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(("experts", "k"), [(1, 1), (7, 2), (16, 8), (33, 1), (64, 8), (300, 40)])
def test_topk_softmax(experts, k, seed):
    g = torch.Generator().manual_seed(experts * 100 + k)
    tokens = 9
    wide = torch.randint(-3, 4, (tokens, experts + 5), generator=g).float() * 0.5  # many ties
    logits = wide[:, 2 : 2 + experts]  # a strided view: row stride E + 5, offset 2
    logits[4, experts // 2] = float("nan")  # ranks last; the row's weights are NaN, as torch's
    for renormalize in (False, True):
        r = emu_kernels.topk_softmax(logits, k, renormalize, seed=seed).check()
        want_w, want_ids = reference.topk_softmax(logits, k, renormalize)
        assert torch.equal(r.outputs["ids"], want_ids)
        torch.testing.assert_close(
            r.outputs["weights"], want_w, rtol=2e-6, atol=1e-7, equal_nan=True
        )


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(
    ("experts", "k", "groups", "topk_groups"),
    [
        (1, 1, 1, 1),
        (6, 6, 3, 1),
        (16, 3, 4, 2),
        (160, 8, 1, 1),
        (256, 8, 8, 4),
        (66, 5, 33 // 3, 3),
    ],
)
def test_grouped_topk(experts, k, groups, topk_groups, seed):
    g = torch.Generator().manual_seed(experts * 100 + k)
    tokens = 9
    wide = torch.randint(-3, 4, (tokens, experts + 5), generator=g).float() * 0.5  # many ties
    logits = wide[:, 2 : 2 + experts]  # a strided view
    logits[4, experts // 2] = float("nan")
    bias = torch.randn(experts, generator=g) * 0.1 - 1.0  # negative: masked 0.0 keys win some
    for b, renormalize, scaling in ((None, True, 1.0), (bias, False, 2.5), (bias, True, 1.0)):
        args = (logits, b, k, groups, topk_groups, renormalize, scaling)
        r = emu_kernels.grouped_topk(*args, seed=seed).check()
        want_w, want_ids = reference.grouped_topk(*args)
        assert torch.equal(r.outputs["ids"], want_ids)
        torch.testing.assert_close(
            r.outputs["weights"], want_w, rtol=2e-6, atol=1e-7, equal_nan=True
        )


def test_topk_softmax_no_tokens():
    r = emu_kernels.topk_softmax(torch.empty(0, 5), 2, False).check()
    assert r.launches == []  # nothing to do: no launch (an empty grid would be an error)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("experts", [1, 3, 16, 100])
@pytest.mark.parametrize("slots", [0, 1, 31, 1024, 2500])
def test_moe_align(experts, slots, seed):
    g = torch.Generator().manual_seed(experts * 7 + slots)
    ids = torch.randint(-1, experts, (slots, 1), generator=g)  # -1: dropped
    for dtype in (torch.int32, torch.int64):
        r = emu_kernels.moe_align(ids.to(dtype), experts, seed=seed).check()
        want = reference.moe_align(ids, experts)
        for key, w in zip(("sorted_slots", "slot_to_row", "expert_offsets"), want, strict=True):
            assert torch.equal(r.outputs[key], w), key


def test_moe_align_out_of_range_ids_are_dropped():
    """The launcher's contract when ids are not checked (under CUDA-graph capture): anything
    outside [0, E) sorts with the dropped slots, and nothing is written out of bounds."""
    ids = torch.tensor([[3, -2], [7, 0], [-1, 1000], [2, 2]])
    r = emu_kernels.moe_align(ids, 4).check()
    want = reference.moe_align(torch.where((ids >= 0) & (ids < 4), ids, -1), 4)
    for key, w in zip(("sorted_slots", "slot_to_row", "expert_offsets"), want, strict=True):
        assert torch.equal(r.outputs[key], w), key
