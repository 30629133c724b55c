"""The CPU kernels on several threads (the extension is built with OpenMP: at::parallel_for splits
their work), inside inference mode as the decode loops call them: the same results as on one
thread, bit for bit (each output element is computed by one thread in a fixed order), and as the
reference."""

import pytest
import torch

import pearlmoe
from pearlmoe import reference
from pearlmoe.decode.common import num_threads


def _cases(g: torch.Generator):
    """(name, op call, reference call): sizes big enough that every kernel splits its work."""
    q = torch.randn(2, 96, 8, 64, generator=g)  # a prefill: the blocked path, ATen inside tasks
    k = torch.randn(2, 160, 2, 64, generator=g)
    v = torch.randn(2, 160, 2, 64, generator=g)
    lens = torch.tensor([150, 96], dtype=torch.int32)
    x = torch.randn(3, 512, generator=g).bfloat16()
    w = torch.randn(4096, 512, generator=g).bfloat16()  # the skinny GEMM over N
    rows = torch.randn(3000, 256, generator=g)
    nw = torch.rand(256, generator=g) + 0.5
    logits = torch.randn(5000, 16, generator=g)
    t = torch.randn(300, 64, generator=g)
    router = torch.randn(8, 64, generator=g)
    w13 = torch.randn(8, 96, 64, generator=g) * 0.1
    w2 = torch.randn(8, 64, 48, generator=g) * 0.1
    return [
        ("attention prefill", lambda: pearlmoe.attention(q, k, v, lens),
         lambda: reference.attention(q, k, v, lens)),
        ("linear", lambda: pearlmoe.linear(x, w), lambda: reference.linear(x, w)),
        ("rms_norm", lambda: pearlmoe.ops.rms_norm(rows, nw), lambda: reference.rms_norm(rows, nw)),
        ("topk_softmax", lambda: pearlmoe.topk_softmax(logits, 2),
         lambda: reference.topk_softmax(logits, 2)),
        ("moe_ffn", lambda: pearlmoe.moe_ffn(t, router, w13, w2, 2),
         lambda: reference.moe_ffn(t, router, w13, w2, 2)),
    ]  # fmt: skip


@pytest.mark.parametrize("case", range(5))
def test_kernels_on_two_threads_in_inference_mode(case):
    name, op, ref = _cases(torch.Generator().manual_seed(case))[case]
    with torch.inference_mode():
        with num_threads(1):
            one = op()
        with num_threads(2):
            two = op()
        want = ref()
    one, two, want = (o if isinstance(o, tuple) else (o,) for o in (one, two, want))
    for a, b, w in zip(one, two, want, strict=True):
        assert torch.equal(a, b), f"{name}: 2 threads differ from 1"
        if a.is_floating_point():
            tol = 2e-2 if a.dtype == torch.bfloat16 else 1e-4
            torch.testing.assert_close(a.float(), w.float(), rtol=tol, atol=tol)
        else:
            assert torch.equal(a, w), name


def test_kernels_on_two_threads_with_grad_enabled():
    # The op below autograd on every worker too: before the workers were put there explicitly,
    # ~7% of these calls failed ("a leaf Variable that requires grad is being used in an
    # in-place operation") from the prefill attention's ATen calls on a worker thread.
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(2, 64, 2, 16, generator=g), torch.randn(2, 64, 2, 16, generator=g)
    lens = torch.tensor([33, 40], dtype=torch.int32)
    with num_threads(2):
        for _ in range(300):
            q = torch.randn(2, 33, 4, 16, generator=g, requires_grad=True)
            out = pearlmoe.attention(q * 1.0, k, v, lens)
    torch.testing.assert_close(out, reference.attention(q * 1.0, k, v, lens))
