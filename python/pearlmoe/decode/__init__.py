"""Decoding loops over a Transformer and its KV cache (speculative and PEARL land next)."""

from .autoregressive import generate, generate_stream
from .sampling import logits_to_probs, sample

__all__ = ["generate", "generate_stream", "logits_to_probs", "sample"]
