"""qlinear and dequantize, the ops that multiply GGUF Q4_0/Q4_1/Q8_0 blocks as stored: the
expansion bit for bit against the gguf package's, the products against an fp64 oracle on awkward
sizes in every x dtype and CPU code path, rows independent of the call's other rows (what keeps
speculative output equal to autoregressive output on a quantised target), and bad inputs."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import DEVICES, assert_close_to_oracle, requires_cuda
from pearlmoe import ops, reference
from quant_blocks import FORMATS, random_blocks

X_DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# Rows around the 4-row blocks and the CPU skinny limit (256: beyond it the weight is expanded and
# multiplied on BLAS), N around the 4-column blocks, K = 32 (one block) and up.
SHAPES = [(1, 1, 32), (1, 33, 64), (3, 5, 96), (4, 17, 32), (5, 4, 160), (7, 129, 64),
          (16, 64, 576), (17, 9, 64), (0, 8, 32), (2, 0, 32), (257, 40, 64)]  # fmt: skip


def _floor(dtype: torch.dtype, oracle: torch.Tensor) -> float:
    if oracle.numel() == 0:
        return 0.0
    return 8 * torch.finfo(dtype).eps * max(oracle.abs().max().item(), 1.0)


@pytest.mark.parametrize("format", FORMATS)
def test_dequantize_is_ggufs_expansion(format):
    gguf = pytest.importorskip("gguf", reason="the gguf package is a test dependency")
    g = torch.Generator().manual_seed(len(format))
    q = random_blocks(37, 96, format, g)
    want = gguf.quants.dequantize(q.numpy(), gguf.GGMLQuantizationType[format.upper()])
    want = torch.from_numpy(np.asarray(want, dtype=np.float32))
    assert torch.equal(reference.dequantize(q, format), want)
    assert torch.equal(ops.dequantize(q, format), want)
    for dtype in (torch.bfloat16, torch.float16):
        assert torch.equal(ops.dequantize(q, format, dtype), want.to(dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("format", FORMATS)
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_qlinear_matches_reference(device, format, m, n, k):
    g = torch.Generator().manual_seed(m * 1000 + n * 10 + k)
    q = random_blocks(n, k, format, g)
    for dtype in X_DTYPES:
        x = torch.randn(m, k, generator=g).to(dtype)
        out = ops.qlinear(x.to(device), q.to(device), format)
        assert out.shape == (m, n) and out.dtype == dtype
        oracle = x.double() @ reference.dequantize(q, format).double().t()
        same = reference.qlinear(x, q, format)
        assert_close_to_oracle(out, same, oracle, floor=_floor(dtype, oracle))


def test_qlinear_leading_dims_strides_and_a_strided_weight():
    g = torch.Generator().manual_seed(2)
    q = random_blocks(24, 64, "q4_1", g)
    x = torch.randn(2, 3, 64, generator=g)
    torch.testing.assert_close(ops.qlinear(x, q, "q4_1"), reference.qlinear(x, q, "q4_1"))
    xt = torch.randn(64, 5, generator=g).t()  # non-unit last stride
    torch.testing.assert_close(ops.qlinear(xt, q, "q4_1"), reference.qlinear(xt, q, "q4_1"))
    wide = torch.cat([q, q], dim=1)[:, : q.shape[1]]  # row stride twice the row
    assert torch.equal(ops.qlinear(x, wide, "q4_1"), ops.qlinear(x, q, "q4_1"))


@pytest.mark.parametrize("format", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qlinear_rows_are_independent(format, dtype):
    """A row's product is bitwise the same whatever other rows share the call, up to 256 rows."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(256, 192, generator=g).to(dtype)
    q = random_blocks(70, 192, format, g)
    alone = torch.cat([ops.qlinear(x[i : i + 1], q, format) for i in range(256)])
    for rows in (2, 3, 5, 16, 17, 48, 144, 256):
        assert torch.equal(ops.qlinear(x[:rows], q, format), alone[:rows]), rows


@pytest.mark.parametrize("format", FORMATS)
def test_qlinear_columns_do_not_depend_on_their_neighbours(format):
    """A column's product is bitwise the same whether the kernel takes it in a group of four
    weight rows or alone (the tail of a thread's range): so the thread count, which moves the
    ranges' ends, never changes a token (PEARL's sides run on fewer threads than AR)."""
    g = torch.Generator().manual_seed(8)
    q = random_blocks(67, 128, format, g)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(5, 128, generator=g).to(dtype)
        whole = ops.qlinear(x, q, format)
        for start in (1, 2, 3, 63, 66):
            assert torch.equal(ops.qlinear(x, q[start:], format), whole[:, start:]), start


def test_qlinear_every_cpu_code_path():
    """The portable, AVX-512 (fp32 expansion) and AVX512-BF16 (bf16 dot products) paths, each in a
    fresh process (PEARLMOE_CPU_ISA caps the detected one), against the fp64 oracle."""
    script = (
        "import torch, pearlmoe, sys\n"
        "sys.path.insert(0, 'tests')\n"
        "from pearlmoe import ops, reference\n"
        "from quant_blocks import FORMATS, random_blocks\n"
        "g = torch.Generator().manual_seed(0)\n"
        "for f in FORMATS:\n"
        "    for dt in (torch.float32, torch.bfloat16):\n"
        "        for m, n, k in [(1, 33, 64), (4, 64, 256), (7, 5, 32), (16, 9, 96)]:\n"
        "            q = random_blocks(n, k, f, g); x = torch.randn(m, k, generator=g).to(dt)\n"
        "            ref = x.double() @ reference.dequantize(q, f).double().t()\n"
        "            err = (ops.qlinear(x, q, f).double() - ref).abs().max().item()\n"
        "            tol = (1e-5 if dt == torch.float32 else 1e-2) * ref.abs().max().item()\n"
        "            assert err <= tol, (f, dt, m, n, k, err)\n"
        "print(ops.cpu_isa())\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    seen = set()
    for cap in ("generic", "avx512", "avx512bf16"):
        env = dict(os.environ, PEARLMOE_CPU_ISA=cap)
        out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                             text=True, timeout=120, cwd=root)  # fmt: skip
        assert out.returncode == 0, out.stderr[-2000:]
        seen.add(out.stdout.strip())
    assert "generic" in seen  # the portable path always runs; the others where the CPU has them


def test_qlinear_nan_and_inf_propagate():
    g = torch.Generator().manual_seed(4)
    q = random_blocks(8, 64, "q8_0", g)
    x = torch.randn(3, 64, generator=g)
    x[1, 5], x[2, 40] = float("nan"), float("inf")
    out, ref = ops.qlinear(x, q, "q8_0"), reference.qlinear(x, q, "q8_0")
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.isinf(), ref.isinf())
    assert out[0].isfinite().all()


@pytest.mark.parametrize("device", DEVICES)
def test_qlinear_bad_inputs(device):
    g = torch.Generator().manual_seed(1)
    q = random_blocks(4, 64, "q4_1", g).to(device)
    x = torch.randn(3, 64, device=device)
    cases = [
        ((x, q, "q5_0"), r"format must be 'q4_0', 'q4_1' or 'q8_0', got 'q5_0'"),
        ((x, q.view(torch.int8), "q4_1"), r"qweight must be Byte, got Char"),
        ((x, q.reshape(-1), "q4_1"), r"qweight must be 2-D"),
        (
            (x[:, :48], q, "q4_1"),
            r"x.size\(-1\) = K must be a multiple of 32 \(q4_1 blocks\), got 48",
        ),
        ((x, q, "q8_0"), r"qweight must be \[N, 68\] for K = 64 in q8_0 \(34 bytes per 32"),
        ((x.long(), q, "q4_1"), r"x must be float32, bfloat16 or float16, got Long"),
        ((x.double(), q, "q4_1"), r"x must be float32, bfloat16 or float16, got Double"),
        ((torch.tensor(1.0, device=device), q, "q4_1"), r"x must be \[..., K\]"),
    ]
    for args, message in cases:
        with pytest.raises(RuntimeError, match="pearlmoe.qlinear: " + message):
            ops.qlinear(*args)
    with pytest.raises(RuntimeError, match=r"pearlmoe.dequantize: qweight rows must be whole"):
        ops.dequantize(q[:, :30], "q4_1")
    with pytest.raises(RuntimeError, match=r"pearlmoe.dequantize: dtype must be float32"):
        ops.dequantize(q, "q4_1", torch.float64)
    with pytest.raises(RuntimeError, match=r"pearlmoe.dequantize: format must be"):
        ops.dequantize(q, "Q4_1")


@requires_cuda
def test_qlinear_device_mismatch():
    q = random_blocks(4, 64, "q4_0", torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match=r"pearlmoe.qlinear: qweight is on cpu but x is on cuda"):
        ops.qlinear(torch.randn(2, 64, device="cuda"), q, "q4_0")


@requires_cuda
@pytest.mark.parametrize("format", FORMATS)
def test_qlinear_cuda_matches_cpu_rows_and_graph_capture(format):
    """The CUDA gemv (up to 16 rows) and dequantize + cuBLAS paths agree with the CPU kernel, and
    a decode-sized call replays inside a CUDA graph."""
    g = torch.Generator().manual_seed(3)
    q = random_blocks(96, 256, format, g)
    for rows in (1, 5, 16, 17, 40):
        x = torch.randn(rows, 256, generator=g).bfloat16()
        torch.testing.assert_close(ops.qlinear(x.cuda(), q.cuda(), format).cpu().float(),
                                   ops.qlinear(x, q, format).float(), rtol=2e-2, atol=2e-2)  # fmt: skip
    x, qc = torch.randn(2, 256, generator=g).bfloat16().cuda(), q.cuda()
    ops.qlinear(x, qc, format)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.qlinear(x, qc, format)
    x.copy_(torch.randn(2, 256, generator=g).bfloat16())
    graph.replay()
    torch.testing.assert_close(out, ops.qlinear(x, qc, format), rtol=0, atol=0)
