"""Shared benchmark plumbing: timing, the device's measured ceilings, tables and JSON."""

import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.utils.benchmark as tbench


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def median_seconds(
    fn: Callable[[], object],
    device: torch.device,
    repeats: int,
    before: Callable[[], object] | None = None,
) -> float:
    """Median wall seconds of fn() over repeats, after one warm-up call; before() runs untimed
    ahead of each repeat (a barrier, so that every rank starts together)."""
    fn()
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def time_ms(fn: Callable[[], object], device: torch.device, min_time: float = 0.2) -> float:
    """Median milliseconds per call of fn."""
    if device.type != "cuda":
        timer = tbench.Timer(stmt="fn()", globals={"fn": fn})
        return timer.blocked_autorange(min_run_time=min_time).median * 1e3
    for _ in range(3):
        fn()
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    calls = max(1, min(1000, int(1.0 / max(start.elapsed_time(end), 1e-3))))  # ~1 ms per sample
    samples = []
    for _ in range(max(5, int(min_time * 1e3 / max(calls * start.elapsed_time(end), 1e-3)))):
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / calls)
    return statistics.median(samples)


def measure_ceilings(device: torch.device) -> dict[str, float]:
    """Measured copy bandwidth (GB/s, bytes read + written) and dense bf16 GEMM rate (TFLOP/s)."""
    if device.type != "cuda":
        return {}
    src = torch.randn(1 << 29, device=device, dtype=torch.bfloat16)  # 1 GiB
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda: dst.copy_(src), device)
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    gemm_ms = time_ms(lambda: a @ b, device)
    return {
        "copy_GBps": 2 * src.numel() * 2 / copy_ms / 1e6,
        "bf16_gemm_TFLOPs": 2 * n**3 / gemm_ms / 1e9,
    }


def print_ceilings(ceilings: dict[str, float]) -> None:
    """The measured ceilings a table's fractions refer to (nothing on the CPU)."""
    if ceilings:
        print(f"ceilings: copy {ceilings['copy_GBps']:.0f} GB/s, "
              f"bf16 GEMM {ceilings['bf16_gemm_TFLOPs']:.0f} TFLOP/s")  # fmt: skip


def print_table(title: str, rows: list[dict], columns: list[tuple[str, str]]) -> None:
    """columns: (key, format spec) pairs; the key is also the header."""
    widths = [max(len(k), *(len(format(r[k], f)) for r in rows)) for k, f in columns]
    print(f"\n{title}")
    print("  ".join(k.rjust(w) for (k, _), w in zip(columns, widths, strict=True)))
    for r in rows:
        cells = [format(r[k], f).rjust(w) for (k, f), w in zip(columns, widths, strict=True)]
        print("  ".join(cells))


def write_json(name: str, device: torch.device, payload: dict, out_dir: str | None = None) -> Path:
    out = Path(out_dir or os.environ.get("OUT") or Path(__file__).parent / "out")
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}-{device.type}.json"
    meta = {
        "device": device_name(device),
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    path.write_text(json.dumps({**meta, **payload}, indent=2))
    return path
