"""The attention CUDA kernels (flash prefill, split-KV decode / verification and its combine)
under the CPU emulator (tests/emu/), against the golden reference: head_dim 64/80/128, bf16 and
fp16, query and key tails, GQA 1-10, every split-KV warp layout and several row groups, strided,
permuted and offset views, stale NaN past kv_lens, invalid lengths, two scheduling seeds."""

import pytest
import torch

import emu_kernels
from conftest import assert_close_to_oracle
from pearlmoe import reference

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
