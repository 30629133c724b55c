"""The MoE families people deploy, against transformers 4.57.6 itself: tiny random models of each
family with the awkward options on (odd top-k, unnormalised top-k, dense layers mixed in, q/k/v
biases, QK-norm before RoPE or over the whole projection, clip_qkv, a gated shared expert,
head_dim != hidden / heads, untied heads), saved by transformers, loaded by pearlmoe: logits
within 1e-4 relative in fp32, greedy continuations identical, saved back and read by transformers
again; speculative and PEARL greedy output equal to autoregressive with a dense draft."""

import json

import pytest
import torch

import pearlmoe
from pearlmoe.decode import pearl_generate, speculative_generate
from pearlmoe.model import ModelConfig, from_pretrained, save_pretrained
from pearlmoe.model.config import estimate

transformers = pytest.importorskip("transformers")

VOCAB = 96
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256, tie_word_embeddings=False)  # fmt: skip
FAMILIES = {
    "mixtral": dict(
        num_hidden_layers=2,
        intermediate_size=40,
        num_local_experts=5,
        num_experts_per_tok=3,
        head_dim=12,
        rope_theta=1e6,
    ),
    "qwen2_moe": dict(
        num_hidden_layers=3,
        intermediate_size=56,
        num_experts=6,
        num_experts_per_tok=3,
        moe_intermediate_size=24,
        shared_expert_intermediate_size=40,
        norm_topk_prob=False,
        mlp_only_layers=[1],
        qkv_bias=True,
    ),
    "qwen3_moe": dict(
        num_hidden_layers=3,
        intermediate_size=48,
        num_experts=5,
        num_experts_per_tok=3,
        moe_intermediate_size=20,
        norm_topk_prob=True,
        decoder_sparse_step=2,
        head_dim=16,
        attention_bias=True,
    ),
    "olmoe": dict(
        num_hidden_layers=2,
        intermediate_size=24,
        num_experts=6,
        num_experts_per_tok=3,
        norm_topk_prob=False,
        attention_bias=True,
        clip_qkv=1.5,
    ),
    "glm4_moe": dict(
        num_hidden_layers=3,
        intermediate_size=56,
        n_routed_experts=8,
        num_experts_per_tok=3,
        moe_intermediate_size=20,
        n_shared_experts=1,
        routed_scaling_factor=2.5,
        n_group=4,
        topk_group=2,
        first_k_dense_replace=1,
        norm_topk_prob=True,
        use_qk_norm=True,
        attention_bias=True,
        partial_rotary_factor=0.5,
        head_dim=16,
    ),
    "qwen2": dict(num_hidden_layers=2, intermediate_size=48, tie_word_embeddings=True),
    "qwen3": dict(num_hidden_layers=2, intermediate_size=48, head_dim=16, attention_bias=True),
}
PROMPTS = [[1, 5, 9, 17, 33], [2, 90, 4]]


def hf_model(family: str, seed: int = 0, **overrides):
    """A random fp32 transformers model of the family, weights large enough that greedy choices
    are far from ties, norms and biases away from their 1 / 0 initial values."""
    config_cls = transformers.AutoConfig.for_model(family, **{**COMMON, **FAMILIES[family],
                                                              **overrides})  # fmt: skip
    config_cls._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config_cls).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.uniform_(0.7, 1.3)
            elif name.endswith("bias"):
                p.normal_(0, 0.3)
            else:
                p.normal_(0, 1.5 * p.shape[-1] ** -0.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # GLM: steers the choice of experts
                b.normal_(0, 0.2)
    return model


@pytest.fixture(scope="module", params=list(FAMILIES))
def pair(request, tmp_path_factory):
    family = request.param
    hf = hf_model(family)
    directory = tmp_path_factory.mktemp(family)
    hf.save_pretrained(directory, safe_serialization=True)
    return family, hf, directory, from_pretrained(directory, dtype=torch.float32)


def test_logits_match_transformers(pair):
    _, hf, _, model = pair
    ids = torch.tensor([PROMPTS[0] * 3])
    with torch.no_grad():
        want = hf(ids).logits
    got = model(ids)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    got_ref = model(ids, reference_ops=True)
    assert (got_ref - want).abs().max() <= 1e-4 * want.abs().max()
    if model.config.router == "softmax":  # the training forward too (GLM's router: inference only)
        train, _ = model.forward_train(ids)
        assert (train - want).abs().max() <= 1e-4 * want.abs().max()


def test_greedy_continuation_matches_transformers(pair):
    _, hf, _, model = pair
    for prompt in PROMPTS:
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                              min_new_tokens=12, pad_token_id=0)  # fmt: skip
        assert pearlmoe.generate(model, [prompt], 12) == [out[0, len(prompt) :].tolist()]


def test_save_back_reads_in_transformers(pair, tmp_path):
    family, hf, _, model = pair
    save_pretrained(model, tmp_path, max_shard_bytes=20_000)  # sharded, with an index
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == family
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    want = hf.state_dict()
    got = again.state_dict()
    assert got.keys() == want.keys()
    for name, tensor in want.items():  # the same weights, bit for bit
        assert torch.equal(got[name], tensor), name
    ids = torch.tensor([PROMPTS[1]])
    reloaded = from_pretrained(tmp_path, dtype=torch.float32)
    assert torch.equal(reloaded(ids), model(ids))


def test_parameter_count_matches_transformers(pair):
    _, hf, _, model = pair
    assert estimate(model.config).total_params == sum(p.numel() for p in hf.parameters())


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "olmoe", "qwen2_moe", "glm4_moe"])
def test_speculative_and_pearl_equal_autoregressive(family, tmp_path):
    dense = "qwen2" if family == "qwen2_moe" else "qwen3"
    for name, kind in (("target", family), ("draft", dense)):
        hf_model(kind, seed=1).save_pretrained(tmp_path / name, safe_serialization=True)
    target = from_pretrained(tmp_path / "target", dtype=torch.float64)
    draft = from_pretrained(tmp_path / "draft", dtype=torch.float64)
    want = pearlmoe.generate(target, PROMPTS, 16)
    for loop in (speculative_generate, pearl_generate):
        got, _ = loop(target, draft, PROMPTS, 16, gamma=3)
        assert got == want, loop.__name__


def test_glm_multi_token_prediction_layer_is_skipped(tmp_path):
    """GLM-4.5 checkpoints hold an extra next-token-prediction layer after the last one; like
    transformers, pearlmoe loads around it."""
    from safetensors.torch import load_file, save_file

    hf = hf_model("glm4_moe")
    hf.save_pretrained(tmp_path, safe_serialization=True)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    extra = {
        k.replace("layers.2.", "layers.3."): v.clone() for k, v in tensors.items() if ".2." in k
    }
    save_file({**tensors, **extra}, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    model = from_pretrained(tmp_path, dtype=torch.float32)
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        want = hf(ids).logits
    assert (model(ids) - want).abs().max() <= 1e-4 * want.abs().max()


def test_config_round_trip_keeps_unknown_fields():
    data = {"model_type": "qwen3_moe", **COMMON, **FAMILIES["qwen3_moe"], "rope_scaling": None,
            "some_future_field": [1, 2]}  # fmt: skip
    config = ModelConfig.from_dict(data)
    assert (config.qkv_bias, config.o_bias, config.qk_norm_position) == (True, True, "before_rope")
    assert [config.is_moe_layer(i) for i in range(3)] == [False, True, False]
    again = ModelConfig.from_dict(config.to_dict())
    assert again == config and again.extra["some_future_field"] == [1, 2]


@pytest.mark.parametrize(
    "family, change, match",
    [
        ("mixtral", {"sliding_window": 4096}, "sliding_window=4096 is active"),
        ("qwen2_moe", {"use_sliding_window": True, "sliding_window": 64}, "sliding_window"),
        ("qwen3_moe", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling"),
        ("olmoe", {"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        ("qwen3", {"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ],
)
def test_unsupported_options_are_refused(family, change, match):
    data = {"model_type": family, **COMMON, **FAMILIES[family], **change}
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_dict(data)
