"""Build and run the emulated-kernel drivers of tests/emu/ (see its README).

Each driver compiles kernels from csrc/kernels unchanged (``-DPEARLMOE_EMULATE`` selects the
emulated PTX and launches) with g++ into a plain executable, cached under build/emu/ by the hash
of every source it reads and the compiler, so reruns skip the compile. A case runs in its own
process with a timeout: a kernel that hangs, faults or trips the emulator fails its test instead
of taking pytest down. Tensors go in as their whole storage plus the view's offset, so the
kernels see strided and offset views as the extension passes them.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
EMU = ROOT / "tests" / "emu"
CACHE = ROOT / "build" / "emu"
CXX = os.environ.get("CXX", "g++")
FLAGS = ["-std=c++20", "-O1", "-g0", "-w", "-U_FORTIFY_SOURCE", "-DPEARLMOE_EMULATE", "-x", "c++"]
DRIVERS = ["topk_softmax", "grouped_topk", "moe_align", "grouped_gemm", "moe_elementwise", "rope_norm",
           "attention", "spec_verify", "kv_cache_write", "rms_norm"]  # fmt: skip


class EmulatorError(AssertionError):
    """The driver crashed, hung, or the emulator reported a hard error."""


class BuildError(RuntimeError):
    """A driver did not compile (never a test verdict on the kernels)."""


def _compiler_id() -> str:
    return subprocess.run([CXX, "--version"], capture_output=True, text=True, check=True).stdout


def _tree_hash(h, root: Path) -> None:
    sources = (".h", ".cuh", ".cpp", ".cu")  # what the compiler reads (not the README)
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in sources):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())


def binary(name: str, csrc: Path = ROOT / "csrc") -> Path:
    """The driver executable for `name`, compiled against the kernels under `csrc/kernels`
    (a mutated copy for the planted-bug tests), built once per source hash."""
    h = hashlib.sha256()
    h.update(" ".join([CXX, *FLAGS]).encode())
    h.update(_compiler_id().encode())
    _tree_hash(h, EMU)
    _tree_hash(h, csrc / "kernels")
    h.update(name.encode())
    out = CACHE / f"{name}-{h.hexdigest()[:16]}"
    if out.exists():
        return out
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    cmd = [CXX, *FLAGS, "-I", str(EMU / "include"), "-I", str(EMU / "drivers"), "-I", str(csrc),
           str(EMU / "drivers" / f"{name}.cpp"), "-o", str(tmp)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise BuildError(f"compiling the {name} driver failed:\n{done.stderr[-4000:]}")
    tmp.replace(out)  # atomic: a concurrent build of the same hash is harmless
    return out


def build_all(names: list[str] = DRIVERS, jobs: int = 2) -> None:
    """Compile the drivers not yet cached, `jobs` at a time."""
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        list(pool.map(binary, names))


@dataclass
class Result:
    status: int  # the launcher's cudaError_t
    outputs: dict[str, torch.Tensor]
    issues: list[str]
    launches: list[tuple[int, ...]] = field(default_factory=list)  # grid x, y, z, block, smem
    stdout: str = ""

    def check(self) -> Result:
        """Fail unless the launch succeeded and the emulator saw no issue."""
        assert self.status == 0, f"launch returned cudaError {self.status}"
        assert not self.issues, "emulator issues:\n" + "\n".join(self.issues)
        return self


def _raw(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The bytes of t's whole storage and the view's byte offset."""
    storage = torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage())
    return storage, t.storage_offset() * t.element_size()


def run(
    name: str,
    scalars: dict[str, float | int | bool],
    inputs: dict[str, torch.Tensor | None],
    outputs: dict[str, tuple[tuple[int, ...], torch.dtype]],
    seed: int = 0,
    timeout: float = 300,
    exe: Path | None = None,
) -> Result:
    """Run driver `name` on one case. Inputs are CPU tensors (any strides); None leaves the
    pointer null. Outputs are allocated by the driver, 0xFF-filled, and returned as tensors."""
    exe = exe or binary(name)
    with tempfile.TemporaryDirectory(prefix=f"emu-{name}-") as tmp:
        lines = [f"seed {seed}"]
        lines += [f"scalar {k} {int(v) if isinstance(v, bool) else v}" for k, v in scalars.items()]
        for key, t in inputs.items():
            if t is None:
                continue
            raw, offset = _raw(t.cpu())
            raw.numpy().tofile(os.path.join(tmp, f"{key}.in"))
            lines.append(f"input {key} {key}.in {offset}")
        for key, (shape, dtype) in outputs.items():
            nbytes = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
            lines.append(f"output {key} {nbytes}")
        Path(tmp, "case.txt").write_text("\n".join(lines) + "\n")
        try:
            done = subprocess.run([str(exe), tmp], capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise EmulatorError(
                f"{name} driver hung (> {timeout} s); case:\n" + "\n".join(lines)
            ) from e
        if done.returncode != 0:
            where = "set PEARLMOE_EMU_KEEP=1 to keep the case"
            if os.environ.get("PEARLMOE_EMU_KEEP"):
                where = shutil.copytree(
                    tmp, tempfile.mkdtemp(prefix=f"emu-{name}-"), dirs_exist_ok=True
                )
            raise EmulatorError(
                f"{name} driver exited with {done.returncode} ({where}):\n"
                f"{done.stderr[-3000:]}{done.stdout[-2000:]}"
            )
        result = Result(status=-1, outputs={}, issues=[], stdout=done.stdout)
        for line in done.stdout.splitlines():
            kind, _, rest = line.partition(" ")
            if kind == "status":
                result.status = int(rest)
            elif kind == "issue":
                result.issues.append(rest)
            elif kind == "launch":
                result.launches.append(tuple(int(x) for x in rest.split()))
        for key, (shape, dtype) in outputs.items():
            data = Path(tmp, f"{key}.bin").read_bytes()
            flat = (
                torch.frombuffer(bytearray(data), dtype=torch.uint8)
                if data
                else torch.empty(0, dtype=torch.uint8)
            )
            result.outputs[key] = flat.view(dtype).reshape(shape).clone()
        return result
