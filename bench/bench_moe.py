"""The MoE feed-forward layer: pearlmoe.moe_ffn against, in the same run, the eager per-expert
loop and a torch._grouped_mm pipeline (where torch has it), on Hunyuan-Large layer shapes (a
scaled-down shape on the CPU).

Reports median time, TFLOP/s, GB/s of expert weights read and, on a GPU, the fraction of the
measured copy bandwidth (decode) and dense bf16 GEMM rate (prefill). Writes JSON (bench/out or
$OUT).

    python bench/bench_moe.py [--device cuda] [--tokens 1 8 64 512 4096]
"""

import argparse
from functools import partial

import torch
import torch.nn.functional as F

import pearlmoe
from common import device_name, measure_ceilings, print_ceilings, print_table, time_ms, write_json
from pearlmoe import reference

# Hunyuan-Large: H 6400, I 18304, 16 routed experts top-1 plus one shared expert.
SHAPES = {
    "cuda": dict(hidden=6400, inter=18304, experts=16, top_k=1, dtype=torch.bfloat16),
    "cpu": dict(hidden=512, inter=1024, experts=16, top_k=1, dtype=torch.float32),
}
TOKENS = [1, 8, 64, 512, 4096]


def grouped_mm_moe(x, router_w, w13_t, w2_t, top_k, shared_w13, shared_w2):
    """The same layer from stock torch ops around torch._grouped_mm (weights pre-transposed to
    its [G, K, N] layout, as a user of it would store them)."""
    logits = x.float() @ router_w.float().t()  # [T, E]
    weights, ids = torch.softmax(logits, -1).topk(top_k)  # [T, k]
    flat = ids.reshape(-1)  # [N]
    order = flat.argsort(stable=True)  # [N]
    token = order // top_k
    counts = torch.bincount(flat, minlength=w13_t.shape[0])
    offs = counts.cumsum(0).to(torch.int32)  # [E] group ends
    h = torch._grouped_mm(x[token], w13_t, offs=offs)  # [N, 2I]
    gate, up = h.chunk(2, dim=-1)
    out = torch._grouped_mm(F.silu(gate) * up, w2_t, offs=offs)  # [N, H]
    y = reference.swiglu_mlp(x, shared_w13, shared_w2).float()
    y.index_add_(0, token, out.float() * weights.reshape(-1)[order].unsqueeze(1))
    return y.to(x.dtype)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, nargs="*", default=TOKENS)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    shape = SHAPES[device.type]
    hidden, inter, experts, top_k, dtype = (
        shape[k] for k in ("hidden", "inter", "experts", "top_k", "dtype")
    )
    ceilings = measure_ceilings(device)

    g = torch.Generator(device=device).manual_seed(0)

    def randn(*size, scale):
        return (torch.randn(*size, generator=g, device=device) * scale).to(dtype)

    w13 = randn(experts, 2 * inter, hidden, scale=hidden**-0.5)  # [E, 2I, H]
    w2 = randn(experts, hidden, inter, scale=inter**-0.5)  # [E, H, I]
    s13 = randn(2 * inter, hidden, scale=hidden**-0.5)  # [2I, H]
    s2 = randn(hidden, inter, scale=inter**-0.5)  # [H, I]
    router_w = torch.randn(experts, hidden, generator=g, device=device) * hidden**-0.5
    w13_t, w2_t = w13.transpose(1, 2).contiguous(), w2.transpose(1, 2).contiguous()
    expert_bytes = 3 * hidden * inter * w13.element_size()

    rows = []
    for tokens in args.tokens:
        x = randn(tokens, hidden, scale=1.0)
        ids = pearlmoe.topk_softmax(x.float() @ router_w.t(), top_k)[1]
        active = ids.unique().numel() + 1  # routed experts used + the shared expert
        flops = 2 * tokens * 3 * hidden * inter * (top_k + 1)
        ours = time_ms(partial(pearlmoe.moe_ffn, x, router_w, w13, w2, top_k, s13, s2), device)
        eager = time_ms(partial(reference.moe_ffn, x, router_w, w13, w2, top_k, s13, s2), device)
        row = {
            "T": tokens,
            "experts_read": active,
            "moe_ffn_ms": ours,
            "eager_loop_ms": eager,
            "vs_eager": eager / ours,
            "TFLOPs": flops / ours / 1e9,
            "weights_GBps": active * expert_bytes / ours / 1e6,
        }
        try:
            gmm_fn = partial(grouped_mm_moe, x, router_w, w13_t, w2_t, top_k, s13, s2)
            gmm = time_ms(gmm_fn, device)
            row.update(grouped_mm_ms=gmm, vs_grouped_mm=gmm / ours)
        except (RuntimeError, NotImplementedError) as err:  # no _grouped_mm for this dtype/device
            row.update(grouped_mm_ms=float("nan"), vs_grouped_mm=float("nan"))
            print(f"torch._grouped_mm unavailable here: {str(err).splitlines()[0]}")
        if ceilings:
            row["bw_frac"] = row["weights_GBps"] / ceilings["copy_GBps"]
            row["gemm_frac"] = row["TFLOPs"] / ceilings["bf16_gemm_TFLOPs"]
        rows.append(row)

    columns = [("T", "d"), ("experts_read", "d"), ("moe_ffn_ms", ".3f"), ("eager_loop_ms", ".3f"),
               ("vs_eager", ".2f"), ("grouped_mm_ms", ".3f"), ("vs_grouped_mm", ".2f"),
               ("TFLOPs", ".2f"), ("weights_GBps", ".1f")]  # fmt: skip
    if ceilings:
        columns += [("bw_frac", ".2f"), ("gemm_frac", ".2f")]
    title = (f"moe_ffn on {device_name(device)}: H={hidden} I={inter} E={experts} top-{top_k} "
             f"+ shared, {str(dtype).removeprefix('torch.')} (median ms)")  # fmt: skip
    print_table(title, rows, columns)
    print_ceilings(ceilings)
    path = write_json(
        "moe",
        device,
        {"shape": {**shape, "dtype": str(dtype)}, "ceilings": ceilings, "rows": rows},
        args.out,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
