"""`make demo`: route a sample batch through pearlmoe's routing ops and show what they did.

Until the model lands this is the whole demo: Hunyuan-Large routing (top-1 of 16 with the raw
softmax probability as the combine weight), then the expert-grouped layout the grouped GEMM reads.
"""

import argparse

import torch

import pearlmoe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=12)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    hidden = torch.randn(args.tokens, args.hidden, device=device)  # [T, H]
    router_w = torch.randn(args.experts, args.hidden, device=device) / args.hidden**0.5  # [E, H]
    logits = hidden.float() @ router_w.float().t()  # [T, E], fp32 as Hunyuan-Large's router

    weights, ids = pearlmoe.topk_softmax(logits, args.top_k)  # [T, k], [T, k]
    sorted_slots, slot_to_row, offsets = pearlmoe.moe_align(ids, args.experts)

    print(
        f"pearlmoe {pearlmoe.__version__} on {device} (CUDA kernels built: "
        f"{pearlmoe.built_with_cuda()})"
    )
    print(
        f"\nrouting {args.tokens} tokens to top-{args.top_k} of {args.experts} experts "
        "(weights are raw softmax probabilities, not renormalised):"
    )
    print("  token  experts            weights")
    for t in range(args.tokens):
        experts = " ".join(f"{e:2d}" for e in ids[t].tolist())
        probs = " ".join(f"{w:.3f}" for w in weights[t].tolist())
        print(f"  {t:5d}  {experts:<17}  {probs}")

    counts = offsets.diff().tolist()
    print("\nexpert-grouped layout for the grouped GEMM (moe_align):")
    print("  expert  rows       slots (token.choice)")
    k = args.top_k
    for e in range(args.experts):
        lo, hi = offsets[e].item(), offsets[e + 1].item()
        slots = " ".join(f"{s // k}.{s % k}" for s in sorted_slots[lo:hi].tolist())
        print(f"  {e:6d}  {lo:3d}:{hi:<3d}    {slots if slots else '(empty)'}")
    busiest = max(counts)
    print(
        f"\n{sum(c == 0 for c in counts)} empty experts; busiest expert holds {busiest} of "
        f"{ids.numel()} slots (perfect balance would be {ids.numel() / args.experts:.2f})"
    )
    gathered = hidden[sorted_slots.long() // k]  # [N, H] rows in expert order
    assert torch.equal(gathered[slot_to_row.long()], hidden.repeat_interleave(k, 0))
    print(
        "slot_to_row inverts the permutation: scattering the grouped rows back restores "
        "token order."
    )


if __name__ == "__main__":
    main()
