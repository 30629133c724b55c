"""Case specs for the property-based fuzz test (tests/test_fuzz.py) and what each must do.

A spec is a small JSON-able dict drawn by a hypothesis strategy: sizes (0, 1, primes, 4099),
dtypes, how each tensor is laid out (contiguous, transposed, strided, offset, expanded), special
values, and at most one mutation that makes the call invalid. `run(spec)` builds the tensors
from it deterministically, calls the op and returns a verdict:
  * valid: no error, and the outputs match pearlmoe.reference (integers exactly; floats within
    2x the same math in the working dtype, as the other tests);
  * invalid: a RuntimeError naming the op ("pearlmoe.<op>:", or the dispatcher's
    "pearlmoe::<op>()" for a wrong argument type) and the argument;
  * the fake (meta) kernel agrees: it rejects the shape/dtype/device mutations, naming the op and
    the argument, and for everything else returns the real outputs' shapes and dtypes.
Runs happen in tests/fuzz_worker.py, a subprocess, so a hang or a crash is a failing case too.
"""

from __future__ import annotations

import traceback

import torch
from hypothesis import strategies as st

import pearlmoe
from conftest import assert_close_to_oracle
from pearlmoe import reference

_ops = torch.ops.pearlmoe
DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
VIEWS = ["contiguous", "contiguous", "transposed", "strided", "offset", "expanded"]
FLOATS = st.sampled_from(list(DTYPES))


def view(t: torch.Tensor, kind: str) -> torch.Tensor:
    """t's values (expanded: its first row's) in the memory layout `kind`."""
    if t.dim() == 0 or t.numel() == 0 or kind == "contiguous":
        return t
    if kind == "transposed" and t.dim() >= 2:
        return t.transpose(0, -1).contiguous().transpose(0, -1)
    if kind == "strided":
        big = t.new_zeros(*t.shape[:-1], 2 * t.shape[-1] + 1)
        big[..., 1::2] = t
        return big[..., 1::2]
    if kind == "offset":
        buf = t.new_zeros(t.numel() + 3)
        out = buf[3:].view(t.shape)
        out.copy_(t)
        return out
    if kind == "expanded":
        return t[:1].expand(t.shape)
    return t


def _gen(spec) -> torch.Generator:
    return torch.Generator().manual_seed(spec["seed"])


def _floor(dtype, oracle=None) -> float:
    """The tests' noise floor, at least a few ulps of the largest output: two valid summation
    orders differ by that much, and the same-dtype reference can happen to be exact."""
    base = 1e-6 if dtype in (torch.float32, torch.float64) else 1e-3
    if oracle is None or oracle.numel() == 0 or not oracle.isfinite().any():
        return base
    scale = oracle[oracle.isfinite()].abs().max().item()
    return max(base, 8 * torch.finfo(dtype).eps * scale)


def _close(out, low, oracle, dtype):
    if dtype == torch.float64:  # the oracle itself: within rounding of a different sum order
        torch.testing.assert_close(out, oracle.to(out.dtype), rtol=1e-9, atol=1e-12, equal_nan=True)
    else:
        assert_close_to_oracle(out, low, oracle, floor=_floor(dtype, oracle))


def _poke(t: torch.Tensor, value, g) -> torch.Tensor:
    """A copy of t (same layout where it can keep it) with one random element set to value."""
    t = t.clone()
    if t.numel():
        flat = torch.randint(0, t.numel(), (1,), generator=g)
        t[tuple(int(i) for i in torch.unravel_index(flat, t.shape))] = value
    return t


class Case:
    """One call: `call(*args)` as users make it, `fake` the op for the meta-tensor check,
    `invalid` the argument an error must name (None: a valid call), `structural` whether the
    fake kernel can see the problem (shapes, dtypes, scalars), `check(outputs)` for valid ones."""

    def __init__(self, op, call, args, invalid=None, structural=False, check=None, fake=None):
        self.op, self.call, self.args = op, call, args
        self.invalid, self.structural, self.check, self.fake = invalid, structural, check, fake


def _outputs(out):
    return out if isinstance(out, tuple) else (out,)


def _names_it(message: str, op: str, arg: str) -> bool:
    if op == "KVCache":  # the Python cache object names itself
        return message.startswith("KVCache:")
    return (f"pearlmoe.{op}:" in message or f"pearlmoe::{op}()" in message) and arg in message


def _meta(x):
    return x.to("meta") if isinstance(x, torch.Tensor) else x


def run(spec: dict) -> dict:
    """The verdict on one spec: {"ok": bool, "detail": str}."""
    try:
        case = BUILDERS[spec["op"]](spec)
    except Exception:
        return {"ok": False, "detail": "building the case failed:\n" + traceback.format_exc()}
    out = None
    try:
        out = case.call(*case.args)
        if case.invalid is not None:
            return {"ok": False, "detail": f"accepted invalid input (bad {case.invalid})"}
    except Exception as e:
        if case.invalid is None:
            return {"ok": False, "detail": f"rejected valid input: {type(e).__name__}: {e}"}
        accepted = (ValueError, TypeError, RuntimeError) if case.op == "KVCache" else RuntimeError
        if not isinstance(e, accepted) or not _names_it(str(e), case.op, case.invalid):
            return {
                "ok": False,
                "detail": f"error does not name pearlmoe.{case.op} and "
                f"{case.invalid}: {type(e).__name__}: {e}",
            }
    if case.invalid is None and case.check is not None:
        try:
            case.check(out)
        except AssertionError as e:
            return {"ok": False, "detail": f"wrong answer: {e}"}
    if case.fake is not None:
        try:
            fake_out = case.fake(*[_meta(a) for a in case.args])
            if case.invalid is not None and case.structural:
                return {"ok": False, "detail": f"the fake kernel accepted bad {case.invalid}"}
            if out is not None:
                got = [(tuple(t.shape), t.dtype) for t in _outputs(fake_out)]
                want = [(tuple(t.shape), t.dtype) for t in _outputs(out)]
                if got != want:
                    return {"ok": False, "detail": f"fake outputs {got} != real outputs {want}"}
        except Exception as e:
            if not (case.invalid is not None and case.structural):
                return {"ok": False, "detail": f"the fake kernel rejected: {type(e).__name__}: {e}"}
            if not _names_it(str(e), case.op, case.invalid):
                return {
                    "ok": False,
                    "detail": f"the fake kernel's error does not name "
                    f"pearlmoe.{case.op} and {case.invalid}: {e}",
                }
    return {"ok": True, "detail": ""}


# ---- strategies: common pieces -------------------------------------------------------------------


def _spec(op, mutations, **fields):
    """A strategy for `op`'s specs: the given fields, a seed, and (half the time) a mutation."""
    return st.fixed_dictionaries(
        {
            "op": st.just(op),
            "seed": st.integers(0, 2**16),
            "mutation": st.one_of(st.none(), st.sampled_from(mutations)),
            **fields,
        }
    )


SIZES = st.sampled_from([0, 1, 2, 3, 5, 7, 13, 31])


# ---- topk_softmax --------------------------------------------------------------------------------

TOPK_MUTATIONS = [
    "rank1",
    "rank3",
    "float64",
    "bfloat16",
    "int",
    "k0",
    "k>E",
    "no-experts",
    "k-type",
]
TOPK = _spec(
    "topk_softmax",
    TOPK_MUTATIONS,
    tokens=st.sampled_from([0, 1, 2, 7, 31, 4099]),
    experts=st.sampled_from([1, 2, 3, 8, 33, 257]),
    k=st.integers(1, 8),
    renormalize=st.booleans(),
    special=st.sampled_from(["none", "nan", "inf", "-inf", "ties", "huge"]),
    layout=st.sampled_from(VIEWS),
)


def build_topk(spec):
    tokens, experts, m = spec["tokens"], spec["experts"], spec["mutation"]
    k = min(spec["k"], experts)
    g = _gen(spec)
    logits = torch.randn(tokens, experts, generator=g) * 3
    special = spec["special"]
    if special == "ties":
        logits = logits.round()
    elif special == "huge":
        logits = logits * 1e30
    elif special != "none" and logits.numel():
        logits.view(-1)[torch.randint(0, logits.numel(), (3,), generator=g)] = float(special)
    logits = view(logits, spec["layout"])
    invalid, structural = None, True
    if m == "rank1":
        logits, invalid = logits.reshape(-1), "router_logits"
    elif m == "rank3":
        logits, invalid = logits.unsqueeze(0), "router_logits"
    elif m in ("float64", "bfloat16"):
        logits, invalid = logits.to(DTYPES[m]), "router_logits"
    elif m == "int":
        logits, invalid = logits.nan_to_num().clamp(-1e3, 1e3).int(), "router_logits"
    elif m == "k0":
        k, invalid = 0, "k"
    elif m == "k>E":
        k, invalid = experts + 1, "k"
    elif m == "no-experts":
        logits, invalid = torch.empty(tokens, 0), "router_logits"
    elif m == "k-type":
        k, invalid, structural = "2", "k", False  # the dispatcher refuses it before any kernel

    def check(out):
        w, ids = out
        want_w, want_ids = reference.topk_softmax(logits, k, spec["renormalize"])
        assert torch.equal(ids, want_ids), "ids differ from the reference"
        torch.testing.assert_close(w, want_w, rtol=1e-5, atol=1e-7, equal_nan=True)

    args = (logits, k, spec["renormalize"])
    fake = _ops.topk_softmax.default if m != "k-type" else None
    return Case("topk_softmax", _ops.topk_softmax.default, args, invalid, structural, check, fake)


# ---- grouped_topk --------------------------------------------------------------------------------

GROUPED_MUTATIONS = ["rank1", "float64", "k0", "k>E", "groups0", "groups33", "groups-split",
                     "topk-groups0", "topk-groups>G", "bias-dtype", "bias-len", "bias-rank"]  # fmt: skip
GROUPED = _spec(
    "grouped_topk",
    GROUPED_MUTATIONS,
    tokens=st.sampled_from([0, 1, 2, 7, 31, 4099]),
    groups=st.sampled_from([1, 1, 2, 3, 4, 8]),
    per_group=st.sampled_from([2, 3, 5, 16, 32]),
    k=st.integers(1, 9),
    topk_groups=st.integers(1, 8),
    renormalize=st.booleans(),
    scaling=st.sampled_from([1.0, 2.5]),
    bias=st.sampled_from(["none", "small", "negative"]),
    special=st.sampled_from(["none", "nan", "inf", "-inf", "ties"]),
    layout=st.sampled_from(VIEWS),
)


def build_grouped(spec):
    groups, m = spec["groups"], spec["mutation"]
    experts = groups * spec["per_group"]
    k, topk_groups = min(spec["k"], experts), min(spec["topk_groups"], groups)
    g = _gen(spec)
    logits = torch.randn(spec["tokens"], experts, generator=g) * 3
    if spec["special"] == "ties":
        logits = logits.round()
    elif spec["special"] != "none" and logits.numel():
        logits.view(-1)[torch.randint(0, logits.numel(), (3,), generator=g)] = float(
            spec["special"]
        )
    logits = view(logits, spec["layout"])
    bias = None
    if spec["bias"] != "none":  # "negative": the masked groups' 0.0 keys outrank the kept ones
        bias = torch.randn(experts, generator=g) * 0.1 - (2.0 if spec["bias"] == "negative" else 0)
    invalid = None
    if m == "rank1":
        logits, invalid = logits.reshape(-1), "router_logits"
    elif m == "float64":
        logits, invalid = logits.double(), "router_logits"
    elif m == "k0":
        k, invalid = 0, "k"
    elif m == "k>E":
        k, invalid = experts + 1, "k"
    elif m == "groups0":
        groups, invalid = 0, "num_groups"
    elif m == "groups33":
        groups, invalid = 33, "num_groups"
    elif m == "groups-split" and experts % (groups + 1):
        groups, invalid = groups + 1, "num_groups"
    elif m == "topk-groups0":
        topk_groups, invalid = 0, "topk_groups"
    elif m == "topk-groups>G":
        topk_groups, invalid = groups + 1, "topk_groups"
    elif m == "bias-dtype":
        bias, invalid = torch.zeros(experts, dtype=torch.float64), "correction_bias"
    elif m == "bias-len":
        bias, invalid = torch.zeros(experts + 1), "correction_bias"
    elif m == "bias-rank":
        bias, invalid = torch.zeros(1, experts), "correction_bias"
    args = (logits, bias, k, groups, topk_groups, spec["renormalize"], spec["scaling"])

    def check(out):
        w, ids = out
        want_w, want_ids = reference.grouped_topk(*args)
        assert torch.equal(ids, want_ids), "ids differ from the reference"
        torch.testing.assert_close(w, want_w, rtol=1e-5, atol=1e-7, equal_nan=True)

    op = _ops.grouped_topk.default
    return Case("grouped_topk", op, args, invalid, True, check, op)


# ---- moe_align -----------------------------------------------------------------------------------

ALIGN_MUTATIONS = ["rank1", "float", "experts0", "experts8193", "id<-1", "id>=E"]
ALIGN = _spec(
    "moe_align",
    ALIGN_MUTATIONS,
    tokens=st.sampled_from([0, 1, 2, 5, 31, 4099]),
    k=st.integers(1, 3),
    experts=st.sampled_from([1, 3, 16, 257]),
    int64=st.booleans(),
    layout=st.sampled_from(VIEWS),
)


def build_align(spec):
    experts, m = spec["experts"], spec["mutation"]
    g = _gen(spec)
    ids = torch.randint(-1, experts, (spec["tokens"], spec["k"]), generator=g)
    ids = view(ids.to(torch.int64 if spec["int64"] else torch.int32), spec["layout"])
    invalid, structural = None, True
    if m == "rank1":
        ids, invalid = ids.reshape(-1), "topk_ids"
    elif m == "float":
        ids, invalid = ids.float(), "topk_ids"
    elif m == "experts0":
        experts, invalid = 0, "num_experts"
    elif m == "experts8193":
        experts, invalid = 8193, "num_experts"
    elif m in ("id<-1", "id>=E") and ids.numel():
        ids = _poke(ids, -2 if m == "id<-1" else experts, g)
        invalid, structural = "topk_ids", False

    def check(out):
        for got, want in zip(out, reference.moe_align(ids, experts), strict=True):
            assert torch.equal(got, want), "moe_align differs from the reference"

    args = (ids, experts)
    return Case(
        "moe_align",
        _ops.moe_align.default,
        args,
        invalid,
        structural,
        check,
        _ops.moe_align.default,
    )


# ---- grouped_gemm / grouped_gemm_wgrad -----------------------------------------------------------

GEMM_MUTATIONS = [
    "a-rank",
    "b-rank",
    "offs-rank",
    "a-int",
    "b-dtype",
    "offs-int64",
    "no-groups",
    "K",
    "offs-len",
    "offs0",
    "offs-decreasing",
    "offs-past-M",
]
GEMM = _spec(
    "grouped_gemm",
    GEMM_MUTATIONS,
    rows=SIZES,
    groups=st.integers(1, 5),
    n=st.sampled_from([1, 3, 8]),
    k=st.sampled_from([0, 1, 5, 16]),
    tail=st.integers(0, 3),
    dtype=FLOATS,
    layout=st.sampled_from(VIEWS),
    offs_layout=st.sampled_from(VIEWS),
    wgrad=st.booleans(),
    special=st.sampled_from(["none", "none", "nan", "inf"]),
)


def _offsets(rows, groups, tail, g):
    cuts = torch.randint(0, max(rows - tail, 0) + 1, (groups - 1,), generator=g).sort().values
    return torch.cat([torch.tensor([0]), cuts, torch.tensor([max(rows - tail, 0)])]).int()


def build_gemm(spec):
    rows, groups, n, k, m = spec["rows"], spec["groups"], spec["n"], spec["k"], spec["mutation"]
    dtype, wgrad = DTYPES[spec["dtype"]], spec["wgrad"]
    op = "grouped_gemm_wgrad" if wgrad else "grouped_gemm"
    g = _gen(spec)
    a = torch.randn(rows, k, generator=g)
    if spec["special"] != "none" and a.numel():  # propagates the same in any summation order
        a.view(-1)[int(torch.randint(0, a.numel(), (1,), generator=g))] = float(spec["special"])
    a = view(a.to(dtype), spec["layout"])
    b = torch.randn(groups, n, k, generator=g).to(dtype)
    grad_c = view(torch.randn(rows, n, generator=g).to(dtype), spec["layout"])
    offs = _offsets(rows, groups, spec["tail"], g)
    if spec["offs_layout"] != "expanded":  # expanded offsets would be all zeros: still valid
        offs = view(offs, spec["offs_layout"])
    invalid, structural = None, True
    if m == "a-rank":
        a, invalid = a.reshape(-1), "a"
    elif m == "b-rank" and not wgrad:
        b, invalid = b.flatten(0, 1), "b"
    elif m == "offs-rank":
        offs, invalid = offs.unsqueeze(0), "group_offsets"
    elif m == "a-int":
        a, invalid = a.int(), "a"
    elif m == "b-dtype":  # b for grouped_gemm, grad_c for the weight gradient
        other = torch.float64 if dtype != torch.float64 else torch.float32
        if wgrad:
            grad_c, invalid = grad_c.to(other), "grad_c"
        else:
            b, invalid = b.to(other), "b"
    elif m == "offs-int64":
        offs, invalid = offs.long(), "group_offsets"
    elif m == "no-groups" and not wgrad:
        b, offs, invalid = b[:0], offs[:1], "b"
    elif m == "K" and not wgrad:
        b, invalid = torch.randn(groups, n, k + 1).to(dtype), "b"
    elif m == "offs-len":  # grouped_gemm needs G + 1 entries, grouped_gemm_wgrad at least 2
        offs, invalid = (offs[:1] if wgrad else torch.cat([offs, offs[-1:]])), "group_offsets"
    elif m in ("offs0", "offs-decreasing", "offs-past-M"):
        offs = offs.clone().contiguous()
        if m == "offs0":
            offs[0] = 1
        elif m == "offs-decreasing":
            offs[1] = offs[2] + 1 if offs.numel() > 2 else -1
        else:
            offs[-1] = rows + 1
        invalid, structural = "group_offsets", False

    def check(out):
        if wgrad:
            low = reference.grouped_gemm_wgrad(grad_c, a, offs)
            oracle = reference.grouped_gemm_wgrad(grad_c.double(), a.double(), offs)
        else:
            low = reference.grouped_gemm(a, b, offs)
            oracle = reference.grouped_gemm(a.double(), b.double(), offs)
        _close(out, low, oracle, dtype)

    if wgrad:
        args = (grad_c, a, offs)
        return Case(
            op,
            _ops.grouped_gemm_wgrad.default,
            args,
            invalid,
            structural,
            check,
            _ops.grouped_gemm_wgrad.default,
        )
    args = (a, b, offs)
    return Case(
        op, _ops.grouped_gemm.default, args, invalid, structural, check, _ops.grouped_gemm.default
    )


# ---- moe_ffn_routed / moe_ffn --------------------------------------------------------------------

MOE_MUTATIONS = [
    "x-rank",
    "x-int",
    "w13-odd",
    "w2-shape",
    "shared-half",
    "weights-shape",
    "ids-float",
    "k0",
    "id-range",
    "router-shape",
    "top_k",
    "router-int",
    "capacity-nan",
    "capacity-neg",
]
MOE = _spec(
    "moe",
    MOE_MUTATIONS,
    tokens=SIZES,
    hidden=st.sampled_from([1, 4, 8]),
    inter=st.sampled_from([1, 3, 8]),
    experts=st.integers(1, 4),
    k=st.integers(1, 3),
    shared=st.booleans(),
    dtype=FLOATS,
    routed=st.booleans(),
    renormalize=st.booleans(),
    python_path=st.sampled_from(["none", "none", "capacity", "stats"]),
    layout=st.sampled_from(VIEWS),
)


def build_moe(spec):
    t, h, i, e, m = spec["tokens"], spec["hidden"], spec["inter"], spec["experts"], spec["mutation"]
    k, dtype, routed = min(spec["k"], e), DTYPES[spec["dtype"]], spec["routed"]
    g = _gen(spec)
    x = view(torch.randn(t, h, generator=g).to(dtype), spec["layout"])
    w13 = (torch.randn(e, 2 * i, h, generator=g) * h**-0.5).to(dtype)
    w2 = (torch.randn(e, h, i, generator=g) * i**-0.5).to(dtype)
    s13 = (torch.randn(2 * i, h, generator=g) * h**-0.5).to(dtype) if spec["shared"] else None
    s2 = (torch.randn(h, i, generator=g) * i**-0.5).to(dtype) if spec["shared"] else None
    router_w = torch.randn(e, h, generator=g)
    weights = view(torch.rand(t, k, generator=g), spec["layout"])
    ids = torch.randint(-1, e, (t, k), generator=g)
    weights = weights.masked_fill(ids < 0, float("nan"))  # a dropped slot's weight is ignored
    invalid, structural = None, True
    op = "moe_ffn_routed" if routed else "moe_ffn"
    top_k, python_path, factor = k, spec["python_path"], 1.25
    if m == "x-rank":
        x, invalid = x.reshape(-1), "x"
    elif m == "x-int":
        x, invalid = x.int(), "x"
    elif m == "w13-odd":
        w13, invalid = w13[:, : 2 * i - 1], "w13"
    elif m == "w2-shape":
        w2, invalid = w2[:, :, :0] if i > 0 else w2[:0], "w2"
    elif m == "shared-half":
        s13, s2, invalid = (
            s13 if s13 is not None else torch.randn(2, h).to(dtype),
            None,
            "shared_w13",
        )
    elif m == "weights-shape" and routed:
        weights, invalid = torch.rand(t + 1, k), "topk_weights"
    elif m == "ids-float" and routed:
        ids, invalid = ids.float(), "topk_ids"
    elif m == "k0" and routed:
        weights, ids, invalid = weights[:, :0], ids[:, :0], "top_k"
    elif m == "id-range" and routed and ids.numel():
        ids = ids.clone()
        ids[0, 0] = e
        invalid, structural = "topk_ids", False
    elif m == "router-shape" and not routed:
        router_w, invalid = router_w[:, :-1] if h > 1 else router_w[:0], "router_w"
    elif m == "top_k" and not routed:
        top_k, invalid = e + 1, "top_k"
    elif m == "router-int" and not routed:
        router_w, invalid = router_w.int(), "router_w"
    elif m in ("capacity-nan", "capacity-neg") and not routed:
        python_path, factor = "capacity", float("nan") if m == "capacity-nan" else -1.0
        invalid, structural = "capacity_factor", False
    renorm = spec["renormalize"]

    if routed:
        args = (x, weights, ids, w13, w2, s13, s2)

        def check(out):
            low = reference.moe_ffn_routed(
                x, weights.masked_fill(ids < 0, 0), ids, w13, w2, s13, s2
            )
            dbl = [None if w is None else w.double() for w in (s13, s2)]
            oracle = reference.moe_ffn_routed(
                x.double(), weights.masked_fill(ids < 0, 0), ids, w13.double(), w2.double(), *dbl
            )
            _close(out, low, oracle, dtype)

        return Case(
            op,
            _ops.moe_ffn_routed.default,
            args,
            invalid,
            structural,
            check,
            _ops.moe_ffn_routed.default,
        )

    kwargs = {}
    if python_path == "capacity":
        kwargs = dict(
            capacity_factor=factor, recycle=True, generator=torch.Generator().manual_seed(1)
        )
    elif python_path == "stats":
        kwargs = dict(return_stats=True)

    def call(*args):
        out = pearlmoe.moe_ffn(*args, renormalize=renorm, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    def check(out):
        if python_path == "capacity":  # the routing is Python's own: check the experts' part
            from pearlmoe.routing import route

            logits = x.float() @ router_w.float().t()
            w, i_, _ = route(
                logits,
                top_k,
                renorm,
                capacity_factor=factor,
                recycle=True,
                generator=torch.Generator().manual_seed(1),
            )
        else:  # the op's routing (fp32 router logits, topk_softmax, itself fuzzed above)
            w, i_ = _ops.topk_softmax(x.float() @ router_w.float().t(), top_k, renorm)
        low = reference.moe_ffn_routed(x, w, i_, w13, w2, s13, s2)
        dbl = [None if t_ is None else t_.double() for t_ in (s13, s2)]
        oracle = reference.moe_ffn_routed(x.double(), w, i_, w13.double(), w2.double(), *dbl)
        _close(out, low, oracle, dtype)

    args = (x, router_w, w13, w2, top_k, s13, s2)
    fake = _ops.moe_ffn.default if python_path == "none" else None
    return Case(
        op,
        call,
        args,
        invalid,
        structural,
        check,
        None if fake is None else lambda *a: fake(*a, renorm),
    )


# ---- attention -----------------------------------------------------------------------------------

ATTN_MUTATIONS = [
    "q-rank",
    "k-rank",
    "lens-int64",
    "lens-rank",
    "lens-len",
    "gqa",
    "kv-shape",
    "v-dtype",
    "head-dim",
    "q-int",
    "len>capacity",
    "len<Sq",
    "len<0",
]
ATTN = _spec(
    "attention",
    ATTN_MUTATIONS,
    batch=st.integers(0, 3),
    q_len=st.sampled_from([0, 1, 2, 3, 5, 17, 65]),
    kv_heads=st.integers(1, 3),
    group=st.sampled_from([1, 2, 5]),
    head_dim=st.sampled_from([1, 3, 8, 64]),
    extra=st.integers(0, 70),
    dtype=FLOATS,
    scale=st.one_of(st.none(), st.floats(0.01, 2.0)),
    layout=st.sampled_from(VIEWS),
    lens_layout=st.sampled_from(VIEWS),
    nan_query=st.booleans(),
)


def build_attention(spec):
    b, sq, hkv, d, m = (
        spec["batch"],
        spec["q_len"],
        spec["kv_heads"],
        spec["head_dim"],
        spec["mutation"],
    )
    hq, cap, dtype = hkv * spec["group"], spec["q_len"] + spec["extra"], DTYPES[spec["dtype"]]
    g = _gen(spec)
    lens = torch.randint(sq, cap + 1, (b,), generator=g, dtype=torch.int32)
    q = torch.randn(b, sq, hq, d, generator=g)
    if spec["nan_query"] and q.numel():  # that query's output row is NaN, nothing else
        q[-1, -1, -1, 0] = float("nan")
    q = view(q.to(dtype), spec["layout"])
    k = torch.randn(b, cap, hkv, d, generator=g).to(dtype)
    v = torch.randn(b, cap, hkv, d, generator=g).to(dtype)
    lens = view(lens, spec["lens_layout"])
    for i, n in enumerate(lens.tolist()):  # past each length: garbage, never read
        k[i, n:] = float("nan")
        v[i, n:] = float("nan")
    kv_layout = spec["layout"] if spec["layout"] != "expanded" else "transposed"  # no shared NaNs
    k, v = view(k, kv_layout), view(v, kv_layout)
    invalid, structural = None, True
    if m == "q-rank":
        q, invalid = q.flatten(0, 1), "q"
    elif m == "k-rank":
        k, invalid = k.flatten(0, 1), "k"
    elif m == "lens-int64":
        lens, invalid = lens.long(), "kv_lens"
    elif m == "lens-rank":
        lens, invalid = lens.unsqueeze(0), "kv_lens"
    elif m == "lens-len":
        lens, invalid = (
            torch.cat([lens, lens[:1]]) if b else torch.tensor([sq], dtype=torch.int32),
            "kv_lens",
        )
    elif m == "gqa" and hq > 1:
        k, v, invalid = (
            torch.randn(b, cap, hq + 1, d).to(dtype),
            torch.randn(b, cap, hq + 1, d).to(dtype),
            "KV heads",
        )
    elif m == "kv-shape":
        v, invalid = torch.randn(b, cap + 1, hkv, d).to(dtype), "k and v"
    elif m == "v-dtype":
        v, invalid = v.double() if dtype != torch.float64 else v.float(), "q, k and v"
    elif m == "head-dim":
        k, v, invalid = (
            torch.randn(b, cap, hkv, d + 1).to(dtype),
            torch.randn(b, cap, hkv, d + 1).to(dtype),
            "k must be",
        )
    elif m == "q-int":
        q, invalid = q.nan_to_num().int(), "q"
    elif m in ("len>capacity", "len<Sq", "len<0") and b and (m != "len<Sq" or sq > 0):
        lens = lens.clone().contiguous()
        lens[b - 1] = cap + 1 if m == "len>capacity" else (sq - 1 if m == "len<Sq" else -1)
        invalid, structural = "kv_lens", False

    def check(out):
        low = reference.attention(q, k, v, lens, spec["scale"])
        oracle = reference.attention(q.double(), k.double(), v.double(), lens, spec["scale"])
        _close(out, low, oracle, dtype)

    args = (q, k, v, lens, spec["scale"])
    return Case(
        "attention",
        _ops.attention.default,
        args,
        invalid,
        structural,
        check,
        _ops.attention.default,
    )


# ---- rope_qk_norm --------------------------------------------------------------------------------

ROPE_MUTATIONS = [
    "q-rank",
    "odd-dim",
    "dim130",
    "positions-len",
    "positions-float",
    "weight-len",
    "weight-without-norm",
    "base0",
    "base-nan",
    "k-dtype",
]
ROPE = _spec(
    "rope_qk_norm",
    ROPE_MUTATIONS,
    tokens=SIZES,
    q_heads=st.integers(1, 5),
    kv_heads=st.integers(1, 2),
    head_dim=st.sampled_from([2, 4, 8, 64, 80, 128]),
    base=st.sampled_from([2.5, 1e4, 1e6, 1.343e9]),
    weights=st.sampled_from(["none", "q", "k", "both"]),
    normalize=st.booleans(),
    int32=st.booleans(),
    dtype=FLOATS,
    layout=st.sampled_from(VIEWS),
)


def build_rope(spec):
    t, d, m, dtype = spec["tokens"], spec["head_dim"], spec["mutation"], DTYPES[spec["dtype"]]
    g = _gen(spec)
    q = view(torch.randn(t, spec["q_heads"], d, generator=g).to(dtype), spec["layout"])
    k = view(torch.randn(t, spec["kv_heads"], d, generator=g).to(dtype), spec["layout"])
    pos = torch.randint(-5, 1 << 20, (t,), generator=g).to(
        torch.int32 if spec["int32"] else torch.int64
    )
    normalize, base = spec["normalize"], spec["base"]
    wq = (
        torch.rand(d, generator=g) + 0.5 if normalize and spec["weights"] in ("q", "both") else None
    )
    wk = (
        torch.rand(d, generator=g) + 0.5 if normalize and spec["weights"] in ("k", "both") else None
    )
    invalid, structural = None, True
    if m == "q-rank":
        q, invalid = q.flatten(0, 1), "q"
    elif m == "odd-dim":
        q, k, invalid = q[..., :-1], k[..., :-1], "head_dim"
    elif m == "dim130":
        q, k, invalid = (
            torch.randn(t, 1, 130).to(dtype),
            torch.randn(t, 1, 130).to(dtype),
            "head_dim",
        )
    elif m == "positions-len":
        pos, invalid = (
            torch.cat([pos, pos[:1]]) if t else torch.zeros(1, dtype=torch.long),
            "positions",
        )
    elif m == "positions-float":
        pos, invalid = pos.float(), "positions"
    elif m == "weight-len":
        wq, normalize, invalid = torch.rand(d + 1), True, "q_weight"
    elif m == "weight-without-norm":
        wq, wk, normalize, invalid = None, torch.rand(d), False, "k_weight"
    elif m in ("base0", "base-nan"):
        base, invalid = 0.0 if m == "base0" else float("nan"), "rope_base"
    elif m == "k-dtype":
        k, invalid = k.double() if dtype != torch.float64 else k.float(), "q and k"

    def check(out):
        args = (pos, base, wq, wk, 1e-5, normalize)
        low = reference.rope_qk_norm(q, k, *args)
        oracle = reference.rope_qk_norm(q.double(), k.double(), *args)
        for got, lo, want in zip(out, low, oracle, strict=True):
            if dtype == torch.float64:
                torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
            else:
                assert_close_to_oracle(got, lo, want, floor=max(_floor(dtype, want), 1e-5))

    args = (q, k, pos, base, wq, wk, 1e-5, normalize)
    return Case(
        "rope_qk_norm",
        _ops.rope_qk_norm.default,
        args,
        invalid,
        structural,
        check,
        _ops.rope_qk_norm.default,
    )


# ---- spec_verify ---------------------------------------------------------------------------------

VERIFY_MUTATIONS = [
    "target-rank",
    "drafts-rank",
    "target-double",
    "rows",
    "draft-shape",
    "uniforms-shape",
    "uniforms-missing",
    "uniforms-greedy",
    "nan",
    "negative",
    "inf",
    "zero-row",
    "draft-zero-row",
    "id-range",
    "u=1",
    "u-nan",
]
VERIFY = _spec(
    "spec_verify",
    VERIFY_MUTATIONS,
    batch=st.sampled_from([0, 1, 2, 5]),
    drafts=st.integers(0, 3),
    vocab=st.sampled_from([1, 2, 7, 33]),
    sampling=st.booleans(),
    wrapper=st.booleans(),
    zeros=st.floats(0, 0.9),
    layout=st.sampled_from(VIEWS),
)


def build_verify(spec):
    b, n, vocab, m = spec["batch"], spec["drafts"], spec["vocab"], spec["mutation"]
    sampling = spec["sampling"]
    g = _gen(spec)

    def probs(*shape):
        p = torch.rand(*shape, generator=g)
        p = torch.where(torch.rand(*shape, generator=g) < spec["zeros"], 0.0, p)
        p[..., int(torch.randint(0, vocab, (1,), generator=g))] += 0.1  # every row has mass
        return p / p.sum(-1, keepdim=True)

    target = view(probs(b, n + 1, vocab), spec["layout"])
    draft = view(probs(b, n, vocab), spec["layout"]) if sampling else None
    ids = torch.randint(0, vocab, (b, n), generator=g)
    uniforms = torch.rand(b, n + 1, generator=g) if sampling else None
    invalid, structural = None, True

    if m == "target-rank":
        target, invalid = target.reshape(-1), "target_probs"
    elif m == "drafts-rank":
        ids, invalid = ids.reshape(-1), "draft_ids"
    elif m == "target-double":
        target, invalid = target.double(), "target_probs"
    elif m == "rows":
        target, invalid = torch.cat([target, target[:, :1]], 1), "target_probs"
    elif m == "draft-shape" and sampling:
        draft, invalid = torch.rand(b, n, vocab + 1), "draft_probs"
    elif m == "uniforms-shape" and sampling and not spec["wrapper"]:
        uniforms, invalid = torch.rand(b, n + 2), "uniforms"
    elif m == "uniforms-missing" and sampling and not spec["wrapper"]:
        uniforms, invalid = None, "uniforms"
    elif m == "uniforms-greedy" and not sampling and not spec["wrapper"]:
        uniforms, invalid = torch.rand(b, n + 1), "uniforms"
    elif m in ("nan", "negative", "inf") and b:
        target = _poke(target, {"nan": float("nan"), "negative": -0.5, "inf": float("inf")}[m], g)
        invalid, structural = "target_probs", False
    elif m == "zero-row" and b:
        target = target.clone()
        target[b - 1, n] = 0
        invalid, structural = "target_probs", False
    elif m == "draft-zero-row" and b and n and sampling:
        draft = draft.clone()
        draft[0, n - 1] = 0
        invalid, structural = "draft_probs", False
    elif m == "id-range" and b and n:
        ids = _poke(ids, vocab, g)
        invalid, structural = "draft_ids", False
    elif m in ("u=1", "u-nan") and b and sampling and not spec["wrapper"]:
        uniforms = _poke(uniforms, 1.0 if m == "u=1" else float("nan"), g)
        invalid, structural = "uniforms", False

    if spec["wrapper"]:  # pearlmoe.spec_verify draws the uniforms from a generator
        if sampling and draft is not None and target.dim() == 3:
            uniforms = torch.rand(
                target.shape[0], target.shape[1], generator=torch.Generator().manual_seed(7)
            )

        def call(t, i, d, _u):
            return pearlmoe.spec_verify(t, i, d, torch.Generator().manual_seed(7))
    else:
        call = _ops.spec_verify.default

    def check(out):
        want = reference.spec_verify(target, ids, draft, uniforms)
        assert torch.equal(out[0], want[0]) and torch.equal(out[1], want[1]), "tokens differ"

    args = (target, ids, draft, uniforms)
    fake = _ops.spec_verify.default if not spec["wrapper"] else None
    return Case("spec_verify", call, args, invalid, structural, check, fake)


# ---- linear, rms_norm, kv_cache_write (the decode step's ops) --------------------------------

LINEAR_MUTATIONS = ["weight-rank", "k-mismatch", "weight-dtype", "int", "x-0d"]
LINEAR = _spec(
    "linear",
    LINEAR_MUTATIONS,
    rows=st.sampled_from([0, 1, 3, 4, 5, 16, 17, 31]),
    n=st.sampled_from([1, 3, 4, 17, 64]),
    k=st.sampled_from([0, 1, 7, 16, 33, 100]),
    lead=st.booleans(),
    dtype=FLOATS,
    layout=st.sampled_from(VIEWS),
    special=st.sampled_from(["none", "nan", "inf", "huge"]),
)


def _projection_input(spec, dtype, g) -> torch.Tensor:
    """linear's and qlinear's x [rows, k] (or [1, rows, k]): special values, layout, dtype."""
    x = torch.randn(spec["rows"], spec["k"], generator=g)
    if spec["special"] != "none" and x.numel():
        x = _poke(x, {"nan": float("nan"), "inf": float("inf"), "huge": 1e30}[spec["special"]], g)
    x = view(x.to(dtype), spec["layout"])
    return x.unsqueeze(0) if spec["lead"] else x


def build_linear(spec):
    m, dtype, g = spec["mutation"], DTYPES[spec["dtype"]], _gen(spec)
    x = _projection_input(spec, dtype, g)
    w = view(torch.randn(spec["n"], spec["k"], generator=g).to(dtype), spec["layout"])
    invalid = None
    if m == "weight-rank":
        w, invalid = w.reshape(-1), "weight"
    elif m == "k-mismatch":
        w, invalid = torch.randn(spec["n"], spec["k"] + 1).to(dtype), "weight"
    elif m == "weight-dtype":
        w, invalid = w.double() if dtype != torch.float64 else w.float(), "weight"
    elif m == "int":
        x, w, invalid = x.long(), w.long(), "x"
    elif m == "x-0d":
        x, invalid = torch.tensor(1.0, dtype=dtype), "x"

    def check(out):
        low = reference.linear(x.float(), w.float()).to(dtype) if dtype != torch.float64 else None
        oracle = reference.linear(x.double(), w.double())
        _close(out, low if low is not None else oracle.to(dtype), oracle, dtype)

    fake = _ops.linear.default
    return Case("linear", _ops.linear.default, (x, w), invalid, True, check, fake)


QLINEAR_MUTATIONS = ["format", "qweight-dtype", "qweight-rank", "k-odd", "row-bytes", "int",
                     "double", "x-0d"]  # fmt: skip
QLINEAR = _spec(
    "qlinear",
    QLINEAR_MUTATIONS,
    rows=st.sampled_from([0, 1, 3, 4, 5, 16, 17, 257]),
    n=st.sampled_from([0, 1, 3, 4, 17, 64]),
    k=st.sampled_from([32, 64, 96, 160]),
    format=st.sampled_from(["q4_0", "q4_1", "q8_0"]),
    lead=st.booleans(),
    dtype=st.sampled_from(["float32", "bfloat16", "float16"]),
    layout=st.sampled_from(VIEWS),
    special=st.sampled_from(["none", "nan", "inf", "huge"]),
)


def build_qlinear(spec):
    from quant_blocks import random_blocks

    m, dtype, g, fmt = spec["mutation"], DTYPES[spec["dtype"]], _gen(spec), spec["format"]
    x = _projection_input(spec, dtype, g)
    q = random_blocks(spec["n"], spec["k"], fmt, g)
    invalid = None
    if m == "format":
        fmt, invalid = fmt.upper(), "format"
    elif m == "qweight-dtype":
        q, invalid = q.view(torch.int8), "qweight"
    elif m == "qweight-rank":
        q, invalid = q.reshape(-1), "qweight"
    elif m == "k-odd":
        x, invalid = x[..., :-1], "K"
    elif m == "row-bytes":
        q, invalid = q[:, :-2], "qweight"
    elif m == "int":
        x, invalid = x.long(), "x"
    elif m == "double":
        x, invalid = x.double(), "x"
    elif m == "x-0d":
        x, invalid = torch.tensor(1.0, dtype=dtype), "x"

    def check(out):
        oracle = x.double() @ reference.dequantize(q, fmt).double().t()
        _close(out, reference.qlinear(x, q, fmt), oracle, dtype)

    return Case("qlinear", _ops.qlinear.default, (x, q, fmt), invalid, True, check,
                _ops.qlinear.default)  # fmt: skip


NORM_MUTATIONS = ["weight-len", "weight-rank", "weight-dtype", "eps-nan", "eps-neg", "int"]
NORM = _spec(
    "rms_norm",
    NORM_MUTATIONS,
    rows=st.sampled_from([0, 1, 2, 7, 31]),
    hidden=st.sampled_from([1, 2, 15, 16, 17, 257]),
    lead=st.booleans(),
    dtype=FLOATS,
    layout=st.sampled_from(VIEWS),
    special=st.sampled_from(["none", "nan", "inf", "zeros", "huge"]),
)


def build_norm(spec):
    m, dtype, g = spec["mutation"], DTYPES[spec["dtype"]], _gen(spec)
    x = torch.randn(spec["rows"], spec["hidden"], generator=g) * 3
    if spec["special"] == "zeros":
        x = torch.zeros_like(x)
    elif spec["special"] != "none" and x.numel():
        x = _poke(x, {"nan": float("nan"), "inf": float("inf"), "huge": 1e18}[spec["special"]], g)
    x = view(x.to(dtype), spec["layout"])
    if spec["lead"]:
        x = x.unsqueeze(1)
    w = (torch.rand(spec["hidden"], generator=g) + 0.5).to(dtype)
    eps, invalid, structural = 1e-5, None, True
    if m == "weight-len":
        w, invalid = torch.rand(spec["hidden"] + 1).to(dtype), "weight"
    elif m == "weight-rank":
        w, invalid = w.unsqueeze(0), "weight"
    elif m == "weight-dtype":
        w, invalid = w.double() if dtype != torch.float64 else w.float(), "weight"
    elif m in ("eps-nan", "eps-neg"):
        eps, invalid, structural = float("nan") if m == "eps-nan" else -1.0, "eps", False
    elif m == "int":
        x, w, invalid = x.long(), w.long(), "x"

    def check(out):
        low = reference.hf_rms_norm(x, w, eps)
        oracle = reference.hf_rms_norm(x.double(), w.double(), eps)
        _close(out, low, oracle, dtype)

    return Case("rms_norm", _ops.rms_norm.default, (x, w, eps), invalid, structural, check,
                _ops.rms_norm.default)  # fmt: skip


WRITE_MUTATIONS = ["pos-range", "pos-negative", "pos-int32", "pos-shape", "group", "k-heads",
                   "k-dtype", "v-shape", "cache-rank"]  # fmt: skip
WRITE = _spec(
    "kv_cache_write",
    WRITE_MUTATIONS,
    groups=st.integers(1, 3),
    batch=st.sampled_from([0, 1, 3]),
    steps=st.sampled_from([0, 1, 2, 5]),
    heads=st.sampled_from([1, 2, 3]),
    dim=st.sampled_from([1, 8, 64, 80]),
    capacity=st.sampled_from([5, 8, 17]),
    dtype=FLOATS,
    layout=st.sampled_from(VIEWS),
)


def build_write(spec):
    m, dtype, g = spec["mutation"], DTYPES[spec["dtype"]], _gen(spec)
    groups, b, s, h, d, cap = (spec[k] for k in ("groups", "batch", "steps", "heads", "dim",
                                                  "capacity"))  # fmt: skip
    k_cache = torch.randn(groups, b, cap, h, d, generator=g).to(dtype)
    v_cache = torch.randn(groups, b, cap, h, d, generator=g).to(dtype)
    k = view(torch.randn(b, s, h, d, generator=g).to(dtype), spec["layout"])
    v = view(torch.randn(b, s, h, d, generator=g).to(dtype), spec["layout"])
    positions = torch.stack([torch.randperm(cap, generator=g)[:s] for _ in range(b)]) \
        if b else torch.zeros(0, s, dtype=torch.long)  # fmt: skip
    group = int(torch.randint(0, groups, (1,), generator=g))
    invalid, structural = None, True
    if m == "pos-range" and b and s:
        positions, invalid, structural = _poke(positions, cap, g), "positions", False
    elif m == "pos-negative" and b and s:
        positions, invalid, structural = _poke(positions, -1, g), "positions", False
    elif m == "pos-int32":
        positions, invalid = positions.int(), "positions"
    elif m == "pos-shape":
        positions, invalid = positions.reshape(-1), "positions"
    elif m == "group":
        group, invalid = groups, "group"
    elif m == "k-heads":
        k = v = torch.randn(b, s, h + 1, d).to(dtype)
        invalid = "k"
    elif m == "k-dtype":
        k = k.double() if dtype != torch.float64 else k.float()
        invalid = "k"
    elif m == "v-shape":
        v, invalid = torch.randn(b, s + 1, h, d).to(dtype), "v"
    elif m == "cache-rank":
        k_cache, v_cache, invalid = k_cache[0], v_cache[0], "k_cache"
    want_k, want_v = k_cache.clone(), v_cache.clone()
    if invalid is None:
        reference.kv_cache_write(want_k, want_v, k, v, positions, group)

    def call(kc, vc, kk, vv, pos, grp):
        _ops.kv_cache_write.default(kc, vc, kk, vv, pos, grp)
        return kc, vc

    def check(out):
        assert torch.equal(out[0], want_k) and torch.equal(out[1], want_v), "caches differ"

    def fake(kc, vc, kk, vv, pos, grp):
        _ops.kv_cache_write.default(kc, vc, kk, vv, pos, grp)
        return kc, vc

    return Case("kv_cache_write", call, (k_cache, v_cache, k, v, positions, group), invalid,
                structural, check, fake)  # fmt: skip


# ---- KVCache (the Python cache object) ----------------------------------------------------------

CACHE_MUTATIONS = ["advance-negative", "advance-too-many", "write-too-many", "num-new-float",
                   "truncate-longer", "write-shape", "past-capacity"]  # fmt: skip
CACHE = _spec(
    "KVCache",
    CACHE_MUTATIONS,
    batch=st.integers(1, 3),
    capacity=st.sampled_from([1, 4, 9]),
    steps=st.sampled_from([1, 2, 3]),
    ragged=st.booleans(),
)


def build_cache(spec):
    """A write / advance / truncate sequence on a KVCache: valid ones keep the lengths the host
    copy and the device agree on and the rows where the reference puts them; bad ones raise an
    error naming KVCache (and leave the lengths alone)."""
    from pearlmoe.model import KVCache

    m, g = spec["mutation"], _gen(spec)
    b, cap, s = spec["batch"], spec["capacity"], min(spec["steps"], spec["capacity"])
    cache = KVCache(num_layers=2, batch_size=b, capacity=cap, kv_heads=1, head_dim=4,
                    dtype=torch.float32)  # fmt: skip
    counts = [int(c) for c in torch.randint(0, s + 1, (b,), generator=g)] if spec["ragged"] \
        else [s] * b  # fmt: skip
    k = torch.randn(b, s, 1, 4, generator=g)
    invalid = None

    def call():
        cache.write(0, k, k, num_new=counts)
        cache.advance(counts)
        if m == "advance-negative":
            cache.advance(-1)
        elif m == "advance-too-many":
            cache.advance(cap + 1)
        elif m == "write-too-many":
            cache.write(0, k, k, num_new=s + 1)
        elif m == "num-new-float":
            cache.advance(0.5)
        elif m == "truncate-longer":
            cache.truncate([n + 1 for n in counts])
        elif m == "write-shape":
            cache.write(0, k[:, :, :, :3], k[:, :, :, :3])
        elif m == "past-capacity":  # one past the capacity for every sequence
            cache.advance([cap - n + 1 for n in counts])
        return cache

    if m is not None:
        invalid = "KVCache"

    def check(out):
        assert out.seq_lens() == counts and out.lens.tolist() == counts, "lengths"
        for i, n in enumerate(counts):
            assert torch.equal(out.k[0, i, :n], k[i, s - n :]), "rows"

    return Case("KVCache", call, (), invalid, False, check)


BUILDERS = {
    "grouped_topk": build_grouped,
    "topk_softmax": build_topk,
    "moe_align": build_align,
    "grouped_gemm": build_gemm,
    "moe": build_moe,
    "attention": build_attention,
    "rope_qk_norm": build_rope,
    "spec_verify": build_verify,
    "linear": build_linear,
    "qlinear": build_qlinear,
    "rms_norm": build_norm,
    "kv_cache_write": build_write,
    "KVCache": build_cache,
}
STRATEGIES = {
    "topk_softmax": TOPK,
    "grouped_topk": GROUPED,
    "moe_align": ALIGN,
    "grouped_gemm": GEMM,
    "moe": MOE,
    "attention": ATTN,
    "rope_qk_norm": ROPE,
    "spec_verify": VERIFY,
    "linear": LINEAR,
    "qlinear": QLINEAR,
    "rms_norm": NORM,
    "kv_cache_write": WRITE,
    "KVCache": CACHE,
}
