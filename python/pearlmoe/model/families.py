"""The MoE families' config.json dialects (transformers 4.57.6) mapped to and from pearlmoe's
``ModelConfig`` fields: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, GLM-4.5 and the dense Qwen2 /
Qwen3 used as their drafts. ``read`` turns a family's dict into ModelConfig keyword arguments (the
family's defaults for absent keys, its fixed architecture choices, its unsupported options refused);
``write`` turns a ModelConfig back into the family's keys. Keys neither side knows are carried
through by ModelConfig.extra.

Where a family's keys say the same thing as pearlmoe's they share the name (num_experts,
moe_intermediate_size, norm_topk_prob, ...); the renames are num_local_experts (Mixtral) and
num_experts_per_tok (all) -> num_experts / moe_topk, attention_bias -> qkv_bias + o_bias (GLM:
q/k/v only), and GLM's n_routed_experts -> num_experts, n_shared_experts -> a shared expert of
moe_intermediate_size · n_shared_experts.
"""

from typing import Any

ARCHITECTURES = {
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "olmoe": "OlmoeForCausalLM",
    "glm4_moe": "Glm4MoeForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}

# HF's class defaults for the keys pearlmoe reads, where config.json leaves them out.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "mixtral": dict(
        rms_norm_eps=1e-5,
        rope_theta=1e6,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=4096 * 32,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
    ),
    "qwen2_moe": dict(
        rms_norm_eps=1e-6,
        rope_theta=1e4,
        num_experts=60,
        num_experts_per_tok=4,
        moe_intermediate_size=1408,
        shared_expert_intermediate_size=5632,
        norm_topk_prob=False,
        mlp_only_layers=[],
        decoder_sparse_step=1,
        qkv_bias=True,
        max_position_embeddings=32768,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    ),
    "qwen3_moe": dict(
        rms_norm_eps=1e-6,
        rope_theta=1e4,
        num_experts=128,
        num_experts_per_tok=8,
        moe_intermediate_size=768,
        norm_topk_prob=False,
        mlp_only_layers=[],
        decoder_sparse_step=1,
        attention_bias=False,
        max_position_embeddings=32768,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    ),
    "olmoe": dict(
        rms_norm_eps=1e-5,
        rope_theta=1e4,
        num_experts=64,
        num_experts_per_tok=8,
        norm_topk_prob=False,
        attention_bias=False,
        clip_qkv=None,
        max_position_embeddings=4096,
        bos_token_id=None,
        eos_token_id=50279,
        pad_token_id=1,
    ),
    "glm4_moe": dict(
        rms_norm_eps=1e-5,
        rope_theta=1e4,
        n_routed_experts=128,
        num_experts_per_tok=8,
        moe_intermediate_size=1408,
        n_shared_experts=1,
        routed_scaling_factor=1.0,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=1,
        norm_topk_prob=True,
        use_qk_norm=False,
        attention_bias=False,
        partial_rotary_factor=0.5,
        max_position_embeddings=131072,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    ),
    "qwen2": dict(
        rms_norm_eps=1e-6,
        rope_theta=1e4,
        max_position_embeddings=32768,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    ),
    "qwen3": dict(
        rms_norm_eps=1e-6,
        rope_theta=1e4,
        attention_bias=False,
        max_position_embeddings=32768,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    ),
}
_RENAMES = {
    "num_local_experts": "num_experts",  # Mixtral
    "n_routed_experts": "num_experts",  # GLM-4.5
    "num_experts_per_tok": "moe_topk",
}
_HEAD_DIM_FIXED = {"qwen2_moe", "olmoe"}  # head_dim is always hidden / heads there
# model_type -> the ModelConfig fields it writes back besides the common ones (HF key names)
_WRITTEN = {
    "mixtral": ("num_local_experts", "num_experts_per_tok"),
    "qwen2_moe": (
        "num_experts",
        "num_experts_per_tok",
        "moe_intermediate_size",
        "shared_expert_intermediate_size",
        "norm_topk_prob",
        "mlp_only_layers",
        "decoder_sparse_step",
        "qkv_bias",
    ),
    "qwen3_moe": (
        "num_experts",
        "num_experts_per_tok",
        "moe_intermediate_size",
        "norm_topk_prob",
        "mlp_only_layers",
        "decoder_sparse_step",
        "attention_bias",
    ),
    "olmoe": ("num_experts", "num_experts_per_tok", "norm_topk_prob", "attention_bias", "clip_qkv"),
    "glm4_moe": (
        "n_routed_experts",
        "num_experts_per_tok",
        "moe_intermediate_size",
        "n_shared_experts",
        "routed_scaling_factor",
        "n_group",
        "topk_group",
        "first_k_dense_replace",
        "norm_topk_prob",
        "use_qk_norm",
        "attention_bias",
        "partial_rotary_factor",
    ),
    "qwen2": (),
    "qwen3": ("attention_bias",),
}
COMMON = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
          "num_key_value_heads", "intermediate_size", "rope_theta", "rope_scaling",
          "rms_norm_eps", "tie_word_embeddings", "max_position_embeddings", "bos_token_id",
          "eos_token_id", "pad_token_id", "torch_dtype")  # fmt: skip


def _refuse(model_type: str, data: dict) -> None:
    """Options these families have that pearlmoe does not run: an error, never ignored."""
    window = data.get("sliding_window")
    active = data.get("use_sliding_window", model_type == "mixtral")
    if window is not None and active:
        raise ValueError(
            f"config.json ({model_type}): sliding_window={window} is active; pearlmoe's attention "
            "is full-context (set sliding_window to null or use_sliding_window to false)"
        )
    scaling = data.get("rope_scaling")
    if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
        raise ValueError(f"config.json ({model_type}): rope_scaling {scaling} is not supported "
                         "for this family (only the default RoPE)")  # fmt: skip
    if model_type != "glm4_moe" and data.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"config.json ({model_type}): partial_rotary_factor "
                         f"{data['partial_rotary_factor']} is not supported")  # fmt: skip
    if data.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json ({model_type}): hidden_act {data['hidden_act']!r} is not "
                         "supported (SwiGLU with silu only)")  # fmt: skip


def read(model_type: str, data: dict) -> dict:
    """A family's config.json dict -> ModelConfig keyword arguments (unknown keys included; the
    caller moves those to extra)."""
    _refuse(model_type, data)
    out = {**_DEFAULTS[model_type], **data}
    out.setdefault("tie_word_embeddings", False)  # HF's default in every one of these families
    for old, new in _RENAMES.items():
        if old in out:
            out[new] = out.pop(old)
    if model_type == "glm4_moe":
        shared = out.pop("n_shared_experts") or 0
        out["shared_expert_intermediate_size"] = out["moe_intermediate_size"] * shared
        out["use_mixed_mlp_moe"] = shared > 0
        out["router"] = "sigmoid_grouped"
        out["qkv_bias"] = bool(out.pop("attention_bias"))  # o_proj never has a bias in GLM
        out["qk_norm_position"] = "before_rope"
    if "attention_bias" in out:
        out["qkv_bias"] = out["o_bias"] = bool(out.pop("attention_bias"))
    if model_type == "qwen2":
        out["qkv_bias"] = True  # Qwen2's q/k/v always have biases, o never
    for key in ("hidden_size", "num_attention_heads"):
        if not isinstance(out.get(key), int) or out[key] < 1:
            raise ValueError(f"config.json ({model_type}): {key} must be a positive integer, "
                             f"got {out.get(key)!r}")  # fmt: skip
    if model_type in _HEAD_DIM_FIXED or out.get("head_dim") is None:
        out["head_dim"] = out["hidden_size"] // out["num_attention_heads"]
    if out.get("num_key_value_heads") is None:
        out["num_key_value_heads"] = out["num_attention_heads"]
    if model_type == "mixtral":
        out["norm_topk_prob"] = True  # Mixtral always renormalises its top-k
    if model_type in ("qwen3_moe", "qwen3"):
        out["use_qk_norm"], out["qk_norm_position"] = True, "before_rope"
    if model_type == "olmoe":
        out["use_qk_norm"], out["qk_norm_position"] = True, "whole"
    if model_type in ("qwen2", "qwen3"):
        out["num_experts"] = 0
    if model_type == "qwen2_moe":
        out["use_mixed_mlp_moe"] = out["shared_expert_intermediate_size"] > 0
        out["shared_expert_gate"] = out["use_mixed_mlp_moe"]
    return out


def write(config) -> dict:
    """A ModelConfig of one of these families -> its config.json keys (extra not included)."""
    c = config
    out = {k: getattr(c, k) for k in COMMON}
    out["model_type"] = c.model_type
    out["architectures"] = [ARCHITECTURES[c.model_type]]
    if c.model_type not in _HEAD_DIM_FIXED:
        out["head_dim"] = c.head_dim
    values = {"num_local_experts": c.num_experts, "num_experts": c.num_experts,
              "n_routed_experts": c.num_experts, "num_experts_per_tok": c.moe_topk,
              "attention_bias": c.qkv_bias if c.model_type == "glm4_moe" else c.o_bias,
              "n_shared_experts": (c.shared_intermediate_size // c.moe_intermediate_size
                                   if c.moe_intermediate_size else 0)}  # fmt: skip
    for key in _WRITTEN[c.model_type]:
        out[key] = values[key] if key in values else getattr(c, key)
    return out
