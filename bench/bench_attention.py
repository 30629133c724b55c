"""Attention over the compressed KV cache against torch SDPA (enable_gqa), in one run.

Decode: Hunyuan-Large's head layout (80 query heads, 8 KV heads, head_dim 80), batch 1, contexts
4K..256K on a GPU (1K..16K on the CPU): time, GB/s of K/V read and, on a GPU, the fraction of the
measured copy bandwidth. Prefill: causal, Sq = context, TFLOP/s. SDPA gets its preferred
contiguous [B, H, S, D] layout. Writes JSON (bench/out or $OUT).

    python bench/bench_attention.py [--device cuda]
"""

import argparse
from functools import partial

import torch
import torch.nn.functional as F

import pearlmoe
from common import device_name, measure_ceilings, print_ceilings, print_table, time_ms, write_json

Q_HEADS, KV_HEADS, DIM = 80, 8, 80
CONTEXTS = {"cuda": [4096, 16384, 32768, 65536, 131072, 262144], "cpu": [1024, 4096, 16384]}
PREFILL = {"cuda": [1024, 4096, 8192], "cpu": [256, 1024]}


def sdpa(q, k, v, causal):  # [B, H, S, D] layouts
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    ceilings = measure_ceilings(device)
    g = torch.Generator(device=device).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device).to(dtype)

    rows = []
    for context in CONTEXTS[device.type]:
        q = randn(1, 1, Q_HEADS, DIM)  # [B, Sq, Hq, D]
        k, v = randn(1, context, KV_HEADS, DIM), randn(1, context, KV_HEADS, DIM)
        kv_lens = torch.tensor([context], dtype=torch.int32, device=device)
        ours = time_ms(partial(pearlmoe.attention, q, k, v, kv_lens), device)
        qs, ks, vs = (
            q.transpose(1, 2).contiguous(),
            k.transpose(1, 2).contiguous(),
            v.transpose(1, 2).contiguous(),
        )
        base = time_ms(partial(sdpa, qs, ks, vs, False), device)
        kv_bytes = 2 * context * KV_HEADS * DIM * k.element_size()
        row = {"mode": "decode", "context": context, "ours_ms": ours, "sdpa_ms": base,
               "vs_sdpa": base / ours, "GBps": kv_bytes / ours / 1e6}  # fmt: skip
        if ceilings:
            row["bw_frac"] = row["GBps"] / ceilings["copy_GBps"]
        rows.append(row)
        del k, v, ks, vs

    for length in PREFILL[device.type]:
        q = randn(1, length, Q_HEADS, DIM)
        k, v = randn(1, length, KV_HEADS, DIM), randn(1, length, KV_HEADS, DIM)
        kv_lens = torch.tensor([length], dtype=torch.int32, device=device)
        ours = time_ms(partial(pearlmoe.attention, q, k, v, kv_lens), device)
        qs, ks, vs = (
            q.transpose(1, 2).contiguous(),
            k.transpose(1, 2).contiguous(),
            v.transpose(1, 2).contiguous(),
        )
        base = time_ms(partial(sdpa, qs, ks, vs, True), device)
        flops = 2 * 2 * Q_HEADS * DIM * length * length / 2  # causal: half the score matrix
        row = {"mode": "prefill", "context": length, "ours_ms": ours, "sdpa_ms": base,
               "vs_sdpa": base / ours, "TFLOPs": flops / ours / 1e9}  # fmt: skip
        if ceilings:
            row["gemm_frac"] = row["TFLOPs"] / ceilings["bf16_gemm_TFLOPs"]
        rows.append(row)

    for r in rows:
        for key in ("GBps", "TFLOPs", "bw_frac", "gemm_frac"):
            r.setdefault(key, float("nan"))
    columns = [("mode", "s"), ("context", "d"), ("ours_ms", ".3f"), ("sdpa_ms", ".3f"),
               ("vs_sdpa", ".2f"), ("GBps", ".1f"), ("TFLOPs", ".2f")]  # fmt: skip
    if ceilings:
        columns += [("bw_frac", ".2f"), ("gemm_frac", ".2f")]
    title = (f"attention on {device_name(device)}: Hq={Q_HEADS} Hkv={KV_HEADS} D={DIM} batch 1, "
             f"{str(dtype).removeprefix('torch.')} (median ms)")  # fmt: skip
    print_table(title, rows, columns)
    print_ceilings(ceilings)
    path = write_json("attention", device, {"ceilings": ceilings, "rows": rows}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
