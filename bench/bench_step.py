"""One decode / verification step of the embedded pair, per backend, dtype, thread count and
window width: the numbers behind the cost model and bench/NOTES.md's decode-step section.

Each row is the median time of ``Runner(model)(ids)`` (pearlmoe.decode.runner) after a 64-token
context, against the same step on the eager backend in fp32 with 2 threads (the baseline the
first version of the decode loops ran). The floor column is the weights a step must read (the
active parameters: embedding row, attention, the shared expert and the distinct routed experts
the window's tokens choose, the output head) over the measured copy bandwidth of this machine.

    python bench/bench_step.py [--device cuda] [--widths 1 2 5 9]
"""

import argparse

import torch

import pearlmoe
from common import device_name, measure_ceilings, median_seconds, print_table, write_json
from pearlmoe.decode.cost_model import step_seconds
from pearlmoe.decode.runner import default_backend
from pearlmoe.model import estimate


def copy_bandwidth(device: torch.device) -> float:
    """GB/s (bytes read + written) of a copy: on a GPU the measured ceiling; on a CPU one thread
    copying a 16 MB buffer (about the embedded pair's bf16 weights, so its cache level)."""
    if device.type == "cuda":
        return measure_ceilings(device)["copy_GBps"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    src = torch.randn(4 << 20)  # 16 MB
    dst = torch.empty_like(src)
    seconds = median_seconds(lambda: dst.copy_(src), device, 21)
    torch.set_num_threads(threads)
    return 2 * src.numel() * 4 / seconds / 1e9


def main() -> None:
    from pearlmoe.cli import DRAFT, TARGET

    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--widths", type=int, nargs="+", default=[1, 2, 3, 5, 9])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    fast = default_backend(device)
    cores = torch.get_num_threads()
    copy_gbs = copy_bandwidth(device)
    rows = []
    configs = [("eager", torch.float32, cores), ("eager", torch.bfloat16, cores)]
    configs += [(fast, torch.bfloat16, t) for t in sorted({cores, max(1, cores // 2)})]
    configs += [(fast, torch.float32, cores)]
    if device.type == "cuda":
        configs = [("eager", torch.bfloat16, cores), (fast, torch.bfloat16, cores)]
    for name, path in (("target", TARGET), ("draft", DRAFT)):
        base = None
        for backend, dtype, threads in configs:
            model = pearlmoe.from_pretrained(path, dtype=dtype, device=device)
            est = estimate(model.config)
            torch.set_num_threads(threads)
            times = step_seconds(model, args.widths, backend=backend, repeats=21)
            torch.set_num_threads(cores)
            for width, seconds in zip(args.widths, times, strict=True):
                # Active bytes: the per-token active set, plus each extra distinct expert a
                # window of `width` random tokens may add (upper bound: min(width*k, E) experts).
                c = model.config
                per_expert = 3 * c.hidden_size * c.intermediate_size * c.num_hidden_layers
                experts = min(width * c.moe_topk, c.num_experts) if c.is_moe else 0
                extra = max(0, experts - c.moe_topk) * per_expert
                nbytes = (est.active_params + extra) * model.embed_tokens.element_size()
                ms = seconds * 1e3
                if base is None and width == args.widths[0]:
                    base = ms
                rows.append({
                    "model": name, "backend": backend, "dtype": str(dtype)[6:],
                    "threads": threads, "width": width, "ms": ms,
                    "ms_per_token": ms / width, "floor_ms": nbytes / copy_gbs / 1e6,
                    "vs_eager_fp32": base / ms if width == args.widths[0] else float("nan"),
                })  # fmt: skip
    columns = [("model", "s"), ("backend", "s"), ("dtype", "s"), ("threads", "d"),
               ("width", "d"), ("ms", ".3f"), ("ms_per_token", ".3f"), ("floor_ms", ".3f"),
               ("vs_eager_fp32", ".2f")]  # fmt: skip
    print_table(
        f"decode step on {device_name(device)} (embedded pair, batch 1, 64-token context; "
        f"copy bandwidth {copy_gbs:.1f} GB/s; vs eager fp32 at width {args.widths[0]})",
        rows, columns,
    )  # fmt: skip
    print(f"wrote {write_json('step', device, {'rows': rows, 'copy_GBps': copy_gbs}, args.out)}")


if __name__ == "__main__":
    main()
