"""``pearlmoe bench``: autoregressive (eager, the baseline, and with the chosen backend) vs
speculative vs PEARL on held-out prompts, in one run, per dtype: tokens/s, the ratios, tokens per
target call, acceptance, γ, PEARL's overlap, and the cost model's curve with its predictions next
to what was measured. Greedy outputs are checked identical across modes. JSON + PNG.
"""

import json
import math
import random
import time
from pathlib import Path

import torch

from .decode import generate, pearl_generate, speculative_generate
from .decode.common import GATES, LOOKUP, measured_curve, side_threads
from .decode.cost_model import (
    CURVE_CONTEXT,
    CostCurve,
    alpha_needed,
    ar_rate,
    best_gamma,
    best_ratio,
    ceiling,
    flat,
    measure_interleaved,
    rate,
)
from .decode.pearl import draft_thread_lent

MODES = ("ar", "speculative", "pearl")
# The speed-ups over autoregressive decoding the project aims at (issue 12's targets: at batch 1,
# and at batch 4 for both modes): each run reports the acceptance rate of the draft model's own
# tokens that the cost model says would reach them on the measured curves, next to the rate
# measured.
GOALS = {"speculative": 1.4, "pearl": 1.6}
BATCH_GOAL = 1.2
EAGER_AR = "ar-eager"


def decode_one(
    mode: str, target, draft, batch: list[list[int]], max_new_tokens: int, gamma: int | None,
    temperature: float, seed: int, backend: str, lookup: int = LOOKUP, gate: bool | None = None,
):  # fmt: skip
    """One batch of prompts in one mode: (outputs, decode seconds, stats or None for AR)."""
    generator = torch.Generator(device=target.device).manual_seed(seed)
    common = dict(temperature=temperature, eos_token_id=target.config.eos_token_id,
                  generator=generator, backend=backend)  # fmt: skip
    start = time.perf_counter()
    if mode == "ar":
        outs = generate(target, batch, max_new_tokens, **common)
        return outs, time.perf_counter() - start, None
    loop = pearl_generate if mode == "pearl" else speculative_generate
    outs, stats = loop(target, draft, batch, max_new_tokens, gamma=gamma, lookup=lookup, gate=gate,
                       **common)  # fmt: skip
    return outs, time.perf_counter() - start - stats.extra.get("warmup_seconds", 0.0), stats


def summarize(mode: str, tokens: int, seconds: float, stats_list: list) -> dict:
    """A mode's row of the table from its decodes."""
    row = {"tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds}
    if stats_list:
        proposed = sum(s.proposed for s in stats_list)
        row |= {
            "mean_accepted_tokens": sum(s.emitted for s in stats_list)
            / sum(s.target_calls for s in stats_list),
            "acceptance_rate": sum(s.accepted for s in stats_list) / proposed if proposed else 0,
            "gammas": sorted({g for s in stats_list for g in s.extra.get("gammas", [s.gamma])}),
        }
        scales = [s.extra["side_scales"] for s in stats_list]
        row["side_scales"] = [sum(x[i] for x in scales) / len(scales) for i in (0, 1)]
        tested, kept = (sum(s.extra["model_drafts"][i] for s in stats_list) for i in (0, 1))
        row["model_acceptance_rate"] = kept / tested if tested else 0.0
        # How many drafts that rate rests on: with the lookup drafting most tokens, 8 prompts x
        # 128 tokens left ~110-160 of the model's own (v17), whose rate swung 0.63-0.90
        # between prompt sets.
        row["model_drafts_tested"] = tested
        if all("side_seconds" in s.extra for s in stats_list):  # speculative's C++ rounds
            decoding = sum(s.seconds for s in stats_list)
            sides = [sum(s.extra["side_seconds"][i] for s in stats_list) for i in (0, 1)]
            # the share of the decode each side took; the rest: prefills and host work (a
            # decode's seconds start after any warm-up)
            row["side_shares"] = {"draft": sides[0] / decoding, "target": sides[1] / decoding}
        hosts = [s.extra["round_host_seconds"] for s in stats_list]
        row["round_host_ms"] = 1e3 * sum(hosts) / len(hosts)
        # The speculation gate's plain steps (cost_model.SpeculationGate): their share of tokens.
        plain = sum(s.extra.get("gate", {}).get("tokens", {}).get("plain", 0) for s in stats_list)
        row["plain_share"] = plain / tokens if tokens else 0.0
        if mode == "pearl":
            wall = sum(s.extra["round_seconds"]["wall"] for s in stats_list)
            slower = sum(s.extra["round_seconds"]["slower"] for s in stats_list)
            row["overlap"] = wall / slower  # a round's wall time / its slower side (as measured)
            alone = sum(s.extra["round_seconds"].get("alone", 0.0) for s in stats_list)
            if alone:  # ... / the slower side's time alone (the cost curve)
                row["overlap_vs_alone"] = wall / alone
    return row


def paired_ratio(speeds: list[float], base: list[float]) -> dict:
    """A mode's speed over the baseline's, prompt batch by prompt batch (each pair ran within a
    second of each other): the geometric mean and the 10th / 90th percentiles of the per-batch
    ratios. A shared VM's speed drifts by ±10-25% between minutes, which moves the ratio of
    whole-run totals; paired ratios see only the drift within a batch's turn."""
    ratios = sorted(s / b for s, b in zip(speeds, base, strict=True))
    at = lambda q: ratios[min(len(ratios) - 1, int(q * len(ratios)))]  # noqa: E731
    geo = math.exp(sum(map(math.log, ratios)) / len(ratios))
    return {"geomean": geo, "p10": at(0.1), "p90": at(0.9)}


def curve_context(args) -> int:
    """The cached tokens the CPU cost curve is timed after: a decode's midpoint (the prompt and
    half the new tokens). A window's attention grows with them: an isolated 4-token window of
    the embedded target took 0.363 / 0.386 / 0.425 ms after 64 / 128 / 192 tokens."""
    return args.prompt_tokens + args.max_new_tokens // 2


def bench_dtype(
    target, draft, batches, args, backend: str, dtype: torch.dtype, batch: int
) -> dict:  # fmt: skip
    """Every mode on one dtype: the cost curves, the rows and whether outputs agree. The modes
    take turns prompt by prompt (in a shuffled order), so the machine's drift over the run, which
    on a shared VM is ±10-25% between minutes, weighs on every mode alike."""
    cpu = target.device.type == "cpu"
    context = curve_context(args) if cpu else CURVE_CONTEXT  # measure() keeps the default
    if cpu:  # both sides' thread counts in alternating rounds
        threads = sorted({torch.get_num_threads(), side_threads()})
        measure_interleaved(target, draft, threads, batch, backend, context=context)
    helped = draft_thread_lent(target, draft, backend)
    curves = {m: measured_curve(target, draft, batch, m, backend, helped)
              for m in ("speculative", "pearl")}  # fmt: skip
    modes = (EAGER_AR, *MODES)

    def run(mode: str, prompts, max_new: int, seed: int):
        name, mode_backend = mode.removesuffix("-eager"), "eager" if mode == EAGER_AR else backend
        return decode_one(name, target, draft, prompts, max_new, args.gamma, args.temperature,
                          seed, mode_backend, args.lookup, GATES[args.gate])  # fmt: skip

    for mode in modes:  # warm-up outside the timings: compile/capture, allocator, thread pools
        run(mode, batches[0], 8, 0)
    outputs = {m: [] for m in modes}
    totals = {m: [0, 0.0, []] for m in modes}  # tokens, seconds, stats
    speeds = {m: [] for m in modes}  # tokens/s per batch of prompts
    # --repeats passes over the prompts: on a shared VM one pass's ratios swing with the minute
    # (bf16 speculative 1.15-1.34x AR in three runs of v16), so more passes, each mode's runs
    # spread over all of them, average the drift out of the paired ratios.
    passes = [(r, i, p) for r in range(args.repeats) for i, p in enumerate(batches)]
    for r, i, prompts in passes:
        # A fresh order each batch (seeded): a mode's speed can depend on the mode run just before
        # it (PEARL ran 13-17% slower right after a speculative decode than after another PEARL
        # one or a 50 ms pause), and a rotation would give each mode the same predecessor always.
        order = list(modes)
        random.Random(i + 1000 * r).shuffle(order)
        for mode in order:
            outs, seconds, stats = run(mode, prompts, args.max_new_tokens, args.seed + i)
            outputs[mode].extend(outs)
            totals[mode][0] += sum(map(len, outs))
            totals[mode][1] += seconds
            speeds[mode].append(sum(map(len, outs)) / seconds)
            if stats is not None:
                totals[mode][2].append(stats)
    rows = {m: summarize(m.removesuffix("-eager"), *totals[m]) for m in modes}
    base, eager = rows["ar"]["tokens_per_second"], rows[EAGER_AR]["tokens_per_second"]
    for mode, row in rows.items():
        row["speedup_vs_ar"] = row["tokens_per_second"] / base
        row["paired_vs_ar"] = paired_ratio(speeds[mode], speeds["ar"])
        row["speedup_vs_eager_ar"] = row["tokens_per_second"] / eager
        if mode in ("speculative", "pearl"):
            curve, alpha = curves[mode], row["acceptance_rate"]
            g = row["gammas"][-1]
            row["predicted_tokens_per_second"] = batch * rate(curve, alpha, mode, g)
            # ... and with each side's cost and a round's host work as the loop observed them
            live = curve.scaled(*row["side_scales"], row["round_host_ms"] / 1e3)
            row["predicted_with_observed_sides"] = batch * rate(live, alpha, mode, g)
            row["best_gamma_at_measured_alpha"] = best_gamma(curve, alpha, mode)
            # The most this mode could do on these curves with perfect, free drafts.
            g_max, top = ceiling(curve, mode)
            base_rate = ar_rate(curves["speculative"])
            row["ceiling_vs_ar"] = {"gamma": g_max, "ratio": top / base_rate}
            # What the draft model's own tokens allow (prompt-lookup tokens, which cost no draft
            # step, come on top), and the acceptance rate the goal would need.
            g_model, at_model = best_ratio(curve, row["model_acceptance_rate"], mode, base_rate)
            row["model_only_vs_ar"] = {"gamma": g_model, "ratio": at_model,
                                       "alpha": row["model_acceptance_rate"]}  # fmt: skip
            # ... and what that alpha would allow if a window cost one step: the share of the
            # gap that the MoE target's rising verification cost makes (the question).
            g_flat, at_flat = best_ratio(flat(curve), row["model_acceptance_rate"], mode, base_rate)
            row["flat_verification_vs_ar"] = {"gamma": g_flat, "ratio": at_flat}
            goal = GOALS[mode] if batch == 1 else BATCH_GOAL
            row["goal_vs_ar"] = {
                "ratio": goal,
                "alpha_needed": alpha_needed(curve, mode, goal, base_rate),
            }
    # PEARL against speculative decoding, batch by batch (the goal: 1.1x at batch 1)
    rows["pearl"]["paired_vs_speculative"] = paired_ratio(speeds["pearl"], speeds["speculative"])
    rows["ar"]["predicted_tokens_per_second"] = batch * rate(curves["speculative"], 0, "ar", 0)
    greedy = args.temperature <= 0
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "cost_curve": _curve_json(curves["speculative"]),
        "cost_curve_context": context,
        "cost_curve_pearl_threads": _curve_json(curves["pearl"]),
        "modes": rows,
        "greedy_outputs_identical": all(outputs[m] == outputs["ar"] for m in MODES)
        if greedy else None,
        "compiled_equals_eager": outputs["ar"] == outputs[EAGER_AR] if greedy else None,
    }  # fmt: skip


def _curve_json(curve: CostCurve) -> dict:
    out = {"target_ms": [round(t * 1e3, 4) for t in curve.target],
           "draft_ms": round(curve.draft * 1e3, 4), **curve.extra}  # fmt: skip
    if curve.helped is not None:
        out["helped_target_ms"] = [round(t * 1e3, 4) for t in curve.helped]
    return out


def print_run(run: dict) -> None:
    curve = run["cost_curve"]
    widths = "  ".join(f"{n}:{t:.3f}" for n, t in enumerate(curve["target_ms"], 1))
    print(f"[{run['dtype']}] target step ms by window (after {run['cost_curve_context']} cached "
          f"tokens)  {widths}")  # fmt: skip
    print(f"[{run['dtype']}] draft step {curve['draft_ms']:.3f} ms "
          f"(PEARL's sides, {run['cost_curve_pearl_threads']['threads']} thread(s) each: target "
          f"{run['cost_curve_pearl_threads']['target_ms'][0]:.3f}, draft "
          f"{run['cost_curve_pearl_threads']['draft_ms']:.3f} ms"
          + (", the target with the draft's thread once it has drafted: "
             f"{run['cost_curve_pearl_threads']['helped_target_ms'][0]:.3f}"
             if "helped_target_ms" in run["cost_curve_pearl_threads"] else "") + ")")  # fmt: skip
    head = (f"{'dtype':<9}{'mode':<12}{'tok/s':>9}{'vs AR':>8}{'paired':>8}{'vs eager':>9}"
            f"{'tok/call':>9}{'accept':>7}{'gamma':>8}{'overlap':>8}{'predicted':>10}{'in-loop':>9}"
            f"{'host ms':>8}{'plain':>7}")  # fmt: skip
    tops = "; ".join(
        f"{m} {top['ratio']:.2f}x AR (gamma {top['gamma']})"
        for m, top in ((m, run["modes"][m]["ceiling_vs_ar"]) for m in ("speculative", "pearl"))
    )
    print(f"[{run['dtype']}] ceiling with every draft accepted, drafting free: {tops}")
    for m in ("speculative", "pearl"):
        own, goal = run["modes"][m]["model_only_vs_ar"], run["modes"][m]["goal_vs_ar"]
        need = goal["alpha_needed"]
        need = "out of reach on this curve" if need is None else f"needs alpha >= {need:.2f}"
        tested = run["modes"][m]["model_drafts_tested"]
        measured = run["modes"][m]["paired_vs_ar"]["geomean"]
        dense = run["modes"][m]["flat_verification_vs_ar"]
        print(f"[{run['dtype']}] {m}: the draft model's own alpha {own['alpha']:.2f} (over "
              f"{tested} of its drafts) allows {own['ratio']:.2f}x AR (gamma {own['gamma']}) "
              f"(a window at one step's cost would allow {dense['ratio']:.2f}x, gamma "
              f"{dense['gamma']}); {goal['ratio']}x {need}; measured with the lookup "
              f"{measured:.2f}x")  # fmt: skip
    shares = run["modes"]["speculative"].get("side_shares")
    if shares:
        rest = 1 - shares["draft"] - shares["target"]
        print(
            f"[{run['dtype']}] speculative's decode time: draft side {shares['draft']:.0%}, "
            f"target side {shares['target']:.0%}, the rest {rest:.0%} (prefills, host work)"
        )
    over = run["modes"]["pearl"]["paired_vs_speculative"]["geomean"]
    print(f"[{run['dtype']}] pearl over speculative (paired): {over:.2f}x")
    print(head)
    for mode, row in run["modes"].items():
        gammas = "->".join(map(str, row.get("gammas", []))) or "-"
        overlap = f"{row['overlap']:.2f}" if "overlap" in row else "-"
        predicted = row.get("predicted_tokens_per_second")
        predicted = "-" if predicted is None else f"{predicted:.0f}"
        live = row.get("predicted_with_observed_sides")
        live = "-" if live is None else f"{live:.0f}"
        host = f"{row['round_host_ms']:.3f}" if "round_host_ms" in row else "-"
        plain = f"{row['plain_share']:.0%}" if "plain_share" in row else "-"
        print(f"{run['dtype']:<9}{mode:<12}{row['tokens_per_second']:>9.1f}"
              f"{row['speedup_vs_ar']:>7.2f}x{row['paired_vs_ar']['geomean']:>7.2f}x"
              f"{row['speedup_vs_eager_ar']:>8.2f}x"
              f"{row.get('mean_accepted_tokens', 1.0):>9.2f}"
              f"{row.get('acceptance_rate', float('nan')):>7.2f}{gammas:>8}{overlap:>8}"
              f"{predicted:>10}{live:>9}{host:>8}{plain:>7}")  # fmt: skip


def write(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "pearlmoe_bench.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out / "pearlmoe_bench.png")
    print(f"wrote {out / 'pearlmoe_bench.json'} and {out / 'pearlmoe_bench.png'}")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, speeds, ratios = [], [], []
    for run in result["runs"]:
        for mode, row in run["modes"].items():
            labels.append(f"{mode}\n{run['dtype']}")
            speeds.append(row["tokens_per_second"])
            ratios.append(row["speedup_vs_eager_ar"])
    fig, ax = plt.subplots(figsize=(1.1 * len(labels) + 1, 3.4))
    colors = {"ar-eager": "#bbbbbb", "ar": "#8c8c8c", "speculative": "#dd8452", "pearl": "#4c72b0"}
    bars = ax.bar(range(len(labels)), speeds, color=[colors[lb.split("\n")[0]] for lb in labels])
    for bar, ratio in zip(bars, ratios, strict=True):
        ax.annotate(f"{ratio:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)  # fmt: skip
    ax.set_xticks(range(len(labels)), labels, fontsize=7)
    ax.set_ylabel("tokens / s")
    ax.margins(y=0.15)
    ax.set_title(f"pearlmoe bench, {result['device']}, batch {result['batch']}, "
                 f"{result['backend']} (ratios vs eager AR)", fontsize=8)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
