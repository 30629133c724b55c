"""Training-time routing: expert capacity with token dropping, Hunyuan-Large's recycle routing,
and the load-balancing statistics.

Inference never comes here: ``ops.moe_ffn`` routes inside the fused op. Shape letters as in ops.py.
"""

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from . import ops


@dataclass
class RouterStats:
    """What the load-balancing loss needs, from one MoE layer's routing.

    token_fraction: [E] fraction of tokens whose gate top-k (before any capacity cut) includes
        expert e; sums to k.
    mean_prob: [E] mean router probability of expert e over the tokens (differentiable).
    dropped: [] slots left unrouted after capacity (and recycling).
    recycled: [] slots that recycle routing moved to another expert.
    """

    token_fraction: Tensor
    mean_prob: Tensor
    dropped: Tensor
    recycled: Tensor

    def load_balancing_loss(self) -> Tensor:
        """Switch-style auxiliary loss ``E · Σ_e f_e · P_e`` (1 at a uniform top-1 routing)."""
        return self.token_fraction.numel() * (self.token_fraction * self.mean_prob).sum()


def capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """Slots each expert may take: ``ceil(capacity_factor · T · k / E)``, at most T (an expert
    gets at most one slot per token, so a larger capacity drops nothing either; the cap keeps an
    absurd factor from sizing recycle routing's tables)."""
    if not (math.isfinite(capacity_factor) and capacity_factor > 0):
        raise ValueError(f"capacity_factor must be a positive finite number, got {capacity_factor}")
    return min(math.ceil(capacity_factor * num_tokens * top_k / num_experts), num_tokens)


def route(
    logits: Tensor,
    top_k: int,
    renormalize: bool = False,
    *,
    capacity_factor: float | None = None,
    recycle: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, RouterStats]:
    """Route tokens with an optional capacity cut and recycle routing.

    Priority for capacity: every token's first choice before any second choice, then token
    order. With ``recycle``, the dropped slots (in token order) take the free places of a random
    permutation of the experts' spare capacity (each expert listed once per free place), and are
    weighted by their softmax probability for the new expert. Dropped slots have id -1 and
    weight 0.

    Shape:
        logits: [T, E] float32 -> weights [T, k] float32, ids [T, k] int32, stats
    """
    num_tokens, num_experts = logits.shape
    probs = torch.softmax(logits, dim=-1)  # [T, E]
    weights, ids = ops.topk_softmax(logits, top_k, renormalize)  # [T, k], [T, k]
    chosen = torch.zeros_like(probs).scatter_(1, ids.long(), 1.0)  # [T, E]
    token_fraction = chosen.mean(0) if num_tokens else chosen.sum(0)  # [E]
    mean_prob = probs.mean(0) if num_tokens else probs.sum(0)  # [E]
    zero = torch.zeros((), dtype=torch.long, device=logits.device)
    if capacity_factor is None:
        return weights, ids, RouterStats(token_fraction, mean_prob, zero, zero)

    cap = capacity(num_tokens, top_k, num_experts, capacity_factor)
    by_priority = ids.t().reshape(-1).long()  # [k*T]: all first choices, then second, ...
    one_hot = torch.nn.functional.one_hot(by_priority, num_experts)  # [k*T, E]
    place = (one_hot.cumsum(0) - 1).gather(1, by_priority.unsqueeze(1)).squeeze(1)  # [k*T]
    keep = (place < cap).reshape(top_k, num_tokens).t()  # [T, k]
    new_ids = torch.where(keep, ids.long(), -1)  # [T, k]

    recycled = zero
    if recycle:
        kept = torch.bincount(new_ids[keep], minlength=num_experts)  # [E]
        spare = torch.arange(num_experts, device=logits.device).repeat_interleave(cap - kept)
        rng_device = generator.device if generator is not None else "cpu"
        perm = torch.randperm(spare.numel(), generator=generator, device=rng_device)
        perm = perm.to(spare.device)
        spare = spare[perm]  # one entry per free place, shuffled
        dropped_slots = (~keep).reshape(-1).nonzero().squeeze(1)  # [D], token order
        n = min(dropped_slots.numel(), spare.numel())
        flat_ids = new_ids.reshape(-1).clone()
        flat_ids[dropped_slots[:n]] = spare[:n]
        new_ids = flat_ids.reshape(num_tokens, top_k)
        recycled = torch.tensor(n, device=logits.device)
        moved = torch.zeros(num_tokens * top_k, dtype=torch.bool, device=logits.device)
        moved[dropped_slots[:n]] = True
        moved = moved.reshape(num_tokens, top_k)
        new_prob = probs.gather(1, new_ids.clamp(min=0))  # [T, k]
        weights = torch.where(moved, new_prob, weights)
    weights = torch.where(new_ids >= 0, weights, torch.zeros_like(weights))
    dropped = (new_ids < 0).sum()
    return weights, new_ids.int(), RouterStats(token_fraction, mean_prob, dropped, recycled)
