"""The Hunyuan-Large model: HF-compatible config and checkpoints, the transformer composed from
pearlmoe ops, and the compressed KV cache."""

from .checkpoint import CheckpointError, from_pretrained, save_pretrained
from .config import Estimate, ModelConfig, estimate
from .kv_cache import KVCache
from .transformer import Transformer

__all__ = [
    "CheckpointError",
    "Estimate",
    "KVCache",
    "ModelConfig",
    "Transformer",
    "estimate",
    "from_pretrained",
    "save_pretrained",
]
