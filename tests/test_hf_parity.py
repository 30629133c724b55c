"""Parity with HF transformers' hunyuan_v1_moe (pinned in requirements-dev.txt) on a small
random config where both define the same function: no CLA, QK-norm after RoPE, NTK-alpha RoPE,
one shared expert, renormalised top-k (HF's top-1 weight is 1, not Hunyuan-Large's raw
probability). The same safetensors file is loaded into both."""

import pytest
import torch
from transformers import HunYuanMoEV1Config, HunYuanMoEV1ForCausalLM

import pearlmoe
from pearlmoe.model import from_pretrained


@pytest.fixture(scope="module", params=[1, 2], ids=["top1", "top2"])
def checkpoint(request, tmp_path_factory):
    torch.manual_seed(request.param)
    config = HunYuanMoEV1Config(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4,
        moe_topk=request.param, max_position_embeddings=256, tie_word_embeddings=True,
        rope_scaling={"type": "dynamic", "alpha": 1000.0, "factor": 1.0},
    )  # fmt: skip
    hf = HunYuanMoEV1ForCausalLM(config).eval()
    with torch.no_grad():  # non-trivial norm weights, so the norms are really compared
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp(f"hf-top{request.param}")
    hf.save_pretrained(path, safe_serialization=True)
    hf = HunYuanMoEV1ForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    return hf, from_pretrained(path, dtype=torch.float32)


def test_logits_match_transformers(checkpoint):
    hf, ours = checkpoint
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = hf(ids).logits
        got = ours(ids)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_greedy_continuation_matches_transformers(checkpoint):
    hf, ours = checkpoint
    prompt = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf.generate(prompt, max_new_tokens=24, do_sample=False, pad_token_id=0)[0, 12:]
    got = pearlmoe.generate(ours, prompt, 24, eos_token_id=hf.generation_config.eos_token_id)[0]
    assert got == want.tolist()
