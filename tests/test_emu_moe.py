"""The expert-FFN CUDA kernels (grouped_gemm_sm80's decode and prefill tiles, the SwiGLU epilogue
and row gather; silu_and_mul, moe_combine, zero_tail_rows) under the CPU emulator (tests/emu/),
against the golden reference, with two scheduling seeds."""

import pytest
import torch

import emu_kernels
from conftest import assert_close_to_oracle
from pearlmoe import reference

pytestmark = pytest.mark.emu  # bench/device_check.sh skips these: the GPU runs the kernels

SEEDS = [0, 5]
UNWRITTEN = {torch.bfloat16: -1, torch.float16: -1}  # outputs start as 0xFFFF bits


def _gemm_ref(a, b, offs, rows, swiglu, dtype):
    """Reference output rows [0, offs[G]) in `dtype` (the low-precision twin) or float64."""
    x = a[rows].to(dtype)
    out = reference.grouped_gemm(x, b.to(dtype), offs)
    if swiglu:
        inter = b.shape[1] // 2
        out = torch.nn.functional.silu(out[:, :inter]) * out[:, inter:]
    return out[: int(offs[-1])]


# (name, m, N, K, lda extra, group sizes, swiglu, gather, dtype); m <= 32 G takes the decode tile.
GEMM_CASES = [
    (
        "decode-G16",
        20,
        136,
        200,
        0,
        [3, 0, 0, 5, 1, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 6],
        False,
        False,
        torch.bfloat16,
    ),
    (
        "decode-swiglu-gather-lda",
        20,
        136,
        200,
        8,
        [3, 0, 0, 5, 1, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 6],
        True,
        True,
        torch.bfloat16,
    ),
    ("decode-fp16-33-rows", 40, 80, 64, 0, [0, 33, 0, 4], True, True, torch.float16),
    ("prefill-tails-dropped", 310, 136, 72, 0, [0, 130, 170], False, False, torch.bfloat16),
    ("prefill-swiglu-gather", 310, 272, 72, 16, [0, 130, 170], True, True, torch.float16),
    ("prefill-N8-K8", 300, 8, 8, 0, [129, 171], False, True, torch.bfloat16),
    ("k0", 40, 16, 0, 8, [20, 20], False, False, torch.bfloat16),
    ("all-groups-empty", 70, 16, 16, 0, [0, 0, 0], False, False, torch.bfloat16),
]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("case", GEMM_CASES, ids=[c[0] for c in GEMM_CASES])
def test_grouped_gemm(case, seed):
    _, m, n, k, lda_extra, sizes, swiglu, gather, dtype = case
    g = torch.Generator().manual_seed(m + n + k)
    rows_total = m + 3
    a = torch.randn(rows_total, k + lda_extra, generator=g)[:, :k]  # row stride k + extra
    b = torch.randn(len(sizes), n, k, generator=g) * 0.2
    offs = torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()], dtype=torch.int32)
    rows = (torch.arange(m) * 7 + 2) % rows_total if gather else torch.arange(m)
    r = emu_kernels.grouped_gemm(
        a.to(dtype), b.to(dtype).contiguous(), offs, m,
        rows.int() if gather else None, swiglu, seed=seed,
    ).check()  # fmt: skip
    c = r.outputs["c"]
    routed = int(offs[-1])
    low = _gemm_ref(a.to(dtype), b, offs, rows, swiglu, dtype)
    oracle = _gemm_ref(a.to(dtype).double(), b.to(dtype), offs, rows, swiglu, torch.float64)
    assert_close_to_oracle(c[:routed], low, oracle, floor=1e-2 if dtype == torch.bfloat16 else 1e-3)
    # Rows of dropped slots are not written (zero_tail_rows does that on the op's path).
    assert (c[routed:].view(torch.int16) == UNWRITTEN[dtype]).all()


def test_grouped_gemm_bad_offsets_stay_in_bounds():
    """Unchecked offsets (CUDA-graph capture skips the host check) are clamped on the device:
    decreasing, negative or past-the-end offsets must not read or write out of bounds."""
    g = torch.Generator().manual_seed(1)
    a = torch.randn(40, 32, generator=g).bfloat16()
    b = torch.randn(3, 16, 32, generator=g).bfloat16()
    for offs in ([0, 50, 10, 400], [-5, 3, 2, 40], [7, 7, -1, 1 << 30]):
        emu_kernels.grouped_gemm(a, b, torch.tensor(offs, dtype=torch.int32), 40).check()


@pytest.mark.parametrize(
    ("n", "k", "a_offset"),
    [(12, 16, 0), (16, 12, 0), (16, 16, 3)],
    ids=["N%8", "K%8", "misaligned-a"],
)
def test_grouped_gemm_rejects_unsupported_layouts(n, k, a_offset):
    a = torch.randn(64 + a_offset).bfloat16()[a_offset : a_offset + 4 * k].view(4, k)
    b = torch.randn(1, n, k).bfloat16()
    r = emu_kernels.grouped_gemm(a, b, torch.tensor([0, 4], dtype=torch.int32), 4)
    assert r.status == 1 and r.launches == []  # cudaErrorInvalidValue before any launch


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_moe_elementwise(dtype, seed):
    g = torch.Generator().manual_seed(2)
    tokens, top_k, hidden, inter, experts = 7, 2, 40, 24, 3
    h = torch.randn(tokens * top_k, 2 * inter, generator=g).to(dtype)
    routed = torch.tensor([9], dtype=torch.int32)  # rows past 9 were never written: skip them
    out = emu_kernels.silu_and_mul(h, routed, seed=seed).check().outputs["out"]
    f = h.float()
    want = (torch.nn.functional.silu(f[:, :inter]) * f[:, inter:]).to(dtype)
    torch.testing.assert_close(out[:9], want[:9], rtol=1e-2, atol=1e-2)
    assert (out[9:].view(torch.int16) == -1).all()

    ids = torch.randint(-1, experts, (tokens, top_k), generator=g)
    _, slot_to_row, offs = reference.moe_align(ids, experts)
    expert_out = torch.randn(tokens * top_k, hidden, generator=g).to(dtype)
    weights = torch.rand(tokens, top_k, generator=g)
    weights[ids < 0] = float("nan")  # a dropped slot's weight is never read
    shared = torch.randn(tokens, hidden, generator=g).to(dtype)
    y = emu_kernels.moe_combine(expert_out, weights, slot_to_row, offs, shared, seed=seed).check()
    rows = expert_out.float()[slot_to_row.long()].view(tokens, top_k, hidden)
    keep = (ids >= 0).unsqueeze(-1)
    want = shared.float() + (torch.where(keep, rows * weights.unsqueeze(-1), 0)).sum(1)
    torch.testing.assert_close(y.outputs["y"].float(), want, rtol=1e-2, atol=1e-2)

    c = torch.randn(tokens * top_k, hidden, generator=g).to(dtype)
    zeroed = emu_kernels.zero_tail_rows(c, offs, seed=seed).check().outputs["c"]
    routed = int(offs[-1])
    assert torch.equal(zeroed[:routed], c[:routed]) and (zeroed[routed:] == 0).all()
