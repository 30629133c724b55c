"""topk_softmax and moe_align against the golden reference (exact for ids and permutations)."""

import itertools

import pytest
import torch

import pearlmoe
from conftest import DEVICES, assert_close_to_oracle, requires_cuda
from pearlmoe import reference

NUM_TOKENS = [0, 1, 3, 257, 4099]
NUM_EXPERTS = [1, 16, 257]
TOP_K = [1, 2, 8]
GRID = [(t, e, k) for t, e, k in itertools.product(NUM_TOKENS, NUM_EXPERTS, TOP_K) if k <= e]


def _ids(grid):
    return [f"T{t}-E{e}-k{k}" for t, e, k in grid]


# ---- topk_softmax --------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize(("num_tokens", "num_experts", "k"), GRID, ids=_ids(GRID))
def test_topk_softmax_matches_reference(device, num_tokens, num_experts, k, renormalize):
    g = torch.Generator().manual_seed(num_tokens * 1000 + num_experts * 10 + k)
    logits = (torch.randn(num_tokens, num_experts, generator=g) * 3).to(device)
    weights, ids = pearlmoe.topk_softmax(logits, k, renormalize)
    ref_w, ref_ids = reference.topk_softmax(logits.cpu(), k, renormalize)
    oracle_w, _ = reference.topk_softmax(logits.cpu().double(), k, renormalize)
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32
    assert ids.shape == weights.shape == (num_tokens, k)
    assert torch.equal(ids.cpu(), ref_ids)
    assert_close_to_oracle(weights, ref_w, oracle_w)


@pytest.mark.parametrize("device", DEVICES)
def test_topk_softmax_ties_go_to_lower_index(device):
    g = torch.Generator().manual_seed(0)
    logits = torch.randint(0, 3, (513, 16), generator=g).float().to(device)  # many equal logits
    for k in (1, 2, 8, 16):
        _, ids = pearlmoe.topk_softmax(logits, k)
        assert torch.equal(ids.cpu(), reference.topk_softmax(logits.cpu(), k)[1])
    flat = torch.zeros(4, 8, device=device)
    weights, ids = pearlmoe.topk_softmax(flat, 3)
    assert ids.tolist() == [[0, 1, 2]] * 4
    assert torch.allclose(weights.cpu(), torch.full((4, 3), 1 / 8))


@pytest.mark.parametrize("device", DEVICES)
def test_topk_softmax_hunyuan_semantics(device):
    # Top-1 of 16 keeps the raw probability (Hunyuan-Large); renormalising makes it 1.
    logits = torch.randn(33, 16, device=device)
    w, _ = pearlmoe.topk_softmax(logits, 1)
    assert (w < 1).all()
    torch.testing.assert_close(w.cpu(), torch.softmax(logits.cpu(), -1).max(-1, keepdim=True)[0])
    w_renorm, _ = pearlmoe.topk_softmax(logits, 1, renormalize=True)
    assert torch.equal(w_renorm.cpu(), torch.ones(33, 1))


@pytest.mark.parametrize("device", DEVICES)
def test_topk_softmax_nan_and_inf(device):
    logits = torch.tensor(
        [[float("nan"), 1.0, 2.0, 0.0], [float("-inf"), 0.0, float("-inf"), 1.0]], device=device
    )
    weights, ids = pearlmoe.topk_softmax(logits, 3)
    assert ids.tolist() == [[2, 1, 3], [3, 1, 0]]  # NaN ranks below every finite logit
    assert weights[0].isnan().all()  # a NaN logit poisons its row's softmax, as in torch
    ref = torch.softmax(logits[1].cpu(), -1)
    torch.testing.assert_close(weights[1].cpu(), ref[[3, 1, 0]])


@pytest.mark.parametrize("device", DEVICES)
def test_topk_softmax_non_contiguous(device):
    base = torch.randn(16, 37, device=device)
    logits = base.t()  # [37, 16] with column stride 37
    assert not logits.is_contiguous()
    for got, want in zip(
        pearlmoe.topk_softmax(logits, 2), reference.topk_softmax(logits.cpu(), 2), strict=True
    ):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("renormalize", [False, True])
def test_topk_softmax_gradient(renormalize):
    logits = torch.randn(37, 16, requires_grad=True)
    ref_logits = logits.detach().clone().requires_grad_()
    grad = torch.randn(37, 4)
    pearlmoe.topk_softmax(logits, 4, renormalize)[0].backward(grad)
    reference.topk_softmax(ref_logits, 4, renormalize)[0].backward(grad)
    torch.testing.assert_close(logits.grad, ref_logits.grad, rtol=1e-5, atol=1e-7)


def test_topk_softmax_gradcheck():
    # The op is fp32 only, so check the analytic backward against finite differences of the
    # fp64 reference function evaluated at the op's choice of experts.
    logits = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    for renormalize in (False, True):
        _, ids = pearlmoe.topk_softmax(logits.detach().float(), 3, renormalize)

        def fn(x, ids=ids, renormalize=renormalize):
            w = torch.softmax(x, -1).gather(1, ids.long())
            return w / w.sum(-1, keepdim=True) if renormalize else w

        analytic = torch.autograd.grad(
            pearlmoe.topk_softmax(logits.float(), 3, renormalize)[0].sum(), logits
        )[0]
        assert torch.autograd.gradcheck(fn, (logits,))
        numeric = torch.autograd.grad(fn(logits).sum(), logits)[0]
        torch.testing.assert_close(analytic, numeric, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("logits", "k", "match"),
    [
        (torch.randn(4, 8), 9, r"k must be in \[1, num_experts=8\], got 9"),
        (torch.randn(4, 8), 0, r"k must be in \[1, num_experts=8\], got 0"),
        (torch.randn(4, 8, dtype=torch.bfloat16), 1, r"router_logits must be Float, got BFloat16"),
        (torch.randn(4, 8, dtype=torch.float64), 1, r"router_logits must be Float, got Double"),
        (torch.randn(8), 1, r"router_logits must be 2-D, got shape \[8\]"),
        (torch.randn(2, 4, 8), 1, r"router_logits must be 2-D"),
        (torch.randn(4, 0), 1, r"router_logits must have between 1 and INT_MAX expert columns"),
    ],
    ids=["k>E", "k<1", "bf16", "fp64", "rank1", "rank3", "no-experts"],
)
def test_topk_softmax_bad_input(logits, k, match):
    with pytest.raises(RuntimeError, match=r"pearlmoe\.topk_softmax: " + match):
        pearlmoe.topk_softmax(logits, k)


# ---- moe_align -----------------------------------------------------------------------------------


def _check_align_invariants(topk_ids, num_experts, sorted_slots, slot_to_row, offsets):
    flat = topk_ids.reshape(-1).long().cpu()
    sorted_slots, slot_to_row, offsets = (
        sorted_slots.long().cpu(),
        slot_to_row.long().cpu(),
        offsets.long().cpu(),
    )
    n = flat.numel()
    assert torch.equal(sorted_slots.sort().values, torch.arange(n))  # a permutation
    assert torch.equal(slot_to_row[sorted_slots], torch.arange(n))  # and its inverse
    assert offsets[0] == 0 and (offsets.diff() >= 0).all()
    assert offsets[-1] == (flat != -1).sum()
    for e in range(num_experts):
        rows = sorted_slots[offsets[e] : offsets[e + 1]]
        assert (flat[rows] == e).all() and (rows.diff() > 0).all()  # grouped, stable
    assert (flat[sorted_slots[offsets[-1] :]] == -1).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize(("num_tokens", "num_experts", "k"), GRID, ids=_ids(GRID))
def test_moe_align_matches_reference(device, num_tokens, num_experts, k, id_dtype):
    g = torch.Generator().manual_seed(num_tokens + 7 * num_experts + k)
    logits = torch.randn(num_tokens, num_experts, generator=g)
    topk_ids = reference.topk_softmax(logits, k)[1].to(id_dtype).to(device)  # distinct per token
    out = pearlmoe.moe_align(topk_ids, num_experts)
    ref = reference.moe_align(topk_ids.cpu(), num_experts)
    for got, want in zip(out, ref, strict=True):
        assert got.dtype == torch.int32
        assert torch.equal(got.cpu(), want)
    _check_align_invariants(topk_ids, num_experts, *out)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_tokens", [1, 31, 1025, 5000])
def test_moe_align_repeats_drops_and_one_expert(device, num_tokens):
    g = torch.Generator().manual_seed(num_tokens)
    cases = {
        "repeats": torch.randint(0, 5, (num_tokens, 4), generator=g),
        "dropped": torch.randint(-1, 5, (num_tokens, 4), generator=g),
        "all-dropped": torch.full((num_tokens, 2), -1),
        "one-expert": torch.full((num_tokens, 1), 3),
        "empty-experts": torch.randint(0, 2, (num_tokens, 2), generator=g) * 6,  # 0 and 6 of 9
    }
    for name, topk_ids in cases.items():
        num_experts = 9
        topk_ids = topk_ids.to(device)
        out = pearlmoe.moe_align(topk_ids, num_experts)
        for got, want in zip(out, reference.moe_align(topk_ids.cpu(), num_experts), strict=True):
            assert torch.equal(got.cpu(), want), name
        _check_align_invariants(topk_ids, num_experts, *out)


@pytest.mark.parametrize("device", DEVICES)
def test_moe_align_is_deterministic(device):
    topk_ids = torch.randint(0, 16, (4099, 8), device=device)
    first = pearlmoe.moe_align(topk_ids, 16)
    for _ in range(5):
        for a, b in zip(first, pearlmoe.moe_align(topk_ids, 16), strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_moe_align_non_contiguous(device):
    topk_ids = torch.randint(0, 16, (2, 300), device=device).t()  # [300, 2], strided
    for got, want in zip(
        pearlmoe.moe_align(topk_ids, 16), reference.moe_align(topk_ids.cpu(), 16), strict=True
    ):
        assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("topk_ids", "num_experts", "match"),
    [
        (torch.tensor([[0, 1], [2, 8]]), 8, r"topk_ids\[1, 1\] = 8 is out of range"),
        (torch.tensor([[0, -2]]), 8, r"topk_ids\[0, 1\] = -2 is out of range"),
        (torch.tensor([[0, 1]]), 0, r"num_experts must be in \[1, 8192\], got 0"),
        (torch.tensor([[0, 1]]), 8193, r"num_experts must be in \[1, 8192\], got 8193"),
        (torch.tensor([[0.0, 1.0]]), 8, r"topk_ids must be int32 or int64, got Float"),
        (torch.tensor([0, 1]), 8, r"topk_ids must be 2-D, got shape \[2\]"),
    ],
    ids=["id=E", "id=-2", "E=0", "E>max", "float", "rank1"],
)
def test_moe_align_bad_input(device, topk_ids, num_experts, match):
    with pytest.raises(RuntimeError, match=r"pearlmoe\.moe_align: " + match):
        pearlmoe.moe_align(topk_ids.to(device), num_experts)


# ---- device handling -----------------------------------------------------------------------------


def _call_cuda_kernel(op, *args):
    # Force the CUDA registration with CPU tensors: it must refuse them with a clear message.
    return op.default.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA), *args)


def test_cuda_kernels_refuse_what_they_cannot_run():
    msg = (
        "has no CUDA kernels"
        if not pearlmoe.built_with_cuda()
        else "must be a CUDA tensor, got one on cpu"
    )
    with pytest.raises(RuntimeError, match=r"pearlmoe\.topk_softmax: .*" + msg):
        _call_cuda_kernel(torch.ops.pearlmoe.topk_softmax, torch.randn(2, 4), 1, False)
    with pytest.raises(RuntimeError, match=r"pearlmoe\.moe_align: .*" + msg):
        _call_cuda_kernel(torch.ops.pearlmoe.moe_align, torch.zeros(2, 1, dtype=torch.int32), 4)
    with pytest.raises(RuntimeError, match=r"pearlmoe\.grouped_topk: .*" + msg):
        _call_cuda_kernel(torch.ops.pearlmoe.grouped_topk, torch.randn(2, 4), None, 1, 1, 1, True,
                          1.0)  # fmt: skip
    x = torch.randn(4, 8)
    cases = {
        "grouped_gemm": (x, torch.randn(1, 8, 8), torch.tensor([0, 4], dtype=torch.int32)),
        "moe_ffn": (
            x,
            torch.randn(2, 8),
            torch.randn(2, 8, 8),
            torch.randn(2, 8, 4),
            1,
            None,
            None,
            False,
        ),
        "attention": (
            torch.randn(1, 1, 2, 64),
            torch.randn(1, 3, 1, 64),
            torch.randn(1, 3, 1, 64),
            torch.tensor([3], dtype=torch.int32),
            None,
        ),
        "rope_qk_norm": (
            torch.randn(2, 2, 8),
            torch.randn(2, 1, 8),
            torch.arange(2),
            1e4,
            None,
            None,
            1e-5,
            True,
        ),
        "spec_verify": (torch.rand(1, 2, 5), torch.tensor([[1]]), None, None),
    }
    for name, args in cases.items():
        with pytest.raises(
            RuntimeError, match=rf"pearlmoe\.{name}: .*(must be a CUDA tensor|has no CUDA kernels)"
        ):
            _call_cuda_kernel(getattr(torch.ops.pearlmoe, name), *args)


@requires_cuda
def test_cuda_matches_cpu_exactly():
    logits = torch.randn(4099, 257) * 2
    w_cpu, ids_cpu = pearlmoe.topk_softmax(logits, 8)
    w_gpu, ids_gpu = pearlmoe.topk_softmax(logits.cuda(), 8)
    assert torch.equal(ids_cpu, ids_gpu.cpu())
    torch.testing.assert_close(w_cpu, w_gpu.cpu(), rtol=2e-6, atol=1e-8)
    for a, b in zip(
        pearlmoe.moe_align(ids_cpu, 257), pearlmoe.moe_align(ids_gpu, 257), strict=True
    ):
        assert torch.equal(a, b.cpu())


@requires_cuda
@pytest.mark.parametrize(("experts", "k", "groups", "topk_groups"),
                         [(160, 8, 1, 1), (256, 8, 8, 4), (6, 6, 3, 1), (33, 5, 11, 3)])  # fmt: skip
def test_grouped_topk_cuda_matches_cpu(experts, k, groups, topk_groups):
    """GLM-4.5 / DeepSeek-V3 routing on the GPU: the CPU kernel's ids exactly (ties and NaN
    included), weights to a few ulps (the warp sums in another order); and under a CUDA graph."""
    g = torch.Generator().manual_seed(experts)
    logits = torch.randn(4099, experts, generator=g) * 2
    logits[7] = logits[7].round()  # ties
    logits[9, experts // 2] = float("nan")
    bias = torch.randn(experts, generator=g) * 0.1 - 0.5
    args = (bias, k, groups, topk_groups, True, 2.5)
    w_cpu, ids_cpu = pearlmoe.ops.grouped_topk(logits, *args)
    bias_gpu = bias.cuda()
    w_gpu, ids_gpu = pearlmoe.ops.grouped_topk(logits.cuda(), bias_gpu, *args[1:])
    assert torch.equal(ids_cpu, ids_gpu.cpu())
    torch.testing.assert_close(w_cpu, w_gpu.cpu(), rtol=4e-6, atol=1e-7, equal_nan=True)
    x = logits.cuda()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = pearlmoe.ops.grouped_topk(x, bias_gpu, *args[1:])  # no host work: capturable
    x.copy_(torch.randn_like(x))
    graph.replay()
    want = pearlmoe.ops.grouped_topk(x.cpu(), *args)
    assert torch.equal(out[1].cpu(), want[1])


@requires_cuda
def test_moe_align_under_cuda_graph():
    topk_ids = torch.randint(0, 16, (64, 2), device="cuda", dtype=torch.int32)
    pearlmoe.moe_align(topk_ids, 16)  # warm up outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = pearlmoe.moe_align(topk_ids, 16)
    topk_ids.copy_(torch.randint(0, 16, (64, 2), device="cuda", dtype=torch.int32))
    graph.replay()
    for got, want in zip(out, reference.moe_align(topk_ids.cpu(), 16), strict=True):
        assert torch.equal(got.cpu(), want)


def test_compile_fullgraph_dynamic():
    def route(logits):
        weights, ids = pearlmoe.topk_softmax(logits, 2)
        sorted_slots, slot_to_row, offsets = pearlmoe.moe_align(ids, logits.shape[1])
        return weights, sorted_slots, slot_to_row, offsets

    compiled = torch.compile(route, backend="aot_eager", fullgraph=True, dynamic=True)
    for num_tokens in (5, 9, 130):
        logits = torch.randn(num_tokens, 16)
        for got, want in zip(compiled(logits), route(logits), strict=True):
            assert torch.equal(got, want)
