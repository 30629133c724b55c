"""Multi-process serving under torchrun:

    torchrun --nproc-per-node N -m pearlmoe.distributed PROMPT --mode ar
        all N ranks hold 1/N of the target's routed experts; rank 0 holds the sequence, the
        others serve their experts to it (expert parallelism; gloo on CPUs, NCCL on GPUs).
    torchrun --nproc-per-node N -m pearlmoe.distributed PROMPT --mode pearl
        rank 0 runs the draft; ranks 1..N-1 hold the target, expert-parallel, led by rank 1;
        draft and target run at the same time and exchange token ids and the verification
        probabilities only.

Each rank reads only the checkpoint tensors it owns. Rank 0 prints the text and the statistics.
"""

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ..cli import DRAFT, TARGET, check_tokenizers, load_tokenizer
from ..decode import generate
from ..model import ModelConfig, from_pretrained
from .expert_parallel import ExpertParallel
from .pearl import distributed_pearl_generate


def _setup(backend: str | None) -> tuple[int, int, torch.device]:
    if "RANK" not in os.environ:
        raise SystemExit("run under torchrun: torchrun --nproc-per-node N -m pearlmoe.distributed")
    use_cuda = torch.cuda.is_available() and backend != "gloo"
    dist.init_process_group(backend or ("nccl" if use_cuda else "gloo"))
    rank, world = dist.get_rank(), dist.get_world_size()
    local = int(os.environ.get("LOCAL_RANK", rank))
    if use_cuda:
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    return rank, world, device


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="torchrun -m pearlmoe.distributed", description=__doc__)
    parser.add_argument("prompt", metavar="PROMPT")
    parser.add_argument("--mode", choices=["ar", "pearl"], default="pearl")
    parser.add_argument("--target", type=Path, default=TARGET)
    parser.add_argument("--draft", type=Path, default=DRAFT)
    parser.add_argument("--gamma", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", choices=["gloo", "nccl"])
    args = parser.parse_args(argv)
    rank, world, device = _setup(args.backend)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.mode == "pearl" and world < 2:
        raise SystemExit("pearlmoe.distributed: --mode pearl needs at least 2 ranks")
    if args.mode == "pearl":
        check_tokenizers(args.target, args.draft)
    tokenizer = load_tokenizer(args.target)
    prompt = tokenizer.encode(args.prompt).ids
    config = ModelConfig.from_file(args.target)
    eos = config.eos_token_id

    # Every rank creates every group, in the same order (a torch.distributed rule).
    target_ranks = list(range(world)) if args.mode == "ar" else list(range(1, world))
    if len(target_ranks) > 1 and not config.is_moe:
        raise SystemExit("pearlmoe.distributed: a dense target has no experts to spread over ranks")
    group = dist.new_group(target_ranks) if len(target_ranks) < world else None
    # Independent streams per rank: the target's acceptance draws must not repeat the draft's.
    generator = torch.Generator(device=device).manual_seed(args.seed + rank)
    start = time.perf_counter()
    out, stats = None, None
    if rank in target_ranks:
        ep = None
        if config.is_moe and len(target_ranks) > 1:
            ep = ExpertParallel(config.num_experts, group, leader_announces=True)
        target = from_pretrained(args.target, dtype, device, expert_parallel=ep)
        if rank != target_ranks[0]:
            ep.serve_followers(target)
        else:
            try:
                if args.mode == "ar":
                    out = generate(target, [prompt], args.max_new_tokens, args.temperature,
                                   eos_token_id=eos, generator=generator)[0]  # fmt: skip
                else:
                    out, stats = distributed_pearl_generate(
                        target, prompt, args.max_new_tokens, args.gamma, "target", peer=0,
                        temperature=args.temperature, eos_token_id=eos, generator=generator,
                    )  # fmt: skip
            finally:  # release the followers even when decoding failed
                if ep is not None:
                    ep.stop_followers(device)
    else:
        draft = from_pretrained(args.draft, dtype, device)
        out, stats = distributed_pearl_generate(
            draft, prompt, args.max_new_tokens, args.gamma, "draft", peer=1,
            temperature=args.temperature, eos_token_id=eos, generator=generator,
        )  # fmt: skip
    seconds = time.perf_counter() - start
    if rank == 0:
        print(args.prompt + tokenizer.decode(out, skip_special_tokens=True))
        line = f"\n[{args.mode}, {world} ranks] {len(out)} tokens in {seconds:.2f} s"
        if stats is not None:
            line += (f", {stats.mean_accepted_tokens:.2f} tokens per target call, acceptance "
                     f"rate {stats.acceptance_rate:.2f}")  # fmt: skip
        print(line)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
