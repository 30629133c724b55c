"""grouped_gemm, moe_ffn_routed and moe_ffn against the golden reference, autograd, routing
options (capacity, recycle, stats) and bad input."""

import itertools

import pytest
import torch

import pearlmoe
from conftest import DEVICES, HAS_CUDA, assert_close_to_oracle
from pearlmoe import reference
from pearlmoe.routing import capacity, route

# CUDA kernels take bf16/fp16 with N, K multiples of 8; the CPU any floating dtype.
DTYPES = {"cpu": [torch.float32, torch.bfloat16], "cuda": [torch.bfloat16, torch.float16]}


def _dtype_grid():
    grid = [("cpu", t) for t in DTYPES["cpu"]]
    if HAS_CUDA:
        grid += [pytest.param("cuda", t, marks=pytest.mark.cuda) for t in DTYPES["cuda"]]
    return grid


def _random_offsets(rows: int, groups: int, g: torch.Generator, tail: int = 0) -> torch.Tensor:
    """Nondecreasing offsets over rows - tail rows, with empty groups likely."""
    cuts = torch.randint(0, rows - tail + 1, (groups - 1,), generator=g).sort().values
    return torch.cat([torch.tensor([0]), cuts, torch.tensor([rows - tail])]).int()


def _weights(num_experts, hidden, inter, dtype, device, g, shared=True):
    scale = hidden**-0.5
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=g) * scale
    w2 = torch.randn(num_experts, hidden, inter, generator=g) * inter**-0.5
    ws = None, None
    if shared:
        ws = (
            torch.randn(2 * inter, hidden, generator=g) * scale,
            torch.randn(hidden, inter, generator=g) * inter**-0.5,
        )
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(w13), cast(w2), cast(ws[0]), cast(ws[1])


# ---- grouped_gemm --------------------------------------------------------------------------------

GEMM_GRID = list(itertools.product([0, 1, 7, 333], [1, 5, 16]))


@pytest.mark.parametrize(("device", "dtype"), _dtype_grid())
@pytest.mark.parametrize(("rows", "groups"), GEMM_GRID, ids=[f"M{m}-G{g}" for m, g in GEMM_GRID])
def test_grouped_gemm_matches_reference(device, dtype, rows, groups):
    g = torch.Generator().manual_seed(rows * 31 + groups)
    a = torch.randn(rows, 40, generator=g)  # K = 40
    b = torch.randn(groups, 24, 40, generator=g)  # N = 24
    offs = _random_offsets(rows, groups, g, tail=min(rows, 2))  # 2 rows past the last group
    out = pearlmoe.grouped_gemm(a.to(device, dtype), b.to(device, dtype), offs.to(device))
    low = reference.grouped_gemm(a.to(dtype), b.to(dtype), offs)
    oracle = reference.grouped_gemm(a.to(dtype).double(), b.to(dtype).double(), offs)
    assert out.dtype == dtype and out.shape == (rows, 24)
    assert_close_to_oracle(out, low, oracle, floor=1e-5)
    assert (out[offs[-1].item() :] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_grouped_gemm_one_group_and_all_rows_in_one(device):
    dtype = DTYPES[device][0]
    a = torch.randn(65, 32).to(device, dtype)
    b = torch.randn(4, 16, 32).to(device, dtype)
    for offs in ([0, 65, 65, 65, 65], [0, 0, 0, 0, 65]):
        offs = torch.tensor(offs, dtype=torch.int32, device=device)
        want = reference.grouped_gemm(a.cpu().double(), b.cpu().double(), offs.cpu())
        got = pearlmoe.grouped_gemm(a, b, offs)
        torch.testing.assert_close(got.cpu().double(), want, rtol=2e-2, atol=2e-2)
    one = pearlmoe.grouped_gemm(a, b[:1], torch.tensor([0, 65], dtype=torch.int32, device=device))
    torch.testing.assert_close(
        one.cpu().double(), (a.double() @ b[0].double().t()).cpu(), rtol=2e-2, atol=2e-2
    )


def test_grouped_gemm_gradcheck():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(9, 5, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(3, 4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    offs = torch.tensor([0, 4, 4, 7], dtype=torch.int32)  # an empty group and 2 tail rows
    assert torch.autograd.gradcheck(lambda a, b: pearlmoe.grouped_gemm(a, b, offs), (a, b))


def test_grouped_gemm_wgrad_matches_reference():
    g = torch.Generator().manual_seed(1)
    grad_c, a = torch.randn(12, 6, generator=g), torch.randn(12, 5, generator=g)
    offs = torch.tensor([0, 5, 5, 11], dtype=torch.int32)
    torch.testing.assert_close(
        pearlmoe.ops.grouped_gemm_wgrad(grad_c, a, offs),
        reference.grouped_gemm_wgrad(grad_c, a, offs),
    )


@pytest.mark.parametrize(
    ("a", "b", "offs", "match"),
    [
        (torch.randn(4, 8), torch.randn(2, 3, 7), [0, 2, 4], r"b must be \[G, N, K\] with K = a.size\(1\) = 8"),
        (torch.randn(4, 8), torch.randn(2, 3, 8), [0, 4], r"group_offsets must have G \+ 1 = 3 entries"),
        (torch.randn(4, 8), torch.randn(2, 3, 8), [1, 2, 4], r"group_offsets\[0\] must be 0, got 1"),
        (torch.randn(4, 8), torch.randn(2, 3, 8), [0, 3, 2], r"group_offsets must be nondecreasing"),
        (torch.randn(4, 8), torch.randn(2, 3, 8), [0, 2, 5], r"group_offsets\[G\] = 5 exceeds the 4 rows of a"),
        (torch.randn(4, 8), torch.randn(2, 3, 8).double(), [0, 2, 4], r"b must have a's dtype Float, got Double"),
        (torch.randn(4, 8), torch.randn(3, 8), [0, 2, 4], r"b must be 3-D"),
        (torch.zeros(4, 8, dtype=torch.int32), torch.zeros(2, 3, 8, dtype=torch.int32), [0, 2, 4], r"a must be a floating-point tensor"),
    ],
    ids=["K", "offs-len", "offs0", "offs-order", "offs-end", "dtype", "b-rank", "int"],
)  # fmt: skip
def test_grouped_gemm_bad_input(a, b, offs, match):
    with pytest.raises(RuntimeError, match=r"pearlmoe\.grouped_gemm: " + match):
        pearlmoe.grouped_gemm(a, b, torch.tensor(offs, dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"group_offsets must be Int, got Long"):
        pearlmoe.grouped_gemm(torch.randn(4, 8), torch.randn(2, 3, 8), torch.tensor([0, 2, 4]))


# ---- moe_ffn_routed / moe_ffn --------------------------------------------------------------------

MOE_GRID = [
    (t, e, k)
    for t, e, k in itertools.product([0, 1, 4, 7, 333, 4099], [1, 5, 16], [1, 2])
    if k <= e
]


@pytest.mark.parametrize(("device", "dtype"), _dtype_grid())
@pytest.mark.parametrize(
    ("tokens", "experts", "k"), MOE_GRID, ids=[f"T{t}-E{e}-k{k}" for t, e, k in MOE_GRID]
)
def test_moe_ffn_matches_reference(device, dtype, tokens, experts, k):
    hidden, inter = 32, 24
    g = torch.Generator().manual_seed(tokens + 100 * experts + k)
    x = torch.randn(tokens, hidden, generator=g).to(device, dtype)
    router_w = torch.randn(experts, hidden, generator=g).to(device)
    w13, w2, s13, s2 = _weights(experts, hidden, inter, dtype, device, g, shared=k == 1)
    renormalize = k > 1  # top-1 + shared: Hunyuan-Large; top-2 without shared: Mixtral style
    y = pearlmoe.moe_ffn(x, router_w, w13, w2, k, s13, s2, renormalize)
    assert y.shape == x.shape and y.dtype == dtype

    # Routing is exact (fp32 on both sides), so compare the experts on the op's own routing.
    logits = x.cpu().float() @ router_w.cpu().float().t()
    weights, ids = reference.topk_softmax(logits, k, renormalize)
    assert torch.equal(pearlmoe.topk_softmax(logits, k, renormalize)[1], ids)
    cpu = [t if t is None else t.cpu() for t in (w13, w2, s13, s2)]
    low = reference.moe_ffn_routed(x.cpu(), weights, ids, *cpu)
    oracle = reference.moe_ffn_routed(
        x.cpu().double(), weights.double(), ids, *[t if t is None else t.double() for t in cpu]
    )
    assert_close_to_oracle(y, low, oracle, floor=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shared", [True, False])
def test_moe_ffn_tokens_are_independent_on_the_cpu(dtype, shared):
    """A token's output is bitwise the same alone and among up to 256 tokens (the CPU's
    decode-sized path at any count, threads or not): a server's batch of verification windows
    gives each sequence what decoding it alone gives."""
    hidden, inter, experts = 64, 48, 8
    g = torch.Generator().manual_seed(11)
    x = torch.randn(256, hidden, generator=g).to(dtype)
    router_w = torch.randn(experts, hidden, generator=g)
    w13, w2, s13, s2 = _weights(experts, hidden, inter, dtype, "cpu", g, shared=shared)
    alone = torch.cat([pearlmoe.moe_ffn(x[i : i + 1], router_w, w13, w2, 2, s13, s2, True)
                       for i in range(256)])  # fmt: skip
    for tokens in (2, 5, 16, 17, 48, 144, 256):
        got = pearlmoe.moe_ffn(x[:tokens], router_w, w13, w2, 2, s13, s2, True)
        assert torch.equal(got, alone[:tokens]), tokens


@pytest.mark.parametrize(("device", "dtype"), _dtype_grid())
@pytest.mark.parametrize("tokens", [257, 3])  # 3: the CPU's decode-sized path
def test_moe_ffn_routed_dropped_and_one_expert(device, dtype, tokens):
    hidden, inter, experts = 32, 16, 5
    g = torch.Generator().manual_seed(7)
    x = torch.randn(tokens, hidden, generator=g).to(device, dtype)
    w13, w2, s13, s2 = _weights(experts, hidden, inter, dtype, device, g)
    weights = torch.rand(tokens, 2, generator=g).to(device)
    cases = {
        "all-to-one": torch.full((tokens, 2), 3),
        "dropped": torch.randint(-1, experts, (tokens, 2), generator=g),
        "all-dropped": torch.full((tokens, 2), -1),
        "empty-experts": torch.randint(0, 2, (tokens, 2), generator=g) * 4,
    }
    for name, ids in cases.items():
        ids = ids.to(device)
        for shared in ((s13, s2), (None, None)):
            y = pearlmoe.moe_ffn_routed(x, weights, ids, w13, w2, *shared)
            cpu = [t if t is None else t.cpu() for t in (w13, w2, *shared)]
            low = reference.moe_ffn_routed(x.cpu(), weights.cpu(), ids.cpu(), *cpu)
            oracle = reference.moe_ffn_routed(
                x.cpu().double(),
                weights.cpu().double(),
                ids.cpu(),
                *[t if t is None else t.double() for t in cpu],
            )
            assert_close_to_oracle(y, low, oracle, floor=1e-5), name
    y = pearlmoe.moe_ffn_routed(x, weights, torch.full((tokens, 2), -1, device=device), w13, w2)
    assert (y == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_moe_ffn_non_contiguous(device):
    dtype = DTYPES[device][0]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(32, 19, generator=g).to(device, dtype).t()  # [19, 32], strided
    router_w = torch.randn(32, 4, generator=g).to(device).t()  # [4, 32], strided
    w13, w2, s13, s2 = _weights(4, 32, 16, dtype, device, g)
    w13 = w13.transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
    y = pearlmoe.moe_ffn(x, router_w, w13, w2, 1, s13, s2)
    want = pearlmoe.moe_ffn(x.contiguous(), router_w.contiguous(), w13.contiguous(), w2, 1, s13, s2)
    torch.testing.assert_close(y, want)


def test_moe_ffn_routed_gradcheck():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 8, generator=g).double().requires_grad_()
    weights = torch.rand(6, 2, generator=g).double().requires_grad_()
    ids = torch.tensor([[0, 2], [2, -1], [1, 0], [0, 1], [2, 0], [-1, -1]])
    w13 = (torch.randn(3, 10, 8, generator=g) / 3).double().requires_grad_()
    w2 = (torch.randn(3, 8, 5, generator=g) / 3).double().requires_grad_()
    s13 = (torch.randn(12, 8, generator=g) / 3).double().requires_grad_()
    s2 = (torch.randn(8, 6, generator=g) / 3).double().requires_grad_()

    def fn(x, weights, w13, w2, s13, s2):
        return pearlmoe.moe_ffn_routed(x, weights, ids, w13, w2, s13, s2)

    assert torch.autograd.gradcheck(fn, (x, weights, w13, w2, s13, s2))


@pytest.mark.parametrize("renormalize", [False, True])
def test_moe_ffn_gradients_match_reference(renormalize):
    g = torch.Generator().manual_seed(5)
    params = [
        torch.randn(33, 16, generator=g),  # x
        torch.randn(4, 16, generator=g),  # router_w
        torch.randn(4, 24, 16, generator=g) / 4,  # w13
        torch.randn(4, 16, 12, generator=g) / 4,  # w2
        torch.randn(20, 16, generator=g) / 4,  # shared_w13
        torch.randn(16, 10, generator=g) / 4,  # shared_w2
    ]
    ours = [p.clone().requires_grad_() for p in params]
    theirs = [p.clone().requires_grad_() for p in params]
    grad_y = torch.randn(33, 16, generator=g)
    x, r, w13, w2, s13, s2 = ours
    pearlmoe.moe_ffn(x, r, w13, w2, 2, s13, s2, renormalize).backward(grad_y)
    x, r, w13, w2, s13, s2 = theirs
    reference.moe_ffn(x, r, w13, w2, 2, s13, s2, renormalize).backward(grad_y)
    for name, a, b in zip(["x", "router_w", "w13", "w2", "s13", "s2"], ours, theirs, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=name)


def _moe_args(**overrides):
    args = dict(
        x=torch.randn(4, 8),
        router_w=torch.randn(3, 8),
        w13=torch.randn(3, 12, 8),
        w2=torch.randn(3, 8, 6),
        top_k=1,
        shared_w13=None,
        shared_w2=None,
    )
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (dict(w13=torch.randn(3, 12, 7)), r"w13 must be \[E, 2\*I, H\] with H = x.size\(1\) = 8"),
        (dict(w2=torch.randn(3, 8, 5)), r"w2 must be \[E, H, I\] = \[3, 8, 6\]"),
        (dict(w2=torch.randn(2, 8, 6)), r"w2 must be \[E, H, I\] = \[3, 8, 6\]"),
        (dict(router_w=torch.randn(4, 8)), r"router_w must be \[E, H\] = \[3, 8\]"),
        (dict(w13=torch.randn(3, 12, 8).double()), r"w13 must have x's dtype Float, got Double"),
        (dict(top_k=4), r"top_k must be in \[1, E=3\], got 4"),
        (dict(top_k=0), r"top_k must be in \[1, E=3\], got 0"),
        (dict(shared_w13=torch.randn(12, 8)), r"shared_w13 and shared_w2 must be given together"),
        (dict(shared_w13=torch.randn(12, 8), shared_w2=torch.randn(8, 5)), r"shared_w2 must be \[H, Is\] = \[8, 6\]"),
        (dict(x=torch.randn(4, 8, dtype=torch.float64)), r"w13 must have x's dtype Double"),
        (dict(x=torch.randn(4)), r"x must be 2-D"),
    ],
    ids=["H", "I", "E-w2", "E-router", "dtype", "k>E", "k=0", "shared-half", "shared-I", "x-dtype", "x-rank"],
)  # fmt: skip
@pytest.mark.parametrize("requires_grad", [False, True])
def test_moe_ffn_bad_input(overrides, match, requires_grad):
    args = _moe_args(**overrides)
    if requires_grad and args["x"].is_floating_point():
        args["x"].requires_grad_()
    with pytest.raises(RuntimeError, match=r"pearlmoe\.moe_ffn: " + match):
        pearlmoe.moe_ffn(**args)


def test_moe_ffn_routed_bad_ids():
    args = _moe_args()
    x, w13, w2 = args["x"], args["w13"], args["w2"]
    with pytest.raises(RuntimeError, match=r"moe_ffn_routed: topk_ids\[2, 0\] = 3 is out of range"):
        pearlmoe.moe_ffn_routed(x, torch.ones(4, 1), torch.tensor([[0], [1], [3], [0]]), w13, w2)
    with pytest.raises(RuntimeError, match=r"topk_weights and topk_ids must both be \[T, k\]"):
        pearlmoe.moe_ffn_routed(x, torch.ones(3, 1), torch.zeros(3, 1, dtype=torch.int32), w13, w2)


# ---- training routing: capacity, recycle, stats --------------------------------------------------


def test_capacity_never_exceeded_and_priority():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(101, 8, generator=g)
    logits[:, 2] += 3  # a hot expert
    for k, factor in [(1, 1.0), (2, 1.0), (2, 0.5)]:
        weights, ids, stats = route(logits, k, capacity_factor=factor)
        cap = capacity(101, k, 8, factor)
        counts = torch.bincount(ids[ids >= 0].long(), minlength=8)
        assert (counts <= cap).all() and counts[2] == cap
        assert stats.dropped == (ids < 0).sum() > 0
        assert (weights[ids < 0] == 0).all()
        kept_first = ids[:, 0] == 2
        # first choices of the hot expert are kept in token order
        hot_first = (reference.topk_softmax(logits, k)[1][:, 0] == 2).nonzero().squeeze(1)
        assert kept_first[hot_first[: min(cap, hot_first.numel())]].all()


def test_recycle_routes_everything_when_capacity_allows():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(64, 8, generator=g)
    logits[:, 5] += 4
    probs = torch.softmax(logits, -1)
    weights, ids, stats = route(
        logits, 1, capacity_factor=1.0, recycle=True, generator=torch.Generator().manual_seed(2)
    )
    assert (ids >= 0).all() and stats.dropped == 0 and stats.recycled > 0
    counts = torch.bincount(ids.long().flatten(), minlength=8)
    assert (counts <= capacity(64, 1, 8, 1.0)).all()
    torch.testing.assert_close(weights, probs.gather(1, ids.long()))  # weight = prob of new expert
    again = route(logits, 1, capacity_factor=1.0, recycle=True,
                  generator=torch.Generator().manual_seed(2))  # fmt: skip
    assert torch.equal(again[1], ids)  # reproducible from the generator
    # Too little capacity in total: recycling fills every spare place, the rest stay dropped.
    _, ids, stats = route(logits, 1, capacity_factor=0.5, recycle=True, generator=g)
    assert stats.dropped == 64 - 8 * capacity(64, 1, 8, 0.5)


def test_moe_ffn_with_capacity_and_stats():
    g = torch.Generator().manual_seed(4)
    x, router_w = torch.randn(50, 16, generator=g), torch.randn(4, 16, generator=g)
    w13, w2, s13, s2 = _weights(4, 16, 8, torch.float32, "cpu", g)
    y = pearlmoe.moe_ffn(x, router_w, w13, w2, 1, s13, s2)
    y_big_cap, stats = pearlmoe.moe_ffn(
        x, router_w, w13, w2, 1, s13, s2, capacity_factor=10.0, return_stats=True
    )
    torch.testing.assert_close(y_big_cap, y)  # no token dropped: same as the fused op
    assert stats.dropped == 0 and torch.isclose(stats.token_fraction.sum(), torch.tensor(1.0))
    y_cut = pearlmoe.moe_ffn(x, router_w, w13, w2, 1, s13, s2, capacity_factor=0.25)
    assert not torch.allclose(y_cut, y)


def test_load_balancing_loss_formula():
    # 4 tokens, 2 experts: tokens 0-2 choose expert 0, token 3 expert 1.
    logits = torch.tensor([[2.0, 0.0], [1.0, 0.0], [3.0, 1.0], [0.0, 1.0]])
    _, _, stats = route(logits, 1)
    probs = torch.softmax(logits, -1)
    f = torch.tensor([0.75, 0.25])
    torch.testing.assert_close(stats.token_fraction, f)
    torch.testing.assert_close(stats.load_balancing_loss(), 2 * (f * probs.mean(0)).sum())
    uniform = route(torch.zeros(6, 3), 1)[2]  # all ties go to expert 0: f = (1, 0, 0), P = 1/3
    torch.testing.assert_close(uniform.load_balancing_loss(), torch.tensor(1.0))


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (none present)")
def test_moe_ffn_under_cuda_graph():
    g = torch.Generator().manual_seed(9)
    w13, w2, s13, s2 = _weights(16, 64, 32, torch.bfloat16, "cuda", g)
    router_w = torch.randn(16, 64, generator=g).cuda()
    for tokens in (1, 64, 1024):  # decode tile, and prefill (CUTLASS on Hopper)
        x = torch.randn(tokens, 64, generator=g).cuda().bfloat16()
        pearlmoe.moe_ffn(x, router_w, w13, w2, 1, s13, s2)  # warm up outside capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = pearlmoe.moe_ffn(x, router_w, w13, w2, 1, s13, s2)
        x.copy_(torch.randn(tokens, 64, generator=g).cuda().bfloat16())
        graph.replay()
        want = pearlmoe.moe_ffn(x, router_w, w13, w2, 1, s13, s2)
        torch.testing.assert_close(y, want)


def test_grouped_gemm_wgrad_bad_input():
    offs = torch.tensor([0, 2, 4], dtype=torch.int32)
    with pytest.raises(
        RuntimeError, match=r"grouped_gemm_wgrad: grad_c and a must have the same rows"
    ):
        pearlmoe.ops.grouped_gemm_wgrad(torch.randn(3, 5), torch.randn(4, 6), offs)
    with pytest.raises(RuntimeError, match=r"grouped_gemm_wgrad: grad_c must have a's dtype Float"):
        pearlmoe.ops.grouped_gemm_wgrad(torch.randn(4, 5).double(), torch.randn(4, 6), offs)
    with pytest.raises(RuntimeError, match=r"grouped_gemm_wgrad: group_offsets\[G\] = 5 exceeds"):
        pearlmoe.ops.grouped_gemm_wgrad(
            torch.randn(4, 5), torch.randn(4, 6), torch.tensor([0, 2, 5], dtype=torch.int32)
        )


def test_group_offsets_views_are_checked_as_read():
    """Issue 13 item 8: group_offsets as a strided or expanded view is checked (and used) element
    for element; the check used to read the raw storage, so valid views were rejected and
    invalid ones reached the kernel."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(8, 16, generator=g), torch.randn(2, 4, 16, generator=g)
    want = reference.grouped_gemm(a, b, torch.tensor([0, 3, 8], dtype=torch.int32))
    strided = torch.tensor([0, 99, 3, 99, 8], dtype=torch.int32)[::2]
    torch.testing.assert_close(pearlmoe.grouped_gemm(a, b, strided), want)
    empty = torch.zeros(1, dtype=torch.int32).expand(3)  # every group empty: all rows zero
    assert (pearlmoe.grouped_gemm(a, b, empty) == 0).all()
    bad = torch.tensor([0, 1, 3, 2, 999], dtype=torch.int32)[::2]  # [0, 3, 999]; raw [0, 1, 3] ok
    with pytest.raises(RuntimeError, match=r"grouped_gemm: group_offsets\[G\] = 999 exceeds the 8"):
        pearlmoe.grouped_gemm(a, b, bad)
    with pytest.raises(RuntimeError, match=r"grouped_gemm_wgrad: group_offsets\[G\] = 999 exceeds"):
        torch.ops.pearlmoe.grouped_gemm_wgrad(torch.randn(8, 4), a, bad)
    torch.testing.assert_close(
        torch.ops.pearlmoe.grouped_gemm_wgrad(a[:, :4].contiguous(), a, strided),
        reference.grouped_gemm_wgrad(a[:, :4], a, torch.tensor([0, 3, 8], dtype=torch.int32)),
    )


# ---- issue 13 items 10 and 11 ---------------------------------------------------------------------


def test_dropped_slot_weight_is_ignored_under_autograd():
    """Item 11: a NaN/inf weight on a dropped (-1) slot made the differentiable path's token output
    NaN (0 x NaN); the fused path and the reference ignore it, and so does autograd now."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 16, generator=g)
    w13, w2, s13, s2 = _weights(3, 16, 8, torch.float32, "cpu", g)
    ids = torch.tensor([[0, -1], [1, 2], [-1, -1], [2, 0], [1, -1]])
    weights = torch.rand(5, 2, generator=g)
    weights[ids < 0] = torch.tensor([float("nan"), float("inf"), -float("inf"), float("nan")])
    want = reference.moe_ffn_routed(x, weights.masked_fill(ids < 0, 0), ids, w13, w2, s13, s2)
    no_grad = pearlmoe.moe_ffn_routed(x, weights, ids, w13, w2, s13, s2)
    xg, wg = x.clone().requires_grad_(), weights.clone().requires_grad_()
    y = pearlmoe.moe_ffn_routed(xg, wg, ids, w13, w2, s13, s2)
    torch.testing.assert_close(no_grad, want)
    torch.testing.assert_close(y, want)
    y.sum().backward()
    assert xg.grad.isfinite().all() and wg.grad.isfinite().all()
    assert (wg.grad[ids < 0] == 0).all()


def _moe_layer(g, experts=4, hidden=16, inter=8, tokens=6):
    x = torch.randn(tokens, hidden, generator=g)
    router_w = torch.randn(experts, hidden, generator=g)
    w13, w2, _, _ = _weights(experts, hidden, inter, torch.float32, "cpu", g, shared=False)
    return x, router_w, w13, w2


@pytest.mark.parametrize("factor", [float("nan"), float("inf"), -1.0, 0.0, True, "2"])
def test_moe_ffn_bad_capacity_factor(factor):
    """Item 10: the Python routing path checked nothing; now the error names the op and
    argument instead of math.ceil's or a matmul's."""
    x, router_w, w13, w2 = _moe_layer(torch.Generator().manual_seed(1))
    with pytest.raises(
        RuntimeError, match=r"pearlmoe\.moe_ffn: capacity_factor must be a positive finite number"
    ):
        pearlmoe.moe_ffn(x, router_w, w13, w2, 2, capacity_factor=factor)


def test_moe_ffn_absurd_capacity_factor_is_bounded():
    """Item 10: a factor of 1e12 with recycling used to size recycle routing's tables from the
    capacity (~100 GB); capacity is at most T, which already drops nothing."""
    x, router_w, w13, w2 = _moe_layer(torch.Generator().manual_seed(2))
    y, stats = pearlmoe.moe_ffn(x, router_w, w13, w2, 2, capacity_factor=1e12, recycle=True,
                                generator=torch.Generator().manual_seed(0), return_stats=True)  # fmt: skip
    assert capacity(6, 2, 4, 1e12) == 6 and stats.dropped == 0
    torch.testing.assert_close(y, pearlmoe.moe_ffn(x, router_w, w13, w2, 2))


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (dict(router_w=torch.randn(4, 15)), r"router_w must be \[E, H\] = \[4, 16\]"),
        (dict(router_w=torch.randn(5, 16)), r"router_w must be \[E, H\] = \[4, 16\]"),
        (dict(top_k=5), r"top_k must be in \[1, E=4\], got 5"),
        (
            dict(x=torch.randn(6, 16, dtype=torch.float64)),
            r"w13 must have x's dtype Double, got Float",
        ),
    ],
    ids=["router-H", "router-E", "top_k", "dtype"],
)
@pytest.mark.parametrize(
    "python_path", [dict(capacity_factor=1.0), dict(return_stats=True)], ids=["capacity", "stats"]
)
def test_moe_ffn_python_path_checks_like_the_op(change, match, python_path):
    x, router_w, w13, w2 = _moe_layer(torch.Generator().manual_seed(3))
    args = dict(x=x, router_w=router_w, w13=w13, w2=w2, top_k=2)
    args.update(change)
    with pytest.raises(RuntimeError, match=r"pearlmoe\.moe_ffn: " + match):
        pearlmoe.moe_ffn(**args, **python_path)
    with pytest.raises(RuntimeError, match=r"pearlmoe\.moe_ffn: " + match):  # the op, same words
        pearlmoe.moe_ffn(**args)
