"""Beyond one device, on torch.distributed (NCCL on GPUs, gloo on CPUs), launched with torchrun:
expert parallelism for moe_ffn and the model, checkpoints loaded by rank, PEARL with the draft and
the target on different ranks, and the deployment plan."""

from .expert_parallel import ExpertParallel, shard_experts
from .pearl import distributed_pearl_generate
from .plan import format_plan, plan

__all__ = [
    "ExpertParallel",
    "distributed_pearl_generate",
    "format_plan",
    "plan",
    "shard_experts",
]
