"""Training with Hunyuan-Large's practices, on the stdlib corpus with a byte-level BPE tokenizer
(the embedded pair and the `python -m pearlmoe.train` presets land with the rest of the training
issue)."""

from .schedule import expert_lr_ratio, lr_at, optimal_lr_scale
from .trainer import TrainConfig, evaluate, param_groups, train

__all__ = [
    "TrainConfig",
    "evaluate",
    "expert_lr_ratio",
    "lr_at",
    "optimal_lr_scale",
    "param_groups",
    "train",
]
