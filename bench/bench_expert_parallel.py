"""The cost of expert parallelism: one MoE layer (top-1 of 16 + shared expert, Hunyuan-Large's
routing) with its experts spread over R processes (gloo on CPUs; NCCL with --device cuda, one GPU
per rank), against the same layer in one process on the same per-rank tokens, in one run.

Reported per layer: the single-process layer, the expert-parallel layer, and the exchange alone
(the count swap and the three all_to_all_single calls of the same sizes, with no expert math), as
milliseconds and as ratios. Every rank brings T tokens; the table is rank 0's view (median of
repeats, after a barrier each time, so it is the slowest rank's pace).

    python bench/bench_expert_parallel.py [--ranks 2 4] [--tokens 1 16 256] [--device cuda]
"""

import argparse
import datetime
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from common import median_seconds, print_table, write_json


def _time(fn, device: torch.device, repeats: int) -> float:
    """Median milliseconds, every rank starting each repeat together."""
    return 1e3 * median_seconds(fn, device, repeats, before=dist.barrier)


def _measure(ep, layer, tokens: int, rank: int, world: int, device, dtype, args) -> dict:
    from pearlmoe import ops

    router, w13, w2, local13, local2, s13, s2 = layer
    x = torch.randn(tokens, args.hidden, generator=torch.Generator().manual_seed(rank))
    x = x.to(device, dtype)  # [T, H]
    single = _time(lambda: ops.moe_ffn(x, router, w13, w2, 1, s13, s2), device, args.repeats)
    expert = _time(lambda: ep.moe_ffn(x, router, local13, local2, 1, s13, s2), device, args.repeats)
    # The exchange alone, with this layer's real split sizes.
    ids = ops.topk_softmax(x.float() @ router.t(), 1)[1].reshape(-1).long()  # [T]
    comm = ep.comm_device(device)
    send_counts = torch.bincount(ep._owner.to(device)[ids], minlength=world).to(comm)  # [R]
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts)
    send, recv = send_counts.tolist(), recv_counts.tolist()
    rows, ids = x.to(comm), ids.to(comm)
    got_rows, got_ids = rows.new_empty(sum(recv), args.hidden), ids.new_empty(sum(recv))
    back = rows.new_empty(tokens, args.hidden)

    def exchange() -> None:
        dist.all_to_all_single(torch.empty_like(send_counts), send_counts)
        dist.all_to_all_single(got_rows, rows, recv, send)
        dist.all_to_all_single(got_ids, ids, recv, send)
        dist.all_to_all_single(back, got_rows, send, recv)

    moved = _time(exchange, device, args.repeats)
    return {"ranks": world, "tokens/rank": tokens, "single ms": single, "EP ms": expert,
            "exchange ms": moved, "EP/single": expert / single,
            "exchange share": moved / expert}  # fmt: skip


def _worker(rank: int, world: int, init: str, args, queue) -> None:
    from pearlmoe.distributed import ExpertParallel

    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{init}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=300))  # fmt: skip
    dtype = torch.bfloat16 if cuda else torch.float32
    g = torch.Generator().manual_seed(0)
    h, i, e = args.hidden, args.inter, 16

    def w(*shape):
        return (torch.randn(*shape, generator=g) * shape[-1] ** -0.5).to(device, dtype)

    w13, w2, s13, s2 = w(e, 2 * i, h), w(e, h, i), w(2 * i, h), w(h, i)
    router = w(e, h).float()
    ep = ExpertParallel(e)
    local13, local2 = w13[ep.first : ep.last].contiguous(), w2[ep.first : ep.last].contiguous()
    layer = (router, w13, w2, local13, local2, s13, s2)
    rows = [_measure(ep, layer, tokens, rank, world, device, dtype, args) for tokens in args.tokens]
    if rank == 0:
        queue.put(rows)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 256])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--inter", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    rows = []
    for world in args.ranks:
        if args.device == "cuda" and world > torch.cuda.device_count():
            print(f"skipping {world} ranks: {torch.cuda.device_count()} GPU(s)")
            continue
        queue = ctx.Queue()
        with tempfile.TemporaryDirectory() as tmp:
            mp.start_processes(_worker, (world, f"{tmp}/init", args, queue), nprocs=world,
                               start_method="spawn")  # fmt: skip
        rows += queue.get(timeout=5)
    device = torch.device(args.device)
    title = (f"MoE layer H{args.hidden} I{args.inter} E16 top-1 + shared, expert-parallel over "
             f"R processes ({'NCCL' if args.device == 'cuda' else 'gloo'}, "
             f"{os.cpu_count()} cores shared) vs one process")  # fmt: skip
    print_table(title, rows, [("ranks", "d"), ("tokens/rank", "d"), ("single ms", ".3f"),
                              ("EP ms", ".3f"), ("exchange ms", ".3f"), ("EP/single", ".2f"),
                              ("exchange share", ".2f")])  # fmt: skip
    path = write_json("bench_expert_parallel", device, {"config": vars(args), "rows": rows})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
