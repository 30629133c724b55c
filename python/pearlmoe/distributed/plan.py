"""`pearlmoe plan`: memory per GPU for a model under expert- and tensor-parallel layouts, and the
longest context a batch can hold in what is left.

Layouts (N GPUs):
  ep:     routed experts split over the GPUs (E/N each); attention, shared expert, router and
          embeddings replicated; attention data-parallel, so each GPU caches the full per-token KV
          of its own ceil(B/N) sequences.
  tp:     every matrix split N ways (heads, expert widths, vocabulary); each GPU caches its share
          of the KV heads for all B sequences (a KV head cannot be split: past N = KV heads it is
          replicated, so a GPU still holds one).
  ep+tp:  routed experts split over the GPUs, attention and shared expert tensor-parallel.
"""

import math
from dataclasses import dataclass

from ..model.config import ModelConfig, embedding_params, estimate, layer_params

GB = 1e9


@dataclass
class Parts:
    """Parameter counts by kind."""

    embed: int  # embeddings and LM head
    attention: int  # q/k/v/o projections and norms
    shared: int  # shared experts and routers
    routed: int  # routed experts, all of them


def parts(c: ModelConfig) -> Parts:
    attention = shared = routed = 0
    for layer in range(c.num_hidden_layers):
        p = layer_params(c, layer)
        attention, shared, routed = attention + p.attention, shared + p.shared, routed + p.routed
    return Parts(embedding_params(c), attention, shared, routed)


@dataclass
class LayoutPlan:
    layout: str
    weights_per_gpu: float  # bytes
    kv_per_token_per_gpu: float  # bytes, per sequence
    sequences_per_gpu: int
    kv_capacity: int  # tokens the memory left after the weights can cache, over all sequences
    longest_context: int  # per sequence, capped at max_position_embeddings; 0: does not fit
    fits: bool


def plan(
    config: ModelConfig,
    gpus: int,
    gpu_mem_gb: float,
    batch: int = 1,
    weight_bytes: float = 2,
    kv_bytes: int = 2,
    reserve_gb: float = 4.0,
) -> list[LayoutPlan]:
    if gpus < 1 or gpu_mem_gb <= 0 or batch < 1:
        raise ValueError(
            f"need gpus >= 1, gpu_mem > 0 and batch >= 1, got {gpus}, {gpu_mem_gb}, {batch}"
        )
    p = parts(config)
    kv_full = estimate(config, kv_bytes).kv_bytes_per_token  # one sequence, all layers
    kv_heads = config.num_key_value_heads
    kv_tp = kv_full * math.ceil(kv_heads / gpus) / kv_heads  # whole heads per GPU
    experts = max(1, config.num_experts)
    experts_per_gpu = math.ceil(experts / gpus) / experts  # the largest rank's share
    layouts = {
        "ep": (
            p.embed + p.attention + p.shared + p.routed * experts_per_gpu,
            kv_full, math.ceil(batch / gpus),
        ),
        "tp": ((p.embed + p.attention + p.shared + p.routed) / gpus, kv_tp, batch),
        "ep+tp": (
            (p.embed + p.attention + p.shared) / gpus + p.routed * experts_per_gpu, kv_tp, batch,
        ),
    }  # fmt: skip
    out = []
    budget = (gpu_mem_gb - reserve_gb) * GB
    for name, (params, kv, seqs) in layouts.items():
        weights = params * weight_bytes
        free = budget - weights
        capacity = int(free // kv) if free > 0 else 0
        context = min(capacity // seqs, config.max_position_embeddings)
        out.append(LayoutPlan(name, weights, kv, seqs, capacity, context, context > 0))
    return out


def format_plan(
    config: ModelConfig,
    gpus: int,
    gpu_mem_gb: float,
    batch: int = 1,
    weight_bytes: float = 2,
    kv_bytes: int = 2,
    reserve_gb: float = 4.0,
    weight_name: str | None = None,
) -> str:
    est = estimate(config, kv_bytes)
    rows = plan(config, gpus, gpu_mem_gb, batch, weight_bytes, kv_bytes, reserve_gb)
    wname = weight_name or {2: "bf16", 1: "fp8", 0.5: "int4", 4: "fp32"}.get(
        weight_bytes, f"{weight_bytes} B/parameter"
    )
    lines = [
        f"{est.total_params / 1e9:.1f}B parameters ({est.active_params / 1e9:.1f}B active per "
        f"token), weights {wname}, KV cache {kv_bytes} B/value: {est.kv_bytes_per_token:,} "
        "B/token for one sequence",
        f"{gpus} GPUs × {gpu_mem_gb:g} GB, batch {batch}, {reserve_gb:g} GB/GPU reserved for "
        "activations and workspace; context capped at max_position_embeddings "
        f"({config.max_position_embeddings:,})",
        "",
        f"{'layout':<8}{'weights/GPU':>14}{'KV B/token/GPU':>17}{'KV tokens/GPU':>15}"
        f"{'seqs/GPU':>10}{'longest context':>18}",
    ]  # fmt: skip
    for r in rows:
        context = f"{r.longest_context:,}" if r.fits else "does not fit"
        if r.fits and r.longest_context == config.max_position_embeddings:
            context += " (max)"
        lines.append(
            f"{r.layout:<8}{r.weights_per_gpu / GB:>11.1f} GB{r.kv_per_token_per_gpu:>17,.0f}"
            f"{r.kv_capacity:>15,}{r.sequences_per_gpu:>10}{context:>18}"
        )
    return "\n".join(lines)
