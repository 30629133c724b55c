"""Shared test helpers.

Tolerance rule (by op kind):
  * integer and routing outputs (expert ids, permutations, offsets): exact equality;
  * floating outputs: the op's max error against an fp64 reference must be within 2x the error
    of the same math done by the reference in the op's own dtype, plus a small noise floor
    (FlashAttention's rule); NaN/inf positions must match exactly.

CUDA tests run only where a GPU is present; elsewhere they are skipped with that reason.
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

import pearlmoe  # noqa: F401  (registers the ops)

# tests/test_fuzz.py: "ci" is bounded and derandomized (the same cases every run); `make fuzz`
# selects "fuzz", many more cases from a random seed (printed on failure; replay with SEED=).
settings.register_profile("ci", max_examples=150, derandomize=True, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
settings.register_profile("fuzz", max_examples=5000, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)] if HAS_CUDA else ["cpu"]
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (none present)")


def assert_close_to_oracle(
    out: torch.Tensor,
    same_dtype_ref: torch.Tensor,
    oracle: torch.Tensor,
    factor: float = 2.0,
    floor: float = 1e-7,
) -> None:
    """out and same_dtype_ref are computed in the working dtype, oracle in fp64."""
    assert out.shape == oracle.shape, (out.shape, oracle.shape)
    out64, ref64, oracle = out.double().cpu(), same_dtype_ref.double().cpu(), oracle.double().cpu()
    bad = ~torch.isfinite(oracle)
    assert torch.equal(~torch.isfinite(out64), bad), "NaN/inf positions differ from the oracle"
    if out64.numel() == 0 or bad.all():
        return
    err = (out64 - oracle)[~bad].abs().max().item()
    ref_err = (ref64 - oracle)[~bad].abs().max().item()
    assert err <= factor * ref_err + floor, f"error {err:.3g} > {factor} x {ref_err:.3g} + {floor}"


def tiny_pair(vocab: int = 64, noise: float = 0.15, seed: int = 0, num_experts: int = 4):
    """A fp64 MoE + CLA + QK-norm target and a draft that is a noisy copy of it (so it agrees
    often, not always): the decoding tests' pair."""
    import copy

    from pearlmoe.model import ModelConfig, Transformer

    torch.manual_seed(seed)
    config = ModelConfig(
        vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=48, num_experts=num_experts, moe_topk=1,
        num_shared_expert=1, use_mixed_mlp_moe=True, use_cla=True, cla_share_factor=2,
        use_qk_norm=True,
    )  # fmt: skip
    target = Transformer(config, dtype=torch.float64).eval()
    with torch.no_grad():
        for p in target.parameters():
            if p.dim() >= 2:
                p.normal_(0, 1.5 * p.shape[-1] ** -0.5)  # peaky, varied predictions
    draft = copy.deepcopy(target)
    with torch.no_grad():
        for p in draft.parameters():
            if p.dim() >= 2:
                p.add_(torch.randn_like(p) * p.std() * noise)
    return target, draft


def pytest_collection_finish(session):
    """Compile the emulated-kernel drivers up front, two at a time (tests/emulation.py caches
    them by source hash, so this is free when nothing changed)."""
    if any(item.get_closest_marker("emu") for item in session.items):
        import emulation

        emulation.build_all()
