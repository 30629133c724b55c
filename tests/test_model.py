"""The model: op path vs reference path, cache consistency, checkpoint I/O, generation, estimate."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import pearlmoe
from pearlmoe.model import (
    CheckpointError,
    ModelConfig,
    Transformer,
    estimate,
    from_pretrained,
    save_pretrained,
)

MOE = dict(
    vocab_size=97, hidden_size=64, num_hidden_layers=4, num_attention_heads=8,
    num_key_value_heads=2, intermediate_size=48, num_experts=4, moe_topk=1, num_shared_expert=1,
    use_mixed_mlp_moe=True, use_cla=True, cla_share_factor=2, use_qk_norm=True,
    rope_scaling={"type": "dynamic", "alpha": 1000.0, "factor": 1.0},
)  # fmt: skip
DENSE = dict(
    model_type="llama", vocab_size=97, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=4, intermediate_size=96, tie_word_embeddings=False,
)  # fmt: skip
TOP2 = {**MOE, "moe_topk": 2, "use_mixed_mlp_moe": False, "use_cla": False}
CONFIGS = {"moe-cla-qknorm": MOE, "dense": DENSE, "top2-no-shared": TOP2}


def _model(kind: str, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**CONFIGS[kind])).eval()


@pytest.mark.parametrize("kind", CONFIGS)
def test_ops_path_matches_reference_path(kind):
    model = _model(kind)
    ids = torch.randint(0, 97, (3, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, ref = model(ids), model(ids, reference_ops=True)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", CONFIGS)
def test_incremental_decode_matches_full_forward(kind):
    model = _model(kind)
    ids = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 16)
        steps = [model(ids[:, :6], cache), model(ids[:, 6:9], cache), model(ids[:, 9:], cache)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-4)
    assert cache.seq_lens() == [10, 10]


@pytest.mark.parametrize("shard", [None, 20_000])
@pytest.mark.parametrize("kind", CONFIGS)
def test_save_load_round_trip_is_bit_exact(tmp_path, kind, shard):
    model = _model(kind)
    save_pretrained(model, tmp_path, max_shard_bytes=shard)
    loaded = from_pretrained(tmp_path, dtype=torch.float32)
    assert loaded.config == model.config
    for (name, a), (_, b) in zip(
        model.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    assert (tmp_path / "model.safetensors.index.json").exists() == (shard is not None)


def test_checkpoint_uses_hunyuan_key_names(tmp_path):
    save_pretrained(_model("moe-cla-qknorm"), tmp_path)
    keys = set(load_file(tmp_path / "model.safetensors"))
    assert "model.layers.0.mlp.gate.wg.weight" in keys
    assert "model.layers.0.mlp.experts.3.gate_proj.weight" in keys
    assert "model.layers.0.mlp.shared_mlp.down_proj.weight" in keys
    assert "model.layers.1.self_attn.key_layernorm.weight" in keys
    assert "model.layers.0.self_attn.k_proj.weight" in keys
    assert "model.layers.1.self_attn.k_proj.weight" not in keys  # CLA: odd layers reuse K/V
    assert "lm_head.weight" not in keys  # tied
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["HunYuanForCausalLM"] and config["head_dim"] == 8


def _corrupt(tmp_path, edit):
    save_pretrained(_model("moe-cla-qknorm"), tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    edit(tensors)
    save_file(tensors, str(tmp_path / "model.safetensors"))


def test_bad_checkpoints(tmp_path):
    _corrupt(tmp_path / "a", lambda t: t.pop("model.layers.2.mlp.experts.1.up_proj.weight"))
    with pytest.raises(
        CheckpointError, match=r"missing 1 tensor\(s\).*model.layers.2.mlp.experts.1.up_proj.weight"
    ):
        from_pretrained(tmp_path / "a")
    _corrupt(
        tmp_path / "b",
        lambda t: t.update({"model.layers.1.self_attn.v_proj.weight": torch.zeros(16, 64)}),
    )
    with pytest.raises(
        CheckpointError,
        match=r"1 tensor\(s\) the config does not explain: model.layers.1.self_attn.v_proj.weight",
    ):
        from_pretrained(tmp_path / "b")
    _corrupt(tmp_path / "c", lambda t: t.update({"model.norm.weight": torch.zeros(65)}))
    with pytest.raises(
        CheckpointError,
        match=r"tensor model.norm.weight has shape \(65,\), but config.json implies \(64,\)",
    ):
        from_pretrained(tmp_path / "c")

    save_pretrained(_model("moe-cla-qknorm"), tmp_path / "d")
    data = (tmp_path / "d" / "model.safetensors").read_bytes()
    (tmp_path / "d" / "model.safetensors").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(CheckpointError, match=r"model.safetensors"):
        from_pretrained(tmp_path / "d")

    save_pretrained(_model("moe-cla-qknorm"), tmp_path / "e", max_shard_bytes=20_000)
    shard = sorted((tmp_path / "e").glob("model-00002-of-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"names {shard.name}, which does not exist"):
        from_pretrained(tmp_path / "e")

    (tmp_path / "f").mkdir()
    ModelConfig(**MOE).save(tmp_path / "f" / "config.json")
    (tmp_path / "f" / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(
        CheckpointError,
        match=r"no safetensors checkpoint .* pickled .bin checkpoints are not loaded",
    ):
        from_pretrained(tmp_path / "f")

    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "config.json").write_text(
        json.dumps({"model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"]})
    )
    with pytest.raises(ValueError, match=r"unsupported model: model_type='deepseek_v3'"):
        from_pretrained(tmp_path / "g")
    (tmp_path / "g" / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    with pytest.raises(ValueError, match=r"config.json \(mixtral\): .*hidden_size"):
        from_pretrained(tmp_path / "g")
    with pytest.raises(FileNotFoundError, match=r"does not exist"):
        from_pretrained(tmp_path / "nowhere")


def test_config_round_trip_keeps_unknown_fields():
    data = {**ModelConfig(**MOE).to_dict(), "some_future_field": [1, 2]}
    config = ModelConfig.from_dict(data)
    assert config.to_dict() == data
    assert config.rope_base == pytest.approx(1e4 * 1000.0 ** (8 / 6))


def test_generate_greedy_batched_ragged_eos_and_stream():
    model = _model("moe-cla-qknorm", seed=3)
    prompts = [[1, 2, 3], [5, 6, 7, 8, 9, 10], [4]]
    batched = pearlmoe.generate(model, prompts, 8)
    singles = [pearlmoe.generate(model, [p], 8)[0] for p in prompts]
    assert batched == singles and all(len(o) == 8 for o in batched)
    assert pearlmoe.generate(model, prompts, 8) == batched  # deterministic

    eos = batched[1][2]
    streamed = []
    stopped = pearlmoe.generate(model, prompts, 8, eos_token_id=eos, callback=streamed.append)
    assert stopped[1] == batched[1][: batched[1].index(eos) + 1]
    assert len(streamed) == max(len(o) for o in stopped)
    assert [[s[b] for s in streamed if s[b] is not None] for b in range(3)] == stopped


def test_generate_sampling_is_reproducible():
    model = _model("dense", seed=4)
    runs = [
        pearlmoe.generate(
            model,
            [[1, 2]],
            10,
            temperature=1.0,
            top_k=20,
            top_p=0.9,
            generator=torch.Generator().manual_seed(7),
        )
        for _ in range(2)
    ]
    assert runs[0] == runs[1]


def test_estimate_hunyuan_large():
    config = ModelConfig(
        vocab_size=128512, hidden_size=6400, num_hidden_layers=64, num_attention_heads=80,
        num_key_value_heads=8, intermediate_size=18304, num_experts=16, moe_topk=1,
        num_shared_expert=1, use_mixed_mlp_moe=True, use_cla=True, cla_share_factor=2,
        use_qk_norm=True, rope_scaling={"type": "dynamic", "alpha": 100000.0, "factor": 1.0},
        max_position_embeddings=262144,
    )  # fmt: skip
    est = estimate(config)
    assert est.total_params / 1e9 == pytest.approx(389, rel=0.01)
    assert est.active_params / 1e9 == pytest.approx(52, rel=0.02)
    assert est.kv_bytes_per_token == 81920
    assert config.rope_base == pytest.approx(1.343e9, rel=1e-3)
