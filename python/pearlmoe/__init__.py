"""pearlmoe: Mixture-of-Experts kernels in the style of Hunyuan-Large and PEARL parallel
speculative decoding, as PyTorch ops.

Importing the package registers ``torch.ops.pearlmoe.*`` (CPU kernels always, CUDA kernels when
the build had them) without initialising CUDA.
"""

# torch first: it loads libtorch, which the extension links against.
import torch

from . import (
    _C,  # noqa: F401  (registers torch.ops.pearlmoe)
    ops,
    reference,
)
from .decode import generate, generate_stream
from .model import from_pretrained, save_pretrained
from .ops import (
    attention,
    dequantize,
    grouped_gemm,
    grouped_topk,
    linear,
    moe_align,
    moe_ffn,
    moe_ffn_routed,
    qlinear,
    rope_qk_norm,
    spec_verify,
    topk_softmax,
)

__version__ = "0.1.0"


def built_with_cuda() -> bool:
    """Whether this build of pearlmoe compiled its CUDA kernels."""
    return bool(torch.ops.pearlmoe.built_with_cuda())


__all__ = [
    "attention",
    "built_with_cuda",
    "dequantize",
    "from_pretrained",
    "generate",
    "generate_stream",
    "grouped_gemm",
    "grouped_topk",
    "linear",
    "moe_align",
    "moe_ffn",
    "moe_ffn_routed",
    "ops",
    "qlinear",
    "reference",
    "rope_qk_norm",
    "save_pretrained",
    "spec_verify",
    "topk_softmax",
]
