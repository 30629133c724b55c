"""qlinear's CUDA kernels under the CPU emulator (tests/emu/): the warp-per-column product for
every format and x dtype against the fp64 oracle (K of one block, 32 blocks a lane and a tail,
rows across the 8-row groups, a strided x), the per-row independence the decode loops rely on,
and dequantize bit for bit against the reference expansion, with two scheduling seeds."""

import pytest
import torch

import emu_kernels
from conftest import assert_close_to_oracle
from pearlmoe import reference
from quant_blocks import FORMATS, random_blocks

pytestmark = pytest.mark.emu  # bench/device_check.sh skips these: the GPU runs the kernels

SEEDS = [0, 3]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("format", FORMATS)
@pytest.mark.parametrize(("rows", "n", "k"), [(1, 5, 32), (3, 9, 1056), (9, 4, 96), (16, 7, 64)])
def test_qlinear(rows, n, k, format, seed):
    g = torch.Generator().manual_seed(rows * 100 + n + k)
    q = random_blocks(n, k, format, g)
    oracle_w = reference.dequantize(q, format).double()
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        wide = torch.randn(rows, k + 32, generator=g).to(dtype)
        x = wide[:, 32:]  # row stride K + 32, offset 32
        out = emu_kernels.qlinear(x, q, format, seed=seed).check().outputs["out"]
        oracle = x.double() @ oracle_w.t()
        floor = 8 * torch.finfo(dtype).eps * max(oracle.abs().max().item(), 1.0)
        assert_close_to_oracle(out, reference.qlinear(x, q, format), oracle, floor=floor)
        if rows > 1 and dtype == torch.float32:  # each row as the one-row call computes it
            alone = emu_kernels.qlinear(x[1:2], q, format, seed=seed).check().outputs["out"]
            assert torch.equal(out[1:2], alone)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("format", FORMATS)
def test_dequantize(format, seed):
    g = torch.Generator().manual_seed(len(format) + seed)
    q = random_blocks(11, 160, format, g)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        out = emu_kernels.dequantize(q, format, dtype, 160, seed=seed).check().outputs["out"]
        assert torch.equal(out, reference.dequantize(q, format, dtype))
