"""Routing ops (topk_softmax, grouped_topk, moe_align) against eager PyTorch, in one run.

Eager baselines: torch.softmax + torch.topk for routing; HF's Glm4MoeTopkRouter selection written
in torch (pearlmoe.reference.grouped_topk) for the sigmoid / grouped routing (GLM-4.5's 160
experts top-8, and DeepSeek-V3's 256 in 8 groups of which 4 are kept); the sort-based reference
for the expert grouping. Prints a table and writes bench/out/routing-<device>.json (or $OUT).

    python bench/bench_routing.py [--device cuda]
"""

import argparse

import torch

import pearlmoe
from common import device_name, measure_ceilings, print_ceilings, print_table, time_ms, write_json
from pearlmoe import reference

SHAPES = [
    (16, 1),
    (64, 8),
    (160, 8),
    (256, 8),
]  # (experts, top-k): Hunyuan-Large, OLMoE-like, GLM-4.5, DeepSeek-like
TOKENS = [1, 8, 64, 512, 4096, 16384]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, nargs="*", default=TOKENS)
    parser.add_argument("--out", default=None, help="directory for the JSON (default bench/out)")
    args = parser.parse_args()
    device = torch.device(args.device)
    ceilings = measure_ceilings(device)

    rows = []
    for num_experts, k in SHAPES:
        for num_tokens in args.tokens:
            logits = torch.randn(num_tokens, num_experts, device=device)  # [T, E]
            _, ids = pearlmoe.topk_softmax(logits, k)
            topk_ms = time_ms(lambda: pearlmoe.topk_softmax(logits, k), device)  # noqa: B023
            eager_topk_ms = time_ms(lambda: torch.softmax(logits, -1).topk(k), device)  # noqa: B023
            align_ms = time_ms(lambda: pearlmoe.moe_align(ids, num_experts), device)  # noqa: B023
            eager_align_ms = time_ms(lambda: reference.moe_align(ids, num_experts), device)  # noqa: B023
            bias = torch.randn(num_experts, device=device) * 0.1
            groups = 8 if num_experts in (64, 256) else 1  # GLM-4.5 (160) routes ungrouped
            grouped = (logits, bias, k, groups, max(1, groups // 2), True, 2.5)
            grouped_ms = time_ms(lambda: pearlmoe.ops.grouped_topk(*grouped), device)  # noqa: B023
            eager_grouped_ms = time_ms(lambda: reference.grouped_topk(*grouped), device)  # noqa: B023
            row = {
                "E": num_experts,
                "k": k,
                "T": num_tokens,
                "topk_us": topk_ms * 1e3,
                "eager_topk_us": eager_topk_ms * 1e3,
                "topk_speedup": eager_topk_ms / topk_ms,
                "G": groups,
                "grouped_us": grouped_ms * 1e3,
                "eager_grouped_us": eager_grouped_ms * 1e3,
                "grouped_speedup": eager_grouped_ms / grouped_ms,
                "align_us": align_ms * 1e3,
                "eager_align_us": eager_align_ms * 1e3,
                "align_speedup": eager_align_ms / align_ms,
            }
            if ceilings:  # logits read + weights/ids written, as a fraction of copy bandwidth
                nbytes = logits.numel() * 4 + num_tokens * k * 8
                row["topk_bw_frac"] = nbytes / (topk_ms * 1e6) / ceilings["copy_GBps"]
            rows.append(row)

    columns = [
        ("E", "d"),
        ("k", "d"),
        ("T", "d"),
        ("topk_us", ".1f"),
        ("eager_topk_us", ".1f"),
        ("topk_speedup", ".2f"),
        ("G", "d"),
        ("grouped_us", ".1f"),
        ("eager_grouped_us", ".1f"),
        ("grouped_speedup", ".2f"),
        ("align_us", ".1f"),
        ("eager_align_us", ".1f"),
        ("align_speedup", ".2f"),
    ]
    if ceilings:
        columns.append(("topk_bw_frac", ".3f"))
    print_table(f"routing ops on {device_name(device)} (median µs per call)", rows, columns)
    print_ceilings(ceilings)
    path = write_json("routing", device, {"ceilings": ceilings, "rows": rows}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
