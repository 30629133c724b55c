"""Random but valid GGUF blocks (finite fp16 scales, any q) for the qlinear tests."""

import torch

from pearlmoe.reference import GGUF_BLOCK_BYTES

FORMATS = list(GGUF_BLOCK_BYTES)


def random_blocks(n: int, k: int, format: str, g: torch.Generator) -> torch.Tensor:
    """[n, k/32 * bytes] uint8: q uniform over its range, d in [0.005, 0.05), Q4_1's m in
    [-0.2, 0.2), the way quantised weights of a trained layer look."""
    size = GGUF_BLOCK_BYTES[format]
    blocks = torch.randint(0, 256, (n, k // 32, size), dtype=torch.uint8, generator=g)
    d = (torch.rand(n, k // 32, 1, generator=g) * 0.045 + 0.005).half()
    blocks[..., 0:2] = d.view(torch.uint8)
    if format == "q4_1":
        m = (torch.rand(n, k // 32, 1, generator=g) * 0.4 - 0.2).half()
        blocks[..., 2:4] = m.view(torch.uint8)
    return blocks.reshape(n, k // 32 * size)
