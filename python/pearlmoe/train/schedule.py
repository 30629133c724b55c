"""Hunyuan-Large's optimisation practices: the learning-rate schedule (warm-up, long decay, a short
final anneal to 1/10 of the peak) and the expert-specific learning rate.

The paper's Adam rule for the best learning rate at batch size B,
    ε(B) = 2 ε_max / (sqrt(B_noise / B) + sqrt(B / B_noise)),
is applied to each expert's effective batch: the shared expert (and every dense part) sees the
whole batch B, a routed expert about B · k / E, so routed experts train at ε(B·k/E) / ε(B) times
the base rate: about 0.31 for top-1 of 16 with B_noise = 3.8 B (the ratio the paper quotes).
"""

import math


def optimal_lr_scale(batch: float, noise_batch: float) -> float:
    """ε(B) / ε_max = 2 / (sqrt(B_noise / B) + sqrt(B / B_noise))."""
    return 2.0 / (math.sqrt(noise_batch / batch) + math.sqrt(batch / noise_batch))


def expert_lr_ratio(top_k: int, num_experts: int, noise_to_batch: float = 3.8) -> float:
    """Routed-expert rate over the shared/dense rate: ε(B·k/E) / ε(B), with
    B_noise = noise_to_batch · B."""
    batch = 1.0
    noise = noise_to_batch * batch
    return optimal_lr_scale(batch * top_k / num_experts, noise) / optimal_lr_scale(batch, noise)


def lr_at(
    step: int,
    total_steps: int,
    peak: float,
    warmup_steps: int,
    anneal_fraction: float = 0.05,
    decay_floor: float = 0.3,
    final: float = 0.1,
) -> float:
    """Linear warm-up to peak; cosine decay to decay_floor·peak; over the last anneal_fraction of
    the steps a linear anneal down to final·peak (the paper's ~5% to 1/10 of the peak)."""
    anneal_start = max(warmup_steps, round(total_steps * (1 - anneal_fraction)))
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if step < anneal_start:
        t = (step - warmup_steps) / max(1, anneal_start - warmup_steps)
        return peak * (decay_floor + (1 - decay_floor) * 0.5 * (1 + math.cos(math.pi * t)))
    t = (step - anneal_start) / max(1, total_steps - 1 - anneal_start)
    return peak * (decay_floor + (final - decay_floor) * min(1.0, t))
