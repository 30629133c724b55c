"""grouped_topk (DeepSeek-V3 / GLM-4.5 routing) on the CPU against the golden reference and
against transformers' own Glm4MoeTopkRouter: awkward sizes (1 expert, k = E, groups of 2, 33
tokens), ties, NaN, a negative correction bias (masked groups' 0.0 keys then outrank kept
experts), and bad arguments named in the error. The CUDA kernel runs in test_emu_routing.py."""

import pytest
import torch

from pearlmoe import ops, reference

CASES = [  # experts, k, groups, topk_groups
    (1, 1, 1, 1),
    (2, 2, 1, 1),
    (6, 6, 3, 1),
    (16, 3, 4, 2),
    (33, 5, 11, 3),
    (128, 8, 1, 1),
    (160, 8, 8, 4),
    (256, 8, 8, 4),
]


@pytest.mark.parametrize(("experts", "k", "groups", "topk_groups"), CASES)
@pytest.mark.parametrize("tokens", [0, 1, 33])
def test_matches_reference(experts, k, groups, topk_groups, tokens):
    g = torch.Generator().manual_seed(experts + 7 * tokens)
    logits = torch.randn(tokens, experts, generator=g) * 3
    if tokens > 3:
        logits[1] = logits[1].round()  # ties
        logits[2, experts // 2] = float("nan")
    for bias in (None, torch.randn(experts, generator=g) * 0.1 - 0.9):
        for renormalize, scaling in ((True, 1.0), (False, 2.5)):
            args = (logits, bias, k, groups, topk_groups, renormalize, scaling)
            w, ids = ops.grouped_topk(*args)
            want_w, want_ids = reference.grouped_topk(*args)
            assert torch.equal(ids, want_ids)
            torch.testing.assert_close(w, want_w, rtol=1e-6, atol=1e-7, equal_nan=True)
            assert w.shape == (tokens, k) and ids.dtype == torch.int32


def test_masked_groups_rank_as_zero():
    """HF masks the dropped groups' keys to 0.0, not -inf: with keys all below 0 (a bias of -2),
    the masked experts outrank every kept one."""
    logits = torch.tensor([[4.0, 3.0, -1.0, -2.0]])
    bias = torch.full((4,), -2.0)
    _, ids = ops.grouped_topk(logits, bias, 2, num_groups=2, topk_groups=1)
    assert ids.tolist() == [[2, 3]]  # group 0 wins, so group 1's zeros lead


@pytest.mark.parametrize(("experts", "k", "groups", "topk_groups"), [(16, 4, 4, 2), (12, 3, 1, 1)])
def test_matches_transformers_glm4_moe_router(experts, k, groups, topk_groups):
    transformers = pytest.importorskip("transformers")
    from transformers.models.glm4_moe import modeling_glm4_moe as glm

    config = transformers.Glm4MoeConfig(
        hidden_size=24, n_routed_experts=experts, num_experts_per_tok=k, n_group=groups,
        topk_group=topk_groups, norm_topk_prob=True, routed_scaling_factor=2.5,
    )  # fmt: skip
    torch.manual_seed(0)
    router = glm.Glm4MoeTopkRouter(config)
    with torch.no_grad():
        router.weight.normal_(0, 0.5)
        router.e_score_correction_bias.normal_(0, 0.1)
    x = torch.randn(40, 24)
    with torch.no_grad():
        want_ids, want_w = router(x)
    logits = x @ router.weight.detach().T  # [T, E] fp32, as the router computes them
    w, ids = ops.grouped_topk(logits, router.e_score_correction_bias, k, groups, topk_groups,
                              True, 2.5)  # fmt: skip
    # HF's top-k is unsorted: compare per token as sets, weights matched by expert.
    order, want_order = ids.long().argsort(-1), want_ids.argsort(-1)
    assert torch.equal(ids.long().gather(1, order), want_ids.gather(1, want_order))
    torch.testing.assert_close(w.gather(1, order), want_w.gather(1, want_order))


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((torch.randn(3, 6).double(), None, 2), "router_logits must be Float"),
        ((torch.randn(3, 6), None, 7), r"k must be in \[1, num_experts=6\]"),
        ((torch.randn(3, 6), None, 2, 4), "num_groups=4 must divide the 6 experts"),
        ((torch.randn(3, 6), None, 2, 6), "groups must hold at least 2 experts"),
        ((torch.randn(3, 64), None, 2, 64), r"num_groups must be in \[1, 32\]"),
        ((torch.randn(3, 6), None, 2, 3, 4), r"topk_groups must be in \[1, num_groups=3\]"),
        ((torch.randn(3, 6), torch.zeros(6).double(), 2), "correction_bias must be Float"),
        ((torch.randn(3, 6), torch.zeros(5), 2), "correction_bias must have num_experts=6"),
    ],
)
def test_bad_arguments_name_the_op_and_argument(args, match):
    with pytest.raises(RuntimeError, match=rf"pearlmoe\.grouped_topk: {match}"):
        ops.grouped_topk(*args)
    meta = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in args]
    with pytest.raises(RuntimeError, match=rf"pearlmoe\.grouped_topk: {match}"):
        ops.grouped_topk(*meta)
