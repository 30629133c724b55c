"""Projections whose weights stay in a GGUF file's block format (``ops.qlinear``) instead of
being expanded to the model's dtype at load: a 4-bit Q4_1 weight is 0.625 bytes a value against
bf16's 2, and decoding on a CPU is bound by the bytes each token reads.

``quantize_gguf_projections`` swaps a loaded model's attention and MLP projections (and the output
head) for ``QuantizedWeight`` modules holding the file's own blocks; everything else (norms, the
embedding table used for lookups) stays in the model's dtype. Inference only.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import ops, reference

# GGUF tensor types (gguf.GGMLQuantizationType names) that ops.qlinear multiplies as stored.
FORMATS = {"Q4_0": "q4_0", "Q4_1": "q4_1", "Q8_0": "q8_0"}


class QuantizedWeight(nn.Module):
    """A weight [N, K] kept as GGUF blocks: ``qweight`` [N, K/32 * block bytes] uint8."""

    def __init__(self, qweight: Tensor, format: str, in_features: int) -> None:
        super().__init__()
        if format not in reference.GGUF_BLOCK_BYTES:
            raise ValueError(f"QuantizedWeight: unknown format {format!r}")
        self.register_buffer("qweight", qweight)  # [N, K/32 * bytes] uint8
        self.format = format
        self.in_features = in_features

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.qweight.shape[0], self.in_features))

    def forward(self, x: Tensor, reference_ops: bool = False) -> Tensor:
        if reference_ops:
            return reference.qlinear(x, self.qweight, self.format)  # [..., N]
        return ops.qlinear(x, self.qweight, self.format)  # [..., N]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return ops.dequantize(self.qweight, self.format, dtype)  # [N, K]

    def extra_repr(self) -> str:
        return (
            f"{self.format}, out_features={self.qweight.shape[0]}, in_features={self.in_features}"
        )


def project(x: Tensor, weight: Tensor | QuantizedWeight, reference_ops: bool) -> Tensor:
    """x [..., K] · weight^T for a dense or a quantised weight [N, K] -> [..., N]."""
    if isinstance(weight, QuantizedWeight):
        return weight(x, reference_ops)
    return (reference.linear if reference_ops else ops.linear)(x, weight)


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QuantizedWeight) for m in model.modules())


def replace_weight(module: nn.Module, name: str, weight: QuantizedWeight) -> None:
    """module.<name> (a Parameter) becomes the quantised weight."""
    if name in module._parameters:
        del module._parameters[name]
    setattr(module, name, weight)
