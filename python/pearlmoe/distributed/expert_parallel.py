"""Expert parallelism over a torch.distributed process group (NCCL on GPUs, gloo on CPUs).

The routed experts are split into contiguous blocks, one per rank; everything else (attention,
norms, router, shared expert, embeddings) is replicated and runs data-parallel: each rank
feeds its own tokens. An MoE layer then

  1. routes its tokens locally (fp32 router, top-k, as moe_ffn does),
  2. exchanges per-rank slot counts (all_to_all_single of R integers),
  3. dispatches each token-slot's row and local expert id to the rank owning the expert
     (all_to_all_single with uneven splits; a rank may send or receive nothing),
  4. runs its experts on what it received (the grouped-GEMM moe_ffn_routed op),
  5. sends the outputs back along the reverse splits and combines them with the routing
     weights, adding the shared expert, computed locally while the dispatch is in flight.

In fp64/fp32 the result equals moe_ffn's to rounding; in bf16 it differs from the fused
single-device op by one more rounding (each slot's expert output is rounded to bf16 before the
combine, and the shared expert runs as plain torch ops).

A rank with no tokens of its own still joins every layer's exchange (``Transformer.forward_idle``),
which is how the idle ranks of a target group serve the one rank that holds a sequence.

Shape letters: T tokens on this rank, k top-k, S slots received, H hidden, R ranks, E experts.
"""

import torch
import torch.distributed as dist
from torch import Tensor

from .. import ops, reference

FORWARD, STOP = 1, 0


def comm_device(device: torch.device, group=None) -> torch.device:
    """Where a message to the group's ranks must live: gloo moves CPU tensors, NCCL GPU tensors."""
    return device if dist.get_backend(group) == "nccl" else torch.device("cpu")


class ExpertParallel:
    """Which experts each rank of ``group`` owns, and the leader/follower protocol of a group
    whose first rank holds the sequences (``leader_announces=True``): before each forward the
    leader broadcasts a command, and the followers answer with an idle forward."""

    def __init__(self, num_experts: int, group=None, leader_announces: bool = False) -> None:
        if not dist.is_initialized():
            raise RuntimeError("expert parallelism needs torch.distributed.init_process_group()")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.num_experts = num_experts
        self.bounds = [r * num_experts // self.world for r in range(self.world + 1)]
        self.first, self.last = self.bounds[self.rank], self.bounds[self.rank + 1]
        owner = [r for r in range(self.world) for _ in range(self.bounds[r], self.bounds[r + 1])]
        self._owner = torch.tensor(owner, dtype=torch.int64)  # [E] -> owning rank
        self._first = torch.tensor(self.bounds[:-1], dtype=torch.int64)  # [R]
        self.leader_announces = leader_announces
        self.leader = dist.get_global_rank(group, 0) if group is not None else 0

    @property
    def num_local_experts(self) -> int:
        return self.last - self.first

    def comm_device(self, device: torch.device) -> torch.device:
        return comm_device(device, self.group)

    # ---- leader / follower ----------------------------------------------------------------

    def _command(self, value: int, device: torch.device) -> int:
        cmd = torch.tensor([value], dtype=torch.int64, device=self.comm_device(device))
        dist.broadcast(cmd, self.leader, group=self.group)
        return int(cmd.item())

    def announce(self, device: torch.device) -> None:
        """Leader, before each forward: the followers join it."""
        if self.leader_announces and self.rank == 0 and self.world > 1:
            self._command(FORWARD, device)

    def stop_followers(self, device: torch.device) -> None:
        if self.leader_announces and self.rank == 0 and self.world > 1:
            self._command(STOP, device)

    def serve_followers(self, model) -> int:
        """Follower loop: an idle forward per leader forward until the leader stops. Returns the
        number of forwards served."""
        served = 0
        while self._command(STOP, model.device) == FORWARD:
            model.forward_idle()
            served += 1
        return served

    # ---- the layer --------------------------------------------------------------------------

    @torch.no_grad()
    def moe_ffn(
        self,
        x: Tensor,
        router_w: Tensor,
        w13: Tensor,
        w2: Tensor,
        top_k: int,
        shared_w13: Tensor | None = None,
        shared_w2: Tensor | None = None,
        renormalize: bool = False,
    ) -> Tensor:
        """moe_ffn with this rank's experts only: x [T, H], router_w [E, H] (all experts),
        w13 [E_local, 2I, H], w2 [E_local, H, I] -> [T, H]."""
        if router_w.shape[0] != self.num_experts or w13.shape[0] != self.num_local_experts:
            raise ValueError(
                f"expert-parallel moe_ffn on rank {self.rank}: router_w must have "
                f"{self.num_experts} rows and w13 {self.num_local_experts} experts, got "
                f"{tuple(router_w.shape)} and {tuple(w13.shape)}"
            )
        tokens, hidden = x.shape
        comm = self.comm_device(x.device)
        logits = x.float() @ router_w.float().t()  # [T, E], as moe_ffn routes
        weights, ids = ops.topk_softmax(logits, top_k, renormalize)  # [T, k], [T, k]
        slot_expert = ids.reshape(-1).long()  # [T*k]
        dest = self._owner.to(x.device)[slot_expert]  # [T*k] owning rank of each slot
        order = torch.argsort(dest, stable=True)  # slots grouped by destination rank
        send_counts = torch.bincount(dest, minlength=self.world)  # [R]
        recv_counts = torch.empty_like(send_counts, device=comm)
        dist.all_to_all_single(recv_counts, send_counts.to(comm), group=self.group)
        send, recv = send_counts.tolist(), recv_counts.tolist()

        rows = x[order // top_k]  # [T*k, H] token row per slot
        local_id = slot_expert[order] - self._first.to(x.device)[dest[order]]  # [T*k]
        recv_rows = rows.new_empty(sum(recv), hidden, device=comm)  # [S, H]
        recv_ids = local_id.new_empty(sum(recv), device=comm)  # [S]
        pending = [
            dist.all_to_all_single(recv_rows, rows.to(comm), recv, send, group=self.group,
                                   async_op=True),
            dist.all_to_all_single(recv_ids, local_id.to(comm), recv, send, group=self.group,
                                   async_op=True),
        ]  # fmt: skip
        acc = torch.promote_types(x.dtype, torch.float32)  # combine in fp32 (fp64 stays fp64)
        shared = None  # the shared expert overlaps the dispatch
        if shared_w13 is not None:
            shared = reference.swiglu_mlp(x, shared_w13, shared_w2).to(acc)  # [T, H]
        for work in pending:
            work.wait()

        recv_rows, recv_ids = recv_rows.to(x.device), recv_ids.to(x.device)
        if recv_rows.shape[0]:
            out = ops.moe_ffn_routed(
                recv_rows, torch.ones(recv_rows.shape[0], 1, device=x.device),
                recv_ids.unsqueeze(1), w13, w2,
            )  # [S, H]  # fmt: skip
        else:
            out = recv_rows
        back = rows.new_empty(tokens * top_k, hidden, device=comm)  # [T*k, H]
        dist.all_to_all_single(back, out.to(comm), send, recv, group=self.group)

        per_slot = torch.empty_like(back, device=x.device)
        per_slot[order] = back.to(x.device)  # undo the grouping by rank
        y = (per_slot.view(tokens, top_k, hidden).to(acc) * weights.unsqueeze(-1)).sum(1)
        if shared is not None:
            y = y + shared
        return y.to(x.dtype)


def shard_experts(model, ep: ExpertParallel) -> None:
    """In place: keep only this rank's routed experts in every MoE layer and route through ep.
    (Works on meta tensors too, which is how the sharded loader builds its model.)"""
    from ..model.transformer import MoE

    if model.config.num_experts != ep.num_experts:
        raise ValueError(
            f"model has {model.config.num_experts} experts, the expert-parallel plan "
            f"{ep.num_experts}"
        )
    for block in model.layers:
        mlp = block.mlp
        if isinstance(mlp, MoE):
            mlp.w13 = torch.nn.Parameter(mlp.w13.detach()[ep.first : ep.last].clone())
            mlp.w2 = torch.nn.Parameter(mlp.w2.detach()[ep.first : ep.last].clone())
            mlp.expert_offset = ep.first
            mlp.expert_parallel = ep
    model.expert_parallel = ep
