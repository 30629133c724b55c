"""Golden pure-torch implementations of every pearlmoe op: the oracle the tests compare against.

Written for clarity, not speed. Shape letters as in ops.py.
"""

import torch
from torch import Tensor

# ---- routing -------------------------------------------------------------------------------------


def topk_softmax(router_logits: Tensor, k: int, renormalize: bool = False) -> tuple[Tensor, Tensor]:
    """Softmax in the logits' precision (fp32, or fp64 for an fp64 oracle), then top-k by logit
    with ties to the lower expert index (NaN ranks as -inf)."""
    probs = torch.softmax(router_logits, dim=-1)  # [T, E]
    key = torch.where(router_logits.isnan(), float("-inf"), router_logits)  # [T, E]
    # A stable descending sort keeps equal keys in index order: ties go to the lower index.
    ids = torch.sort(key, dim=-1, descending=True, stable=True).indices[:, :k]  # [T, k]
    weights = probs.gather(1, ids)  # [T, k]
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights, ids.to(torch.int32)


def moe_align(topk_ids: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """Stable sort of the flattened slots by expert; -1 (dropped) sorts after every expert."""
    flat = topk_ids.reshape(-1).long()  # [N]
    bucket = torch.where(flat == -1, num_experts, flat)  # [N]
    order = torch.sort(bucket, stable=True).indices  # [N]
    slot_to_row = torch.empty_like(order)
    slot_to_row[order] = torch.arange(order.numel(), device=order.device)
    counts = torch.bincount(bucket, minlength=num_experts + 1)[:num_experts]  # [E]
    offsets = torch.zeros(num_experts + 1, dtype=torch.long, device=flat.device)
    offsets[1:] = counts.cumsum(0)
    return order.int(), slot_to_row.int(), offsets.int()
