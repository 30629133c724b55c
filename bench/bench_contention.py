"""Decoding beside other busy processes: the CPU kernels' fork/join pools side by side.

A decode step is dozens of short parallel regions. OpenMP's (``PEARLMOE_CPU_POOL=openmp``)
ends each at a barrier that waits for every team thread, so on a machine whose cores other
processes also want, a region waits for a descheduled thread's next time slice. pearlmoe's
claiming pool (the default) waits only for work a thread has started and, when it finds the
machine loaded, runs the work on the caller alone for a while (csrc/cpu/thread_pool.h). Each
row: the embedded pair's greedy decode of held-out prompts beside 0, 1, 2 ... processes that
spin, with OpenMP on all threads, the claiming pool on all threads, and one thread (the best a
loaded machine allows), in turns that rotate within each repeat. With --processes every
measurement runs in a fresh process (the pool chosen by PEARLMOE_CPU_POOL), so neither pool's
idle threads linger beside the other's runs.

    python bench/bench_contention.py [--busy 0 1 2] [--modes ar speculative] [--batch 1]
                                     [--processes]
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

import torch

import pearlmoe
from common import print_table, write_json
from pearlmoe.decode import generate, speculative_generate

BUSY_LOOP = "while True: pass"


def decode_rate(mode: str, target, draft, prompts: list[list[int]], batch: int, new: int) -> float:
    """Tokens/s of one mode over the prompts, batch by batch (prefill included)."""
    tokens, start = 0, time.perf_counter()
    for i in range(0, len(prompts), batch):
        part = prompts[i : i + batch]
        if mode == "ar":
            out = generate(target, part, new, backend="fused")
        else:
            out, _ = speculative_generate(target, draft, part, new, backend="fused")
        tokens += sum(map(len, out))
    return tokens / (time.perf_counter() - start)


def join_cost_us(pool: str, threads: int, calls: int = 5000) -> float:
    """Microseconds per empty job of one part per thread (`_cpu_pool_selftest`, the op call
    included), the fastest of 5 passes: what a kernel's fork/join costs on each pool."""
    torch.ops.pearlmoe.set_cpu_pool(pool)
    job = torch.ops.pearlmoe._cpu_pool_selftest
    best = float("inf")
    with_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(calls):
                job(threads, 1, -1)
            best = min(best, (time.perf_counter() - start) / calls * 1e6)
    finally:
        torch.set_num_threads(with_threads)
    return best


def measure_in_process(args, pool: str, threads: int, mode: str) -> float:
    """One measurement in a fresh process: its tokens/s."""
    cmd = [sys.executable, __file__, "--worker", mode, "--threads", str(threads),
           "--batch", str(args.batch), "--prompts", str(args.prompts),
           "--max-new-tokens", str(args.max_new_tokens), "--dtype", args.dtype]  # fmt: skip
    env = dict(os.environ, PEARLMOE_CPU_POOL=pool)
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["rate"]


def main() -> None:
    from pearlmoe.cli import DRAFT, TARGET, load_tokenizer
    from pearlmoe.train.data import held_out_prompts

    parser = argparse.ArgumentParser()
    parser.add_argument("--busy", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--modes", nargs="+", default=["ar", "speculative"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--processes", action="store_true")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # a mode, measured here
    parser.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device, dtype = torch.device("cpu"), getattr(torch, args.dtype)
    cores = torch.get_num_threads()
    target = pearlmoe.from_pretrained(TARGET, dtype=dtype, device=device)
    draft = pearlmoe.from_pretrained(DRAFT, dtype=dtype, device=device)
    prompts = held_out_prompts(load_tokenizer(TARGET), args.prompts * args.batch, 64)
    configs = [("openmp", cores), ("claim", cores), ("claim", 1)]  # (pool, threads)
    if args.worker is not None:
        torch.set_num_threads(args.threads)
        decode_rate(args.worker, target, draft, prompts[: args.batch], args.batch, 8)
        rate = decode_rate(args.worker, target, draft, prompts, args.batch, args.max_new_tokens)
        print(json.dumps({"rate": rate}))
        return
    joins = {f"{p}_{t}t": join_cost_us(p, t) for p, t in configs}
    print("fork/join of an empty job, us (op call included): "
          + ", ".join(f"{k} {v:.2f}" for k, v in joins.items()))  # fmt: skip
    for mode in args.modes:  # warm-up: thread pools, allocator
        decode_rate(mode, target, draft, prompts[: args.batch], args.batch, 8)
    rows = []
    for busy in args.busy:
        procs = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(busy)]
        try:
            time.sleep(0.5)
            for mode in args.modes:
                rates: dict[tuple[str, int], list[float]] = {c: [] for c in configs}
                spells = torch.ops.pearlmoe.cpu_pool_solo_spells()
                for rep in range(args.repeats):
                    for pool, threads in configs[rep % 3 :] + configs[: rep % 3]:
                        if args.processes:
                            rates[pool, threads].append(measure_in_process(args, pool, threads,
                                                                           mode))  # fmt: skip
                            continue
                        torch.ops.pearlmoe.set_cpu_pool(pool)
                        torch.set_num_threads(threads)
                        rate = decode_rate(mode, target, draft, prompts, args.batch,
                                           args.max_new_tokens)  # fmt: skip
                        rates[pool, threads].append(rate)
                torch.set_num_threads(cores)
                openmp, claim, one = (statistics.median(rates[c]) for c in configs)
                paired = [c / o for c, o in zip(rates[configs[1]], rates[configs[0]], strict=True)]
                rows.append({
                    "busy": busy, "mode": mode, f"openmp_{cores}t": openmp,
                    f"claim_{cores}t": claim, "one_thread": one, "claim/openmp": claim / openmp,
                    "paired": math.exp(statistics.mean(map(math.log, paired))),
                    "solo_spells": None if args.processes
                    else torch.ops.pearlmoe.cpu_pool_solo_spells() - spells,
                    "runs": {f"{p}_{t}t": r for (p, t), r in rates.items()},
                })  # fmt: skip
        finally:
            for p in procs:
                p.kill()
                p.wait()
    torch.ops.pearlmoe.set_cpu_pool("claim")
    print_table(
        f"tokens/s beside busy processes ({cores} threads, batch {args.batch}, {args.dtype}, "
        f"median of {args.repeats})",
        rows,
        [("busy", "d"), ("mode", "s"), (f"openmp_{cores}t", ".0f"), (f"claim_{cores}t", ".0f"),
         ("one_thread", ".0f"), ("claim/openmp", ".2f"), ("paired", ".2f"),
         *([] if args.processes else [("solo_spells", "d")])],
    )  # fmt: skip
    payload = {
        "batch": args.batch,
        "dtype": args.dtype,
        "prompts": len(prompts),
        "max_new_tokens": args.max_new_tokens,
        "processes": args.processes,
        "join_us": joins,
        "repeats": args.repeats,
        "rows": rows,
    }
    name = f"contention-b{args.batch}" + ("-processes" if args.processes else "")
    print("wrote", write_json(name, device, payload, args.out))


if __name__ == "__main__":
    main()
