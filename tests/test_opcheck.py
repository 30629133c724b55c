"""torch.library.opcheck over every op with representative sample inputs (schema, fake tensor,
autograd registration and AOT-dispatch checks)."""

import pytest
import torch

import pearlmoe  # noqa: F401
from conftest import DEVICES
from quant_blocks import random_blocks

_ops = torch.ops.pearlmoe


def _samples(device: str) -> dict:
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    logits = torch.randn(7, 16, device=device)
    x = torch.randn(9, 16, device=device, dtype=dtype)
    router_w = torch.randn(4, 16, device=device)
    w13 = torch.randn(4, 16, 16, device=device, dtype=dtype)
    w2 = torch.randn(4, 16, 8, device=device, dtype=dtype)
    s13, s2 = w13[0].clone(), w2[0].clone()
    offs = torch.tensor([0, 3, 3, 8, 8], dtype=torch.int32, device=device)
    ids = torch.randint(-1, 4, (9, 2), device=device)
    weights = torch.rand(9, 2, device=device)

    q = torch.randn(2, 3, 4, 64, device=device, dtype=dtype)
    kv = torch.randn(2, 9, 2, 64, device=device, dtype=dtype)
    kv_lens = torch.tensor([3, 8], dtype=torch.int32, device=device)
    positions = torch.arange(3, device=device) + 5
    probs = torch.softmax(torch.randn(2, 3, 11, device=device), -1)
    draft_ids = torch.randint(0, 11, (2, 2), device=device)
    uniforms = torch.rand(2, 3, device=device)

    cache = torch.zeros(2, 2, 9, 2, 64, device=device, dtype=dtype)
    new_kv = torch.randn(2, 3, 2, 64, device=device, dtype=dtype)
    slots = torch.tensor([[0, 1, 2], [5, 6, 7]], device=device)
    norm_w = torch.rand(16, device=device, dtype=dtype)
    x64 = torch.randn(9, 64, device=device, dtype=dtype)
    q4 = random_blocks(5, 64, "q4_1", torch.Generator().manual_seed(0))  # [5, 40] uint8
    q8 = random_blocks(7, 64, "q8_0", torch.Generator().manual_seed(1))  # [7, 68] uint8

    def grad(t):
        return t.clone().requires_grad_()

    return {
        "topk_softmax-top1": (_ops.topk_softmax, (logits, 1, False)),
        "topk_softmax-top2-renorm": (_ops.topk_softmax, (logits, 2, True)),
        "topk_softmax-grad": (_ops.topk_softmax, (grad(logits), 2, False)),
        "topk_softmax-empty": (_ops.topk_softmax, (logits[:0], 2, False)),
        "grouped_topk": (_ops.grouped_topk, (logits, None, 2, 1, 1, True, 1.0)),
        "grouped_topk-groups": (
            _ops.grouped_topk,
            (logits, torch.randn(logits.shape[1], device=device), 3, 4, 2, True, 2.5),
        ),
        "grouped_topk-empty": (_ops.grouped_topk, (logits[:0], None, 2, 2, 1, False, 1.0)),
        "moe_align": (_ops.moe_align, (torch.randint(-1, 16, (7, 2), device=device), 16)),
        "moe_align-int32": (_ops.moe_align, (ids.int(), 4)),
        "grouped_gemm": (_ops.grouped_gemm, (x, w13, offs)),
        "grouped_gemm-grad": (_ops.grouped_gemm, (grad(x), grad(w13), offs)),
        "grouped_gemm_wgrad": (_ops.grouped_gemm_wgrad, (x[:, :8].contiguous(), x, offs)),
        "moe_ffn_routed": (_ops.moe_ffn_routed, (x, weights, ids, w13, w2, s13, s2)),
        "moe_ffn_routed-grad": (
            _ops.moe_ffn_routed,
            (grad(x), grad(weights), ids, w13, w2, None, None),
        ),
        "moe_ffn": (_ops.moe_ffn, (x, router_w, w13, w2, 1, s13, s2, False)),
        "moe_ffn-grad": (_ops.moe_ffn, (grad(x), grad(router_w), w13, w2, 2, None, None, True)),
        "attention": (_ops.attention, (q, kv, kv.clone(), kv_lens, None)),
        "attention-scale": (_ops.attention, (q[:, :1], kv, kv.clone(), kv_lens, 0.5)),
        "rope_qk_norm": (
            _ops.rope_qk_norm,
            (q[0], kv[0, :3], positions, 1e4, q[0, 0, 0], q[0, 0, 1], 1e-5, True),
        ),
        "spec_verify-greedy": (_ops.spec_verify, (probs, draft_ids, None, None)),
        "spec_verify-sampling": (
            _ops.spec_verify,
            (probs, draft_ids, probs[:, :2].contiguous(), uniforms),
        ),
        "linear": (_ops.linear, (x, w13[0])),
        "linear-3d": (_ops.linear, (x.view(3, 3, 16), w13[1])),
        "linear-grad": (_ops.linear, (grad(x), grad(w13[0]))),
        "qlinear-q4_1": (_ops.qlinear, (x64, q4.to(device), "q4_1")),
        "qlinear-3d-q8_0": (_ops.qlinear, (x64.view(3, 3, 64), q8.to(device), "q8_0")),
        "dequantize": (_ops.dequantize, (q4.to(device), "q4_1", torch.bfloat16)),
        "rms_norm": (_ops.rms_norm, (x, norm_w, 1e-5)),
        "rms_norm-grad": (_ops.rms_norm, (grad(x), grad(norm_w), 1e-6)),
        "kv_cache_write": (_ops.kv_cache_write, (cache, cache.clone(), new_kv, new_kv, slots, 1)),
        "rope-only": (
            _ops.rope_qk_norm,
            (q[0], kv[0, :3], positions, 1e4, None, None, 1e-5, False),
        ),
    }


NAMES = list(_samples("cpu"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", NAMES)
def test_opcheck(device, name):
    op, args = _samples(device)[name]
    torch.library.opcheck(op.default, args)


def _meta(args):
    return tuple(a.to("meta") if isinstance(a, torch.Tensor) else a for a in args)


# (op, arguments the real kernel rejects before reading any value, the argument named)
REJECTED = [
    ("attention", (torch.randn(2, 3, 4, 8), torch.randn(2, 5, 2, 8), torch.randn(2, 5, 2, 8), torch.tensor([5, 5]), None), "kv_lens must be Int"),
    ("attention", (torch.randn(2, 3, 4, 8), torch.randn(2, 5, 2, 8), torch.randn(2, 5, 2, 8), torch.tensor([5], dtype=torch.int32), None), "kv_lens must have B = 2"),
    ("grouped_gemm", (torch.randn(4, 8), torch.randn(2, 3, 8), torch.tensor([0, 1, 4])), "group_offsets must be Int"),
    ("grouped_gemm", (torch.randn(4, 8), torch.randn(2, 3, 8).double(), torch.tensor([0, 1, 4], dtype=torch.int32)), "b must have a's dtype"),
    ("moe_ffn", (torch.randn(3, 8), torch.randn(4, 7), torch.randn(4, 6, 8), torch.randn(4, 8, 3), 1, None, None, False), "router_w must be"),
    ("moe_ffn_routed", (torch.randn(3, 8), torch.rand(3, 2), torch.zeros(3, 2, dtype=torch.int64), torch.randn(4, 6, 8), torch.randn(4, 8, 2), None, None), "w2 must be"),
    ("topk_softmax", (torch.randn(3, 4).double(), 2, False), "router_logits must be Float"),
    ("grouped_topk", (torch.randn(3, 6), None, 2, 4, 1, True, 1.0), "num_groups=4 must divide"),
    ("grouped_topk", (torch.randn(3, 6), torch.zeros(5), 2, 1, 1, True, 1.0), "correction_bias must have"),
    ("moe_align", (torch.zeros(3, 2, dtype=torch.int64), 0), "num_experts must be in"),
    ("rope_qk_norm", (torch.randn(3, 2, 8), torch.randn(3, 1, 8), torch.arange(3), float("nan"), None, None, 1e-5, True), "rope_base must be a positive finite"),
    ("spec_verify", (torch.rand(2, 3, 4), torch.zeros(2, 2, dtype=torch.int64), torch.rand(2, 2, 4), None), r"sampling \(draft_probs given\) needs uniforms"),
    ("grouped_gemm_wgrad", (torch.randn(4, 3), torch.randn(5, 8), torch.tensor([0, 4], dtype=torch.int32)), "grad_c and a must have the same rows"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "args", "match"), REJECTED, ids=[f"{r[0]}-{i}" for i, r in enumerate(REJECTED)]
)
def test_fake_kernels_reject_what_the_kernels_reject(name, args, match):
    """Issue 13 item 10: the fake (meta) kernels accepted shapes and dtypes the kernels reject,
    and their messages did not name the op; both now raise the op's words."""
    op = getattr(torch.ops.pearlmoe, name).default
    for tensors in (args, _meta(args)):
        with pytest.raises(RuntimeError, match=rf"pearlmoe\.{name}: {match}"):
            op(*tensors)
