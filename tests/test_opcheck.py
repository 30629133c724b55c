"""torch.library.opcheck over every op with representative sample inputs."""

import pytest
import torch

import pearlmoe  # noqa: F401
from conftest import DEVICES

_ops = torch.ops.pearlmoe


def _samples(device):
    logits = torch.randn(7, 16, device=device)
    return [
        ("topk_softmax-top1", _ops.topk_softmax.default, (logits, 1, False)),
        ("topk_softmax-top2-renorm", _ops.topk_softmax.default, (logits, 2, True)),
        (
            "topk_softmax-grad",
            _ops.topk_softmax.default,
            (logits.clone().requires_grad_(), 2, False),
        ),
        ("topk_softmax-empty", _ops.topk_softmax.default, (logits[:0], 2, False)),
        ("moe_align", _ops.moe_align.default, (torch.randint(-1, 16, (7, 2), device=device), 16)),
        (
            "moe_align-int32",
            _ops.moe_align.default,
            (torch.randint(0, 16, (7, 2), device=device, dtype=torch.int32), 16),
        ),
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("index", range(6))
def test_opcheck(device, index):
    _name, op, args = _samples(device)[index]
    torch.library.opcheck(op, args)
