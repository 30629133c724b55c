"""A small CUDA workload for compute-sanitizer (bench/device_check.sh): every routing kernel on
awkward sizes, checked against the reference so a wrong answer fails too."""

import torch

import pearlmoe
from pearlmoe import reference


def main() -> None:
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    torch.manual_seed(0)
    for num_tokens, num_experts, k in [(1, 1, 1), (3, 16, 1), (33, 257, 8), (1025, 16, 2)]:
        logits = torch.randn(num_tokens, num_experts, device="cuda")
        weights, ids = pearlmoe.topk_softmax(logits, k, renormalize=k > 1)
        ref_w, ref_ids = reference.topk_softmax(logits.cpu(), k, renormalize=k > 1)
        assert torch.equal(ids.cpu(), ref_ids)
        torch.testing.assert_close(weights.cpu(), ref_w, rtol=1e-5, atol=1e-7)
        dropped = torch.where(torch.rand(ids.shape, device="cuda") < 0.1, -1, ids)
        for got, want in zip(
            pearlmoe.moe_align(dropped, num_experts),
            reference.moe_align(dropped.cpu(), num_experts),
            strict=True,
        ):
            assert torch.equal(got.cpu(), want)
    torch.cuda.synchronize()
    print("sanitize case: ok")


if __name__ == "__main__":
    main()
