"""PEARL's CPU rounds with and without the draft's thread helping the target and the lookahead,
beside autoregressive and speculative decoding.

On a CPU PEARL's sides split the cores: each gets half. The draft drafts its γ tokens well
before the target has verified its window, and its core then idled. With ``draft_helps`` (the
default of the fused CPU rounds) the draft's thread runs the target's work until the round
ends (a PoolGuest of the target thread's pool, csrc/cpu/thread_pool.h). With ``lookahead`` (also
the default) a round's target window also scores the drafts the prompt lookup already knows the
draft will draft. Each row: a pair's greedy decode of held-out prompts (the embedded pair by
default), the arms (``--arms``: AR, speculative, PEARL variants, fixed γ) taking turns prompt by
prompt in a seeded random order, fresh for each prompt (PEARL runs slower right after a
speculative decode): tokens/s, the paired ratios, and a PEARL round's wall time, target side
and draft side.

    python bench/bench_pearl_help.py [--dtypes bfloat16 float32] [--prompts 24] [--batch 1]
                                     [--target smollm2-135m --draft smollm2-135m-draft]
                                     [--arms ar speculative "pearl, helps + lookahead" ...]
"""

import argparse
import math
import random
import time
from pathlib import Path

import torch

import pearlmoe
from common import print_table, write_json
from pearlmoe.cli import DRAFT, TARGET, load_tokenizer
from pearlmoe.decode import generate, pearl_generate, speculative_generate
from pearlmoe.train.data import held_out_prompts

# Each arm's decode: AR, or speculative / PEARL ("mode", PEARL by default) with these
# arguments ("gate": cost_model.SpeculationGate; by default PEARL's batches are gated).
ARMS = {
    "ar": None,
    "speculative": {"mode": "speculative"},
    "speculative, gated": {"mode": "speculative", "gate": True},
    "speculative, gamma 2": {"mode": "speculative", "gamma": 2},
    "speculative, gamma 3": {"mode": "speculative", "gamma": 3},
    "pearl": {"draft_helps": False, "lookahead": False},
    "pearl, draft helps": {"draft_helps": True, "lookahead": False},
    "pearl, helps + lookahead": {"draft_helps": True, "lookahead": True},
    "pearl, every round": {"draft_helps": True, "lookahead": True, "gate": False},
    "pearl, lookahead, gamma 2": {"draft_helps": True, "lookahead": True, "gamma": 2},
    "pearl, lookahead, gamma 3": {"draft_helps": True, "lookahead": True, "gamma": 3},
}
DEFAULT_ARMS = ["ar", "speculative", "pearl", "pearl, draft helps", "pearl, helps + lookahead"]


def decode(arm: str, target, draft, prompts: list[list[int]], new: int):
    """(tokens, seconds, stats or None) of one arm on one batch of prompts."""
    eos = target.config.eos_token_id
    start = time.perf_counter()
    if arm == "ar":
        out = generate(target, prompts, new, eos_token_id=eos, backend="fused")
        return sum(map(len, out)), time.perf_counter() - start, None
    kwargs = dict(ARMS[arm])
    generate_fn = pearl_generate if kwargs.pop("mode", "pearl") == "pearl" else speculative_generate
    out, stats = generate_fn(target, draft, prompts, new, eos_token_id=eos, backend="fused",
                             **kwargs)  # fmt: skip
    seconds = time.perf_counter() - start - stats.extra.get("warmup_seconds", 0.0)
    return sum(map(len, out)), seconds, stats


def geomean(ratios: list[float]) -> float:
    return math.exp(sum(map(math.log, ratios)) / len(ratios))


def run_dtype(dtype: torch.dtype, args) -> list[dict]:
    arms = args.arms
    target = pearlmoe.from_pretrained(args.target, dtype=dtype)
    draft = pearlmoe.from_pretrained(args.draft, dtype=dtype)
    prompts = held_out_prompts(load_tokenizer(args.target), args.prompts * args.batch, 64)
    batches = [prompts[i : i + args.batch] for i in range(0, len(prompts), args.batch)]
    for arm in arms:  # warm-up: the cost curves, thread pools, the draft worker
        decode(arm, target, draft, batches[0], 8)
    speeds = {arm: [] for arm in arms}
    counts = ("tokens", "seconds", "rounds", "helped_chunks", "lookahead_tokens", "wall", "target",
              "draft", "plain_tokens")  # fmt: skip
    totals = {arm: dict.fromkeys(counts, 0) for arm in arms}
    for rep in range(args.repeats):
        for i, batch in enumerate(batches):
            order = list(arms)  # seeded, fresh each time: no arm always follows the same one
            random.Random(rep * len(batches) + i).shuffle(order)
            for arm in order:
                tokens, seconds, stats = decode(arm, target, draft, batch, args.max_new_tokens)
                speeds[arm].append(tokens / seconds)
                t = totals[arm]
                t["tokens"] += tokens
                t["seconds"] += seconds
                if stats is not None and "gate" in stats.extra:
                    t["plain_tokens"] += stats.extra["gate"]["tokens"]["plain"]
                if stats is not None and "round_seconds" in stats.extra:  # PEARL
                    t["rounds"] += stats.target_calls
                    t["helped_chunks"] += stats.extra.get("draft_helped_chunks", 0)
                    t["lookahead_tokens"] += stats.extra.get("lookahead_tokens", 0)
                    for side in ("wall", "target", "draft"):
                        t[side] += stats.extra["round_seconds"][side]
    rows = []
    base = next((a for a in arms if a.startswith("pearl")), "ar")  # the paired PEARL reference
    for arm in arms:
        t = totals[arm]
        rounds = max(t["rounds"], 1)
        rows.append({
            "target": Path(str(args.target)).name, "dtype": str(dtype).removeprefix("torch."),
            "batch": args.batch, "arm": arm,
            "tokens_per_second": t["tokens"] / t["seconds"],
            "paired_vs_ar": geomean([a / b for a, b in zip(speeds[arm], speeds["ar"],
                                                            strict=True)]),
            "paired_vs_pearl": geomean([a / b for a, b in zip(speeds[arm], speeds[base],
                                                               strict=True)]),
            "tokens_per_round": t["tokens"] / rounds if t["rounds"] else float("nan"),
            "round_ms": 1e3 * t["wall"] / rounds if t["rounds"] else float("nan"),
            "target_ms": 1e3 * t["target"] / rounds if t["rounds"] else float("nan"),
            "draft_ms": 1e3 * t["draft"] / rounds if t["rounds"] else float("nan"),
            "helped_chunks_per_round": t["helped_chunks"] / rounds,
            "lookahead_per_round": t["lookahead_tokens"] / rounds,
            "plain_share": t["plain_tokens"] / t["tokens"],
        })  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", default=str(TARGET), help="a model directory, GGUF or name")
    parser.add_argument("--draft", default=str(DRAFT))
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--arms",
        nargs="+",
        default=DEFAULT_ARMS,
        choices=list(ARMS),
        help="the arms, taking turns (paired_vs_pearl: the first PEARL arm's)",
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = [row for name in args.dtypes for row in run_dtype(getattr(torch, name), args)]
    print_table(
        f"PEARL with and without the draft's thread helping the target "
        f"({torch.get_num_threads()} threads, batch {args.batch}, {args.prompts} prompts x "
        f"{args.max_new_tokens}, {args.repeats} repeats; paired = geometric mean per prompt)",
        rows,
        [("target", "s"), ("dtype", "s"), ("arm", "s"), ("tokens_per_second", ".1f"),
         ("paired_vs_ar", ".3f"), ("paired_vs_pearl", ".3f"), ("round_ms", ".3f"),
         ("target_ms", ".3f"), ("draft_ms", ".3f"), ("tokens_per_round", ".2f"),
         ("helped_chunks_per_round", ".1f"), ("lookahead_per_round", ".2f"),
         ("plain_share", ".2f")],
    )  # fmt: skip
    name = "pearl-help" if args.batch == 1 else f"pearl-help-batch{args.batch}"
    if args.target != str(TARGET):
        name += "-" + Path(args.target).name
    payload = {
        "threads": torch.get_num_threads(),
        "prompts": args.prompts,
        "batch": args.batch,
        "max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats,
        "arms": {arm: ARMS[arm] for arm in args.arms},
        "rows": rows,
    }
    print("wrote", write_json(name, torch.device("cpu"), payload, args.out))


if __name__ == "__main__":
    main()
