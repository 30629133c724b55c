"""Autoregressive vs vanilla speculative vs PEARL decoding on one draft/target pair, in one run:
tokens/s, mean accepted tokens, acceptance rate, the speedups, and what the formulas predict from
the measured acceptance rate α and cost ratio (Leviathan et al.; PEARL, as in pearl.md §2).

Until the trained pair lands (the training issue), the pair is synthetic but honest: the target's
layers past the first two are scaled towards identity (their output projections times `eps`), and
the draft is those first two layers with the same embedding and head, so it agrees often and costs
a fraction of the target. Greedy, batch 1, no EOS stop, fixed budget.

    python bench/bench_decode.py [--device cuda] [--gamma 4]
"""

import argparse
import copy

import torch

import pearlmoe
from common import device_name, print_table, write_json
from pearlmoe.decode import pearl_generate, speculative_generate
from pearlmoe.decode.cost_model import step_seconds
from pearlmoe.decode.runner import BACKENDS, default_backend
from pearlmoe.model import ModelConfig, Transformer


def make_pair(device, dtype, layers: int, eps: float) -> tuple[Transformer, Transformer]:
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=2048, hidden_size=256, num_hidden_layers=layers, num_attention_heads=8,
        num_key_value_heads=2, intermediate_size=512, num_experts=8, moe_topk=1,
        num_shared_expert=1, use_mixed_mlp_moe=True, use_cla=True, cla_share_factor=2,
        use_qk_norm=True,
    )  # fmt: skip
    target = Transformer(config, dtype=dtype, device=device).eval()
    with torch.no_grad():
        for p in target.parameters():
            if p.dim() >= 2:
                p.normal_(0, 1.5 * p.shape[-1] ** -0.5)
        for block in target.layers[2:]:  # nearly identity: the draft below almost agrees
            block.self_attn.o_proj.mul_(eps)
            block.mlp.w2.mul_(eps)
            block.mlp.shared_w2.mul_(eps)
    draft_config = copy.deepcopy(config)
    draft_config.num_hidden_layers = 2
    draft = Transformer(draft_config, dtype=dtype, device=device).eval()
    state = {
        k: v
        for k, v in target.state_dict().items()
        if not k.startswith("layers.") or int(k.split(".")[1]) < 2
    }
    draft.load_state_dict(state)
    return target, draft


def leviathan(alpha: float, gamma: int, c: float) -> float:
    """Vanilla speedup with c = T_draft / T_target."""
    return (1 - alpha ** (gamma + 1)) / ((1 - alpha) * (gamma * c + 1))


def pearl_formula(alpha: float, gamma: int, t_draft: float, t_target: float) -> float:
    tokens = (1 - alpha**gamma) / ((1 - alpha) * (1 + alpha - alpha**gamma))
    return tokens * t_target / max(gamma * t_draft, t_target)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--gamma", type=int, default=None, help="default: the measured ratio")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--eps", type=float, default=0.05)
    parser.add_argument("--backend", default="auto", choices=["auto", *BACKENDS])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    backend = default_backend(device) if args.backend == "auto" else args.backend
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    target, draft = make_pair(device, dtype, args.layers, args.eps)
    t_target, t_draft = (
        step_seconds(target, [1], backend=backend)[0],
        step_seconds(draft, [1], backend=backend)[0],
    )
    gamma = args.gamma or max(1, round(t_target / t_draft))
    prompts = [
        [int(t) for t in torch.randint(0, 2048, (16,), generator=torch.Generator().manual_seed(i))]
        for i in range(4)
    ]

    rows, results = [], {}
    for name in ("autoregressive", "speculative", "pearl"):
        emitted = seconds = 0.0
        stats_all = []
        for i, prompt in enumerate(prompts):
            if name == "autoregressive":
                import time

                start = time.perf_counter()
                out = pearlmoe.generate(target, [prompt], args.tokens, backend=backend)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                elapsed, stats = time.perf_counter() - start, None
            else:
                loop = speculative_generate if name == "speculative" else pearl_generate
                out, stats = loop(
                    target, draft, [prompt], args.tokens, gamma=gamma, backend=backend
                )
                elapsed = stats.seconds
            results.setdefault(name, []).append(out[0])
            if i == 0:
                continue  # warm-up prompt, as the paper's scripts skip it
            emitted += len(out[0])
            seconds += elapsed
            if stats is not None:
                stats_all.append(stats)
        row = {
            "method": name,
            "tok_s": emitted / seconds,
            "mean_accepted": float("nan"),
            "alpha": float("nan"),
        }
        if stats_all:
            row["mean_accepted"] = sum(s.emitted for s in stats_all) / sum(
                s.target_calls for s in stats_all
            )
            row["alpha"] = sum(s.accepted for s in stats_all) / sum(s.proposed for s in stats_all)
        rows.append(row)
    assert results["speculative"] == results["autoregressive"] == results["pearl"], "lossless?"
    base = rows[0]["tok_s"]
    alpha = rows[1]["alpha"]
    predicted = {"autoregressive": 1.0, "speculative": leviathan(alpha, gamma, t_draft / t_target),
                 "pearl": pearl_formula(rows[2]["alpha"], gamma, t_draft, t_target)}  # fmt: skip
    for r in rows:
        r["speedup"] = r["tok_s"] / base
        r["predicted"] = predicted[r["method"]]
    rows[2]["vs_speculative"] = rows[2]["tok_s"] / rows[1]["tok_s"]
    for r in rows:
        r.setdefault("vs_speculative", float("nan"))
    columns = [("method", "s"), ("tok_s", ".1f"), ("speedup", ".2f"), ("predicted", ".2f"),
               ("vs_speculative", ".2f"), ("mean_accepted", ".2f"), ("alpha", ".3f")]  # fmt: skip
    print_table(
        f"decoding on {device_name(device)} ({backend}): synthetic pair ({args.layers}-layer MoE "
        f"target, 2-layer draft), gamma={gamma}, c=T_target/T_draft={t_target / t_draft:.2f}, "
        f"greedy, batch 1, {args.tokens} tokens x {len(prompts) - 1} prompts",
        rows, columns,
    )  # fmt: skip
    path = write_json(
        "decode",
        device,
        {"gamma": gamma, "t_target_s": t_target, "t_draft_s": t_draft, "rows": rows},
        args.out,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
