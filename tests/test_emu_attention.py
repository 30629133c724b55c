"""The attention CUDA kernels (flash prefill, split-KV decode / verification and its combine)
under the CPU emulator (tests/emu/), against the golden reference: head_dim 64/80/128, bf16 and
fp16, query and key tails, GQA 1-10, every split-KV warp layout and several row groups, strided,
permuted and offset views, stale NaN past kv_lens, invalid lengths, two scheduling seeds."""

import pytest
import torch

import emu_kernels
from conftest import assert_close_to_oracle
from pearlmoe import reference

pytestmark = pytest.mark.emu  # bench/device_check.sh skips these: the GPU runs the kernels

SEEDS = [0, 7]
BF, HF = torch.bfloat16, torch.float16


def make_inputs(batch, q_len, q_heads, kv_heads, dim, cap, lens, dtype, *, q_extra_heads=0,
                kv_head_major=False, q_offset=0, seed=0):  # fmt: skip
    """q as a slice of a wider, offset buffer; k and v [B, cap, Hkv, D] (or a permuted view of
    [B, Hkv, cap, D]); everything past each sequence's length is NaN, never to be read."""
    g = torch.Generator().manual_seed(seed)
    wide = q_heads + q_extra_heads
    q_buf = torch.randn(q_offset + batch * q_len * wide * dim, generator=g).to(dtype)
    q = q_buf[q_offset:].view(batch, q_len, wide, dim)[:, :, :q_heads]

    def kv():
        if kv_head_major:
            t = torch.randn(batch, kv_heads, cap, dim, generator=g).to(dtype).transpose(1, 2)
        else:
            t = torch.randn(batch, cap, kv_heads, dim, generator=g).to(dtype)
        for b, n in enumerate(lens):
            t[b, max(0, min(n, cap)) :] = float("nan")
        return t

    return q, kv(), kv(), torch.tensor(lens, dtype=torch.int32)


def expected(q, k, v, lens, dtype, scale=None):
    """The reference over lengths clamped into [0, capacity] (what the kernels do with invalid
    ones); query rows that see no key are zeros."""
    lens = lens.clamp(0, k.shape[1])
    out = reference.attention(q.to(dtype), k.to(dtype), v.to(dtype), lens, scale)
    return torch.nan_to_num(out, nan=0.0)


def check(q, k, v, lens, seed, num_sms, scale=None, exe=None):
    r = emu_kernels.attention(q, k, v, lens, scale=scale, num_sms=num_sms, seed=seed, exe=exe)
    r.check()
    out = r.outputs["o"]
    low = expected(q, k, v, lens, q.dtype, scale)
    oracle = expected(q, k, v, lens, torch.float64, scale)
    assert_close_to_oracle(out, low, oracle, floor=1e-3)
    return r


# (name, B, Sq, Hq, Hkv, D, capacity, lens, dtype, num_sms, extra q heads, head-major K/V, q offset)
CASES = [
    ("prefill-D64-tails", 2, 130, 4, 2, 64, 200, [130, 197], BF, 8, 0, False, 0),
    ("prefill-D80-tails", 2, 130, 4, 2, 80, 200, [130, 197], BF, 8, 0, False, 0),
    ("prefill-D128-fp16", 2, 130, 4, 2, 128, 200, [130, 197], HF, 8, 0, False, 0),
    ("prefill-strided-permuted", 1, 64, 2, 1, 80, 96, [64], HF, 8, 2, True, 8),
    ("prefill-mq-kv300", 1, 100, 3, 1, 128, 320, [300], BF, 8, 0, False, 0),
    ("prefill-prefix-kv1000", 1, 64, 2, 2, 80, 1000, [1000], BF, 8, 0, False, 0),
    ("prefill-idle-warps", 2, 70, 2, 1, 64, 75, [70, 75], HF, 8, 0, False, 0),
    ("prefill-3-mtiles", 1, 257, 1, 1, 128, 257, [257], BF, 8, 0, False, 0),
    ("decode-D128-splits", 3, 1, 8, 2, 128, 300, [1, 150, 300], BF, 4, 0, False, 0),
    ("decode-D80-fp16-splits", 3, 1, 8, 2, 80, 300, [1, 150, 300], HF, 4, 0, False, 0),
    ("decode-one-split", 2, 1, 2, 2, 64, 100, [37, 100], BF, 1000, 0, False, 0),
    ("decode-many-splits", 2, 1, 8, 1, 80, 1000, [3, 999], BF, 64, 0, False, 0),
    ("decode-max-splits", 1, 1, 1, 1, 64, 64 * 300, [64 * 300 - 5], BF, 200, 0, False, 0),
    ("verify-g10-(4,1)", 2, 5, 20, 2, 80, 260, [5, 259], BF, 4, 0, False, 0),
    ("verify-g10-(8,1)", 1, 7, 10, 1, 128, 200, [150], BF, 4, 0, False, 0),
    ("verify-3-row-groups", 1, 40, 8, 1, 64, 300, [290], HF, 2, 0, False, 0),
    ("verify-(2,2)-strided", 2, 5, 8, 2, 80, 130, [5, 129], BF, 3, 4, True, 8),
    ("verify-Sq63", 1, 63, 1, 1, 64, 100, [100], BF, 4, 0, False, 0),
    ("verify-M16-(1,4)", 1, 2, 8, 1, 80, 150, [149], BF, 4, 0, False, 0),
    ("verify-M17-(2,2)", 1, 17, 1, 1, 128, 150, [149], HF, 4, 0, False, 0),
    ("verify-M33-(4,1)", 1, 33, 1, 1, 80, 150, [40], BF, 4, 0, False, 0),
    ("verify-M65-(8,1)", 1, 13, 5, 1, 64, 150, [140], BF, 4, 0, False, 0),
    ("verify-M129-2-groups", 1, 43, 3, 1, 80, 150, [150], BF, 4, 0, False, 0),
]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_attention(case, seed):
    _, batch, q_len, q_heads, kv_heads, dim, cap, lens, dtype, sms, extra, head_major, off = case
    q, k, v, kv_lens = make_inputs(batch, q_len, q_heads, kv_heads, dim, cap, lens, dtype,
                                   q_extra_heads=extra, kv_head_major=head_major, q_offset=off,
                                   seed=q_len + dim)  # fmt: skip
    check(q, k, v, kv_lens, seed, sms)


# Lengths the op rejects on the host, or cannot check (device-resident kv_lens under CUDA-graph
# capture): the kernels clamp them into [0, capacity] and never read out of bounds.
INVALID = [
    ("prefill-len>capacity", 1, 70, 2, 1, 64, 100, [180], 8),
    ("prefill-len<Sq", 1, 70, 2, 1, 64, 100, [30], 8),
    ("decode-len>capacity-and-negative", 2, 3, 4, 1, 80, 100, [180, -5], 8),
    ("decode-len0", 2, 1, 4, 1, 64, 64, [0, 10], 2),
]


@pytest.mark.parametrize("case", INVALID, ids=[c[0] for c in INVALID])
def test_attention_invalid_lengths_stay_in_bounds(case):
    _, batch, q_len, q_heads, kv_heads, dim, cap, lens, sms = case
    q, k, v, kv_lens = make_inputs(batch, q_len, q_heads, kv_heads, dim, cap, lens, BF, seed=1)
    check(q, k, v, kv_lens, seed=3, num_sms=sms)


def test_attention_scale():
    q, k, v, kv_lens = make_inputs(2, 3, 4, 2, 64, 40, [9, 40], BF, seed=2)
    check(q, k, v, kv_lens, seed=0, num_sms=4, scale=0.3)


def test_attention_size1_dims_take_any_stride():
    """Issue 13 item 4: the op passes views whose size-1 dimensions have strides that are not
    multiples of 8 (its ready() waives them); the launcher used to reject them."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2 * 4 * 64 + 8, generator=g).to(BF).as_strided((2, 1, 4, 64), (256, 3, 64, 1))
    kv = [
        torch.randn(2 * 40 * 64 + 8, generator=g)
        .to(BF)
        .as_strided((2, 40, 1, 64), (2560, 64, 5, 1))
        for _ in range(2)
    ]
    check(q, *kv, torch.tensor([17, 40], dtype=torch.int32), seed=0, num_sms=4)


# ---- issue 13 item 5: key ranges from the lengths on the device, a length-independent grid ------


def test_plan_spreads_a_short_context_over_the_splits():
    """The issue's example: batch 1, 8 KV heads, capacity 131,072, 2,000 keys, 132 SMs. The
    grid still has 33 splits per KV head (from the capacity), but the 2,000 keys are dealt out
    on the device: 16 splits of 2 tiles are busy (128 of 264 blocks), where a capacity-sized
    chunk put all of them in one split (8 busy blocks of 4,032 keys)."""
    plan = emu_kernels.attention_plan(1, 1, 80, 8, 128, 131072, 132, lens=[2000, 131072, 1])
    assert not plan["prefill"] and plan["splits"] == 33 and plan["grid"] == (33, 8, 1)
    assert plan["spread"][2000] == (16, 2)
    assert plan["spread"][131072] == (33, 63)  # the full cache: every split, 63 tiles at most
    assert plan["spread"][1] == (1, 1)


@pytest.mark.parametrize("dim", [128, 80])
def test_plan_splits_a_long_prefill(dim):
    """Sq = 128 over 131,072 keys with 80 heads was 80 blocks on 132 SMs, each reading the whole
    context. Now the keys split in 3 ranges: 240 blocks, at most 2 per SM, each a third of the
    work (2/3 of the unsplit time, within 15% of the best any split count gives: 80/132)."""
    plan = emu_kernels.attention_plan(1, 128, 80, 8, dim, 131072, 132, lens=[131072, 500])
    assert plan["prefill"] and plan["splits"] == 3 and plan["grid"] == (80, 3, 1)
    assert plan["spread"][131072] == (3, 683)
    assert plan["spread"][500] == (1, 8)  # a short prompt in the same cache: one busy range
    assert emu_kernels.attention_plan(8, 4096, 80, 8, dim, 8192, 132)["splits"] == 1  # full grid


SPLIT_PREFILL = [
    ("split-prefill-long-kv", 1, 70, 2, 1, 80, 2000, [2000], BF, 8),
    ("split-prefill-short-len", 1, 70, 2, 1, 80, 2000, [300], BF, 8),
    ("split-prefill-tails-batch2", 2, 130, 2, 1, 128, 1500, [130, 1400], HF, 16),
    ("split-prefill-D64-gqa", 1, 64, 4, 2, 64, 1200, [1100], BF, 8),
]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("case", SPLIT_PREFILL, ids=[c[0] for c in SPLIT_PREFILL])
def test_split_prefill(case, seed):
    _, batch, q_len, q_heads, kv_heads, dim, cap, lens, dtype, sms = case
    plan = emu_kernels.attention_plan(batch, q_len, q_heads, kv_heads, dim, cap, sms)
    assert plan["prefill"] and plan["splits"] > 1  # the case exercises the split path
    q, k, v, kv_lens = make_inputs(batch, q_len, q_heads, kv_heads, dim, cap, lens, dtype, seed=dim)
    check(q, k, v, kv_lens, seed, sms)


@pytest.mark.parametrize(
    ("q_len", "sms"), [(1, 8), (5, 8), (70, 16)], ids=["decode", "verify", "prefill"]
)
def test_grid_does_not_depend_on_lengths(q_len, sms):
    """What CUDA-graph replay needs: the same launches for any kv_lens (including invalid ones,
    which the device clamps), each computing the right answer."""
    launches = set()
    for lens in ([1500, 90], [q_len, q_len], [90, 1500], [-4, 4000]):
        q, k, v, kv_lens = make_inputs(2, q_len, 4, 1, 64, 1500, lens, BF, seed=q_len)
        launches.add(tuple(check(q, k, v, kv_lens, seed=1, num_sms=sms).launches))
    assert len(launches) == 1 and len(next(iter(launches))) == 2  # main kernel + combine
