"""Turning logits into a distribution and a token: temperature, top-k, top-p. Temperature 0 is
greedy (a one-hot of the argmax), which keeps every decoding loop deterministic and comparable.

Shape letters: B sequences, V vocabulary.
"""

import torch
from torch import Tensor


def logits_to_probs(
    logits: Tensor, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None
) -> Tensor:
    """[..., V] logits -> [..., V] fp32 probabilities after temperature, top-k, then top-p."""
    logits = logits.float()
    if temperature <= 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]  # [..., 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and 0 < top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Drop a token once the mass before it already reaches top_p (the first always stays).
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(probs: Tensor, generator: torch.Generator | None = None, greedy: bool = False) -> Tensor:
    """[B, V] probabilities -> [B] int64 tokens. greedy=True (one-hot rows, temperature 0) takes
    the argmax: the same token, without multinomial's cost or its draw from the generator."""
    if greedy:
        return probs.argmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
