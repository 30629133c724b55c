"""The decode step's own CUDA kernels under the CPU emulator (tests/emu/): rms_norm against the
golden reference (fp32/bf16/fp16, H from 1 to 6400, strided rows) and kv_cache_write against its
reference (strided K/V, positions in any order, out-of-range positions skipped, never written
out of bounds), with two scheduling seeds."""

import pytest
import torch

import emu_kernels
from conftest import assert_close_to_oracle
from pearlmoe import reference

pytestmark = pytest.mark.emu  # bench/device_check.sh skips these: the GPU runs the kernels

SEEDS = [0, 5]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("rows", "hidden"), [(1, 1), (3, 7), (2, 128), (5, 129), (2, 6400)])
def test_rms_norm(rows, hidden, dtype, seed):
    g = torch.Generator().manual_seed(rows * hidden)
    wide = (torch.randn(rows, hidden + 3, generator=g) * 4).to(dtype)
    x = wide[:, 1 : 1 + hidden]  # row stride H + 3, offset 1
    w = (torch.rand(hidden, generator=g) + 0.5).to(dtype)
    out = emu_kernels.rms_norm(x, w, 1e-5, seed=seed).check().outputs["out"]
    low = reference.hf_rms_norm(x, w, 1e-5)
    oracle = reference.hf_rms_norm(x.double(), w.double(), 1e-5)
    assert_close_to_oracle(out, low, oracle, floor=1e-6)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    ("batch", "steps", "heads", "dim"), [(1, 1, 1, 64), (3, 5, 2, 80), (2, 9, 8, 128)]
)
def test_kv_cache_write(batch, steps, heads, dim, dtype, seed):
    g = torch.Generator().manual_seed(batch * 100 + steps)
    cap = 16
    k_cache = torch.randn(2, batch, cap, heads, dim, generator=g).to(dtype)
    v_cache = torch.randn(2, batch, cap, heads, dim, generator=g).to(dtype)
    k = torch.randn(batch, heads, steps, dim, generator=g).to(dtype).transpose(1, 2)  # strided
    v = torch.randn(batch, heads, steps, dim, generator=g).to(dtype).transpose(1, 2)
    positions = torch.stack([torch.randperm(cap, generator=g)[:steps] for _ in range(batch)])
    positions[0, -1] = cap + 3 if steps > 1 else positions[0, -1]  # past the cache: skipped
    positions[-1, 0] = -2  # before it: skipped
    out = emu_kernels.kv_cache_write(k_cache, v_cache, k, v, positions, group=1, seed=seed).check()
    keep = (positions >= 0) & (positions < cap)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    rows = torch.arange(batch).unsqueeze(1).expand(-1, steps)
    want_k[1][rows[keep], positions[keep]] = k[keep]
    want_v[1][rows[keep], positions[keep]] = v[keep]
    assert torch.equal(out.outputs["k_cache"], want_k[1])
    assert torch.equal(out.outputs["v_cache"], want_v[1])
