"""Decoding loops over a Transformer and its KV cache, all with the same interface:
autoregressive ``generate``, vanilla ``speculative_generate`` and parallel ``pearl_generate``."""

from .autoregressive import generate, generate_stream
from .common import DecodeStats, auto_gamma
from .pearl import pearl_generate
from .sampling import logits_to_probs, sample
from .speculative import speculative_generate

__all__ = [
    "DecodeStats",
    "auto_gamma",
    "generate",
    "generate_stream",
    "logits_to_probs",
    "pearl_generate",
    "sample",
    "speculative_generate",
]
