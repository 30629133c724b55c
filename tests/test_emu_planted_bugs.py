"""The emulated kernel tests can fail: each case plants one bug in a copy of csrc/kernels (a
missing cp.async wait, missing barriers, a missing warp sync, swapped MMA operands, key ranges
that lose a tile), builds the driver from the copy, and requires the same check the kernel tests
use to fail on it, after the clean build has passed it."""

import shutil

import pytest
import torch

import emu_kernels
import emulation
from test_emu_attention import check as check_attention
from test_emu_attention import make_inputs

pytestmark = pytest.mark.emu  # bench/device_check.sh skips these: the GPU runs the kernels

BF = torch.bfloat16


def attention_decode(exe):
    check_attention(*make_inputs(3, 1, 8, 2, 128, 300, [1, 150, 300], BF, seed=1), seed=0,
                    num_sms=4, exe=exe)  # fmt: skip


def attention_prefill(exe):
    check_attention(*make_inputs(2, 130, 4, 2, 80, 200, [130, 197], BF, seed=2), seed=0,
                    num_sms=8, exe=exe)  # fmt: skip


def attention_split_prefill(exe):  # 31 key tiles over 3 of 4 ranges: one range takes 11
    check_attention(*make_inputs(1, 70, 2, 1, 80, 2000, [1950], BF, seed=3), seed=0, num_sms=8,
                    exe=exe)  # fmt: skip


def gemm(exe):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(300, 72, generator=g).to(BF), torch.randn(2, 136, 72, generator=g).to(BF)
    offs = torch.tensor([0, 129, 300], dtype=torch.int32)
    c = emu_kernels.grouped_gemm(a, b, offs, 300, exe=exe).check().outputs["c"]
    want = torch.cat([a[:129].float() @ b[0].float().t(), a[129:].float() @ b[1].float().t()])
    torch.testing.assert_close(c.float(), want, rtol=2e-2, atol=0.1)


def align(exe):
    ids = torch.randint(-1, 5, (700, 2), generator=torch.Generator().manual_seed(0))
    r = emu_kernels.moe_align(ids, 5, exe=exe).check()
    want = torch.ops.pearlmoe.moe_align(ids, 5)
    assert all(
        torch.equal(r.outputs[k], w)
        for k, w in zip(("sorted_slots", "slot_to_row", "expert_offsets"), want, strict=True)
    )


# (name, file under csrc/kernels, text, replacement, driver, case)
BUGS = [
    ("split-kv-missing-cp-async-wait", "attention/split_kv_decode.cuh",
     "    cp_async_wait<kStages - 2>();\n    __syncthreads();\n  }", "    __syncthreads();\n  }",
     "attention", attention_decode),
    ("prefill-missing-syncthreads", "attention/flash_prefill.cuh",
     "  __syncthreads();  // the last stage is refilled in step 0\n", "", "attention",
     attention_prefill),
    ("swapped-pv-operand-lanes", "attention/attention_common.cuh",
     "mma_16816<T>(o[2 * dp], a, r[0], r[1]);", "mma_16816<T>(o[2 * dp], a, r[1], r[0]);",
     "attention", attention_decode),
    ("split-ranges-drop-a-tile", "attention/attention.h",
     "*end = *begin + base + (split < extra ? 1 : 0);", "*end = *begin + base;", "attention",
     attention_split_prefill),
    ("gemm-missing-syncthreads", "moe_gemm/grouped_gemm_sm80.cu",
     "    __syncthreads();                    // ... everyone's, and stage t % kStages is free\n",
     "", "grouped_gemm", gemm),
    ("moe-align-missing-syncwarp", "routing/moe_align.cu",
     "    __syncwarp();  // every lane has read next_row before the group leader advances it\n",
     "", "moe_align", align),
]  # fmt: skip


@pytest.mark.parametrize("bug", BUGS, ids=[b[0] for b in BUGS])
def test_planted_bug_is_caught(bug, tmp_path):
    _, path, text, replacement, driver, case = bug
    case(emulation.binary(driver))  # the clean kernels pass the case
    shutil.copytree(emulation.ROOT / "csrc" / "kernels", tmp_path / "kernels")
    source = tmp_path / "kernels" / path
    code = source.read_text()
    assert code.count(text) == 1, f"the text to mutate is no longer in {path}: update this test"
    source.write_text(code.replace(text, replacement))
    exe = emulation.binary(driver, csrc=tmp_path)
    with pytest.raises(AssertionError) as caught:
        case(exe)
    print(f"{bug[0]}: caught by", " / ".join(str(caught.value).splitlines()[:2])[:200])
