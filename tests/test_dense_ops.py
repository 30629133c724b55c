"""The dense ops of the decode step: linear (the skinny CPU GEMM), rms_norm and kv_cache_write,
against their references on awkward sizes, every CPU code path of the skinny kernel, the
row-invariance the greedy-equality invariant relies on, and bad inputs."""

import os
import subprocess
import sys

import pytest
import torch

import pearlmoe
from conftest import DEVICES, assert_close_to_oracle
from pearlmoe import ops, reference

FLOATS = [torch.float32, torch.bfloat16]


def _dtypes(device):
    return [torch.bfloat16] if device == "cuda" else FLOATS


# ---- linear ------------------------------------------------------------------------------------

# Rows around the skinny kernel's limit (16) and its 4-row blocks, K and N around its 16/32-wide
# steps and 4-row column blocks.
LINEAR_SHAPES = [(1, 1, 1), (1, 256, 256), (3, 5, 33), (4, 17, 64), (5, 4, 31), (7, 129, 100),
                 (16, 64, 32), (17, 33, 65), (0, 8, 16), (2, 8, 0), (64, 257, 96)]  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m,n,k", LINEAR_SHAPES)
def test_linear_matches_reference(device, m, n, k):
    for dtype in _dtypes(device):
        g = torch.Generator().manual_seed(m * 1000 + n * 10 + k)
        x = torch.randn(m, k, generator=g).to(device, dtype)
        w = torch.randn(n, k, generator=g).to(device, dtype)
        out = ops.linear(x, w)
        assert out.shape == (m, n) and out.dtype == dtype
        oracle = reference.linear(x.double().cpu(), w.double().cpu())
        same = reference.linear(x.cpu().float(), w.cpu().float()).to(dtype)
        assert_close_to_oracle(out, same, oracle, floor=1e-5 if dtype == torch.float32 else 1e-2)


def test_linear_leading_dims_and_strides():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 40, generator=g)
    w = torch.randn(24, 40, generator=g)
    torch.testing.assert_close(ops.linear(x, w), reference.linear(x, w), rtol=1e-5, atol=1e-5)
    xt = torch.randn(40, 5, generator=g).t()  # non-unit last stride
    torch.testing.assert_close(ops.linear(xt, w), reference.linear(xt, w), rtol=1e-5, atol=1e-5)
    wt = torch.randn(40, 24, generator=g).t()  # transposed weight
    torch.testing.assert_close(ops.linear(x, wt), reference.linear(x, wt), rtol=1e-5, atol=1e-5)


def test_linear_autograd():
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ops.linear, (x, w))


@pytest.mark.parametrize("dtype", FLOATS)
def test_linear_rows_are_independent(dtype):
    """A row's product is bitwise the same whatever other rows share the call (up to the skinny
    limit, 256 rows): what keeps a verification window's logits equal to a decode step's, and a
    server's batch of windows (16 sequences x 9 tokens) equal to each sequence alone."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(256, 200, generator=g).to(dtype)
    w = torch.randn(300, 200, generator=g).to(dtype)
    alone = torch.cat([ops.linear(x[i : i + 1], w) for i in range(256)])
    for rows in (2, 3, 5, 8, 16, 17, 48, 144, 256):
        assert torch.equal(ops.linear(x[:rows], w), alone[:rows]), rows


@pytest.mark.parametrize("dtype", FLOATS)
def test_linear_same_on_any_thread_count(dtype):
    """Columns split across threads in 4-column blocks, so a product is bitwise the same on one
    thread as on two, including the tail columns of a width that is not a multiple of 4."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(9, 256, generator=g).to(dtype)
    w = torch.randn(301, 256, generator=g).to(dtype)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.linear(x, w)
        torch.set_num_threads(2)
        two = ops.linear(x, w)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


@pytest.mark.parametrize("dtype", FLOATS)
def test_linear_columns_do_not_depend_on_the_width(dtype):
    """A column's value is bitwise the same whatever the call's width, in a 4-column block or in
    the tail: the CPU attention scores each query row of a window over its own number of keys,
    in one call for all of them, and must give what a decode step gives."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(6, 64, generator=g).to(dtype)
    w = torch.randn(23, 64, generator=g).to(dtype)
    full = ops.linear(x, w)
    for n in range(1, 23):
        assert torch.equal(ops.linear(x, w[:n]), full[:, :n]), n


def test_linear_every_cpu_code_path():
    """The skinny kernel's generic and AVX-512 paths (PEARLMOE_CPU_ISA caps the detected one),
    each in a fresh process, against the reference."""
    script = (
        "import torch, pearlmoe\n"
        "from pearlmoe import ops, reference\n"
        "g = torch.Generator().manual_seed(0)\n"
        "for dt in (torch.float32, torch.bfloat16):\n"
        "    for m, n, k in [(1, 33, 70), (4, 64, 256), (7, 5, 31), (16, 9, 48)]:\n"
        "        x = torch.randn(m, k, generator=g).to(dt); w = torch.randn(n, k, generator=g).to(dt)\n"
        "        ref = reference.linear(x.double(), w.double())\n"
        "        err = (ops.linear(x, w).double() - ref).abs().max().item()\n"
        "        tol = 1e-4 if dt == torch.float32 else 0.05 * ref.abs().max().item()\n"
        "        assert err <= tol, (dt, m, n, k, err)\n"
        "print(ops.cpu_isa())\n"
    )
    seen = set()
    for cap in ("generic", "avx512", "avx512bf16"):
        env = dict(os.environ, PEARLMOE_CPU_ISA=cap)
        out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                             text=True, timeout=120)  # fmt: skip
        assert out.returncode == 0, out.stderr[-2000:]
        seen.add(out.stdout.strip())
    assert "generic" in seen  # the portable path always runs; the others where the CPU has them


@pytest.mark.parametrize("device", DEVICES)
def test_linear_bad_inputs(device):
    x = torch.randn(3, 8, device=device)
    with pytest.raises(RuntimeError, match=r"pearlmoe.linear: weight must be 2-D"):
        ops.linear(x, torch.randn(8, device=device))
    with pytest.raises(RuntimeError, match=r"pearlmoe.linear: weight must be \[N, K\] with K"):
        ops.linear(x, torch.randn(4, 7, device=device))
    with pytest.raises(RuntimeError, match=r"pearlmoe.linear: weight must have x's dtype"):
        ops.linear(x, torch.randn(4, 8, device=device, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"pearlmoe.linear: x must be floating point"):
        ops.linear(
            torch.ones(3, 8, dtype=torch.long, device=device), torch.ones(4, 8, dtype=torch.long)
        )
    with pytest.raises(RuntimeError, match=r"pearlmoe.linear: x must be \[..., K\]"):
        ops.linear(torch.tensor(1.0, device=device), torch.randn(4, 1, device=device))


# ---- rms_norm ----------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "rows,hidden", [(1, 1), (3, 7), (5, 16), (2, 17), (9, 257), (0, 8), (4, 4096)]
)
def test_rms_norm_matches_reference(device, rows, hidden):
    for dtype in _dtypes(device):
        g = torch.Generator().manual_seed(rows * 100 + hidden)
        x = (torch.randn(rows, hidden, generator=g) * 3).to(device, dtype)
        w = torch.rand(hidden, generator=g).to(device, dtype)
        out = ops.rms_norm(x, w, 1e-5)
        oracle = reference.hf_rms_norm(x.cpu().double(), w.cpu().double(), 1e-5)
        same = reference.hf_rms_norm(x.cpu(), w.cpu(), 1e-5)
        assert_close_to_oracle(out, same, oracle, factor=2.0, floor=1e-6)


def test_rms_norm_keeps_shape_strides_and_rows_independent():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 48, generator=g).to(torch.bfloat16)
    w = torch.rand(48, generator=g).to(torch.bfloat16)
    out = ops.rms_norm(x, w)
    assert out.shape == x.shape
    flat = x.reshape(10, 48)
    alone = torch.cat([ops.rms_norm(flat[i : i + 1], w) for i in range(10)])
    assert torch.equal(out.reshape(10, 48), alone)
    strided = torch.randn(48, 6, generator=g).t()  # [6, 48], non-unit last stride
    torch.testing.assert_close(ops.rms_norm(strided, w.float()),
                               reference.hf_rms_norm(strided, w.float()))  # fmt: skip


def test_rms_norm_autograd_and_edge_values():
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    w = torch.rand(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: ops.rms_norm(a, b, 1e-5), (x, w))
    zero = ops.rms_norm(torch.zeros(2, 4), torch.ones(4), 1e-5)
    assert torch.equal(zero, torch.zeros(2, 4))  # eps keeps an all-zero row finite
    inf = ops.rms_norm(torch.tensor([[1.0, float("inf")]]), torch.ones(2))
    ref = reference.hf_rms_norm(torch.tensor([[1.0, float("inf")]]), torch.ones(2))
    assert torch.equal(inf.isnan(), ref.isnan())


@pytest.mark.parametrize("device", DEVICES)
def test_rms_norm_bad_inputs(device):
    x = torch.randn(3, 8, device=device)
    with pytest.raises(RuntimeError, match=r"pearlmoe.rms_norm: weight must be \[H\] with H"):
        ops.rms_norm(x, torch.ones(7, device=device))
    with pytest.raises(RuntimeError, match=r"pearlmoe.rms_norm: weight must be 1-D"):
        ops.rms_norm(x, torch.ones(1, 8, device=device))
    with pytest.raises(RuntimeError, match=r"pearlmoe.rms_norm: weight must have x's dtype"):
        ops.rms_norm(x, torch.ones(8, device=device, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"pearlmoe.rms_norm: eps must be finite and >= 0"):
        ops.rms_norm(x, torch.ones(8, device=device), float("nan"))
    with pytest.raises(RuntimeError, match=r"pearlmoe.rms_norm: x must be floating point"):
        ops.rms_norm(torch.ones(2, 8, dtype=torch.long, device=device),
                     torch.ones(8, dtype=torch.long, device=device))  # fmt: skip


# ---- kv_cache_write ----------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch,steps,heads,dim", [(1, 1, 1, 64), (3, 5, 2, 80), (2, 9, 8, 128)])
def test_kv_cache_write_matches_reference(device, batch, steps, heads, dim):
    for dtype in _dtypes(device):
        g = torch.Generator().manual_seed(batch + steps)
        cap = 20
        k_cache = torch.randn(3, batch, cap, heads, dim, generator=g).to(device, dtype)
        v_cache = torch.randn(3, batch, cap, heads, dim, generator=g).to(device, dtype)
        k = torch.randn(batch, steps, heads, dim, generator=g).to(device, dtype)
        v = torch.randn(batch, steps, heads, dim, generator=g).to(device, dtype)
        starts = torch.randint(0, cap - steps + 1, (batch, 1), generator=g)
        positions = (starts + torch.arange(steps)).to(device)
        want_k, want_v = k_cache.clone(), v_cache.clone()
        reference.kv_cache_write(want_k, want_v, k, v, positions, 2)
        ops.kv_cache_write(k_cache, v_cache, k, v, positions, 2)
        assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)


def test_kv_cache_write_strided_inputs_and_cache_views():
    k_cache, v_cache = torch.zeros(2, 2, 6, 2, 4), torch.zeros(2, 2, 6, 2, 4)
    k = torch.randn(2, 4, 3, 2).permute(0, 2, 3, 1)  # [B, S, H, D] with a non-unit last stride
    v = torch.randn(2, 3, 2, 4)
    positions = torch.tensor([[5, 0, 2], [1, 3, 4]])  # any order, gaps allowed
    want_k, want_v = k_cache.clone(), v_cache.clone()
    reference.kv_cache_write(want_k, want_v, k, v, positions, 1)
    ops.kv_cache_write(k_cache, v_cache, k, v, positions, 1)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)
    assert (k_cache[0] == 0).all()  # other groups untouched


def test_kv_cache_write_bad_inputs():
    kc, vc = torch.zeros(2, 1, 4, 2, 8), torch.zeros(2, 1, 4, 2, 8)
    k, v = torch.randn(1, 2, 2, 8), torch.randn(1, 2, 2, 8)
    pos = torch.tensor([[0, 1]])
    op = "pearlmoe.kv_cache_write"
    with pytest.raises(
        RuntimeError, match=rf"{op}: positions\[0, 1\] = 4 is outside the cache's capacity \[0, 4\)"
    ):
        ops.kv_cache_write(kc, vc, k, v, torch.tensor([[3, 4]]))
    with pytest.raises(RuntimeError, match=rf"{op}: positions\[0, 0\] = -1 is outside"):
        ops.kv_cache_write(kc, vc, k, v, torch.tensor([[-1, 0]]))
    with pytest.raises(RuntimeError, match=rf"{op}: group must be in \[0, 2\), got 2"):
        ops.kv_cache_write(kc, vc, k, v, pos, 2)
    with pytest.raises(RuntimeError, match=rf"{op}: positions must be Long, got Int"):
        ops.kv_cache_write(kc, vc, k, v, pos.int())
    with pytest.raises(RuntimeError, match=rf"{op}: positions must be \[B, S\]"):
        ops.kv_cache_write(kc, vc, k, v, torch.tensor([[0, 1, 2]]))
    with pytest.raises(RuntimeError, match=rf"{op}: k must be \[B, S, Hkv, D\]"):
        ops.kv_cache_write(kc, vc, torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8), pos)
    with pytest.raises(RuntimeError, match=rf"{op}: v must have k's shape"):
        ops.kv_cache_write(kc, vc, k, torch.randn(1, 1, 2, 8), pos)
    with pytest.raises(RuntimeError, match=rf"{op}: k must have k_cache's dtype"):
        ops.kv_cache_write(kc, vc, k.double(), v.double(), pos)
    with pytest.raises(RuntimeError, match=rf"{op}: v_cache must have k_cache's shape"):
        ops.kv_cache_write(kc, vc[:, :, :3], k, v, pos)
    with pytest.raises(RuntimeError, match=rf"{op}: k_cache must be 5-D"):
        ops.kv_cache_write(kc[0], vc[0], k, v, pos)
    assert (kc == 0).all() and (vc == 0).all()  # nothing written by a refused call


def test_cpu_isa_is_reported():
    assert pearlmoe.ops.cpu_isa() in ("generic", "avx512", "avx512bf16")
