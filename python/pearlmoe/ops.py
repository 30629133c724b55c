"""Typed wrappers for every pearlmoe op, their fake (meta) implementations and autograd.

Letters used in shape comments: T tokens, E experts, k experts per token, N = T*k token-slots.
"""

import torch
from torch import Tensor

_ops = torch.ops.pearlmoe

# ---- routing -------------------------------------------------------------------------------------


def topk_softmax(router_logits: Tensor, k: int, renormalize: bool = False) -> tuple[Tensor, Tensor]:
    """fp32 softmax over the router logits, then the top-k experts of each token.

    Experts are ranked by logit (ties to the lower expert index, NaN ranks lowest), so CPU and
    CUDA pick identical ids. ``weights`` are the raw softmax probabilities of the chosen experts,
    as Hunyuan-Large combines them; ``renormalize=True`` divides them by their sum (Mixtral style).

    Shape:
        router_logits: [T, E] float32
        returns weights [T, k] float32, ids [T, k] int32, in rank order

    >>> w, ids = topk_softmax(torch.tensor([[0.0, 2.0, 1.0]]), k=2)
    >>> ids.tolist()
    [[1, 2]]
    """
    return _ops.topk_softmax.default(router_logits, k, renormalize)


def moe_align(topk_ids: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """Group the N = T*k token-slots by expert (a stable counting sort).

    Slot ``s`` is ``topk_ids.flatten()[s]`` (token ``s // k``). Row ``j`` of the expert-grouped
    order holds slot ``sorted_slots[j]``; ``slot_to_row`` is the inverse permutation; expert ``e``
    owns rows ``expert_offsets[e]:expert_offsets[e+1]``, slots in increasing order. An id of -1
    marks a dropped slot: those rows follow ``expert_offsets[E]``. Any other id outside [0, E) is
    an error (on CUDA the check costs one host sync and is skipped under CUDA-graph capture,
    where such ids count as dropped). All outputs have static shapes.

    Shape:
        topk_ids: [T, k] int32 or int64
        returns sorted_slots [N] int32, slot_to_row [N] int32, expert_offsets [E + 1] int32
    """
    return _ops.moe_align.default(topk_ids, num_experts)


@torch.library.register_fake("pearlmoe::topk_softmax")
def _topk_softmax_fake(router_logits: Tensor, k: int, renormalize: bool = False):
    torch._check(router_logits.dim() == 2, lambda: "router_logits must be 2-D")
    torch._check(router_logits.dtype == torch.float32, lambda: "router_logits must be float32")
    torch._check(k >= 1, lambda: f"k must be >= 1, got {k}")
    torch._check(k <= router_logits.shape[1], lambda: "k must be <= num_experts")
    num_tokens = router_logits.shape[0]
    weights = router_logits.new_empty(num_tokens, k)  # [T, k]
    ids = router_logits.new_empty(num_tokens, k, dtype=torch.int32)  # [T, k]
    return weights, ids


@torch.library.register_fake("pearlmoe::moe_align")
def _moe_align_fake(topk_ids: Tensor, num_experts: int):
    torch._check(topk_ids.dim() == 2, lambda: "topk_ids must be 2-D")
    torch._check(topk_ids.dtype in (torch.int32, torch.int64), lambda: "topk_ids must be int")
    torch._check(num_experts >= 1, lambda: "num_experts must be >= 1")
    n = topk_ids.numel()
    sorted_slots = topk_ids.new_empty(n, dtype=torch.int32)  # [N]
    slot_to_row = topk_ids.new_empty(n, dtype=torch.int32)  # [N]
    expert_offsets = topk_ids.new_empty(num_experts + 1, dtype=torch.int32)  # [E + 1]
    return sorted_slots, slot_to_row, expert_offsets


# topk_softmax's autograd is registered in C++ (csrc/ops/routing_autograd.cpp): a Python
# autograd kernel would put Python on every call's path, gradients or not.
