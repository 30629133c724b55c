"""The kernels keep a single source for the GPU and the emulator: every inline PTX instruction is
in csrc/kernels/ptx.cuh (whose functions the emulator's twin, tests/emu/include/emu/ptx.h, all
provides), every launch and dynamic shared-memory array goes through launch.cuh, and every
hand-written CUDA translation unit has an emulator driver. The CUTLASS file is the exception."""

import re
from pathlib import Path

KERNELS = Path(__file__).resolve().parents[1] / "csrc" / "kernels"
EMU = Path(__file__).resolve().parent / "emu"
CUTLASS = {"moe_gemm/grouped_gemm_sm90.cu"}


def _sources():
    for path in sorted(KERNELS.rglob("*")):
        rel = path.relative_to(KERNELS).as_posix()
        if path.suffix in (".cu", ".cuh", ".h") and rel not in CUTLASS:
            yield rel, path.read_text()


def test_cuda_constructs_live_in_the_wrapper_headers():
    for rel, code in _sources():
        code = re.sub(r"//.*", "", code)  # comments may mention them
        if rel != "ptx.cuh":
            assert not re.search(r"\basm\b", code), f"{rel}: inline PTX belongs in ptx.cuh"
        if rel != "launch.cuh":
            assert "<<<" not in code, f"{rel}: launch kernels with launch_kernel (launch.cuh)"
            assert "extern __shared__" not in code, f"{rel}: use PM_DYNAMIC_SMEM (launch.cuh)"


def test_every_ptx_wrapper_has_an_emulated_twin():
    real = (KERNELS / "ptx.cuh").read_text().split("#else", 1)[1]
    wrappers = set(re.findall(r"__device__ __forceinline__ \w+ (\w+)\(", real))
    twins = set(
        re.findall(r"^inline \w+ (\w+)\(", (EMU / "include" / "emu" / "ptx.h").read_text(), re.M)
    )
    assert wrappers and wrappers == twins


def test_every_kernel_translation_unit_has_a_driver():
    drivers = " ".join(p.read_text() for p in (EMU / "drivers").glob("*.cpp"))
    for rel, _ in _sources():
        if rel.endswith(".cu"):
            assert f'#include "kernels/{rel}"' in drivers, (
                f"{rel} has no emulator driver in tests/emu/drivers"
            )
