"""Model configuration in the HF ``config.json`` schema of tencent/Tencent-Hunyuan-Large (which
also reads HF's ``hunyuan_v1_moe`` and dense Llama configs), and the size estimate."""

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from . import families
from .kv_cache import KVCache

# model_type -> the architecture name written back.
SUPPORTED = {
    "hunyuan": "HunYuanForCausalLM",
    "hunyuan_v1_moe": "HunYuanMoEV1ForCausalLM",
    "llama": "LlamaForCausalLM",
    **families.ARCHITECTURES,
}
QK_NORM_POSITIONS = ("after_rope", "before_rope", "whole")
# pearlmoe's own switches for the families' variants, left out of config.json at their defaults
_VARIANT_DEFAULTS = dict(
    moe_intermediate_size=None, shared_expert_intermediate_size=None, shared_expert_gate=False,
    norm_topk_prob=None, mlp_only_layers=[], decoder_sparse_step=1, qk_norm_position="after_rope",
    qkv_bias=False, o_bias=False, clip_qkv=None, router="softmax", routed_scaling_factor=1.0,
    n_group=1, topk_group=1, first_k_dense_replace=0, partial_rotary_factor=1.0,
)  # fmt: skip
ROUTERS = ("softmax", "sigmoid_grouped")


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    model_type: str = "hunyuan"
    head_dim: int | None = None  # default hidden_size // num_attention_heads
    num_experts: int = 0  # 0: a dense SwiGLU MLP (Llama-style)
    moe_topk: int = 1
    num_shared_expert: int = 0
    use_mixed_mlp_moe: bool = False  # a shared expert beside the routed ones
    use_cla: bool = False
    cla_share_factor: int = 1
    use_qk_norm: bool = False
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"type": "dynamic", "alpha": ..., "factor": ...}
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 4096
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = 0
    torch_dtype: str = "bfloat16"
    # A draft's trimmed vocabulary (FR-Spec): the head scores only this many of the vocab_size
    # tokens (their ids in the checkpoint's "model.vocab_ids"); the others get logit -inf, and
    # input tokens outside it share one embedding row. None: the whole vocabulary.
    trimmed_vocab_size: int | None = None
    # The other MoE families' variants (pearlmoe.model.families maps their config.json keys):
    moe_intermediate_size: int | None = None  # expert width; None: intermediate_size
    shared_expert_intermediate_size: int | None = None  # None: intermediate_size · num_shared
    shared_expert_gate: bool = False  # Qwen2-MoE: shared(x) · sigmoid(x · w_gate)
    norm_topk_prob: bool | None = None  # renormalise the top-k weights; None: Hunyuan's rule
    mlp_only_layers: list[int] = field(default_factory=list)  # dense layers among MoE ones
    decoder_sparse_step: int = 1  # layer i is MoE iff (i + 1) % step == 0 (and not listed)
    qk_norm_position: str = "after_rope"  # or "before_rope" (per head), "whole" (q/k widths)
    qkv_bias: bool = False
    o_bias: bool = False
    clip_qkv: float | None = None  # OLMoE: clamp q, k, v to ±clip_qkv after the norms
    # "softmax" (top-k of the softmax) or "sigmoid_grouped" (GLM-4.5 / DeepSeek-V3: sigmoid
    # scores, a selection-only correction bias, n_group groups of which topk_group stay in play,
    # weights times routed_scaling_factor; pearlmoe.ops.grouped_topk)
    router: str = "softmax"
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    first_k_dense_replace: int = 0  # GLM: the first layers are dense
    partial_rotary_factor: float = 1.0  # GLM: RoPE on the first head_dim · factor dims only
    extra: dict = field(default_factory=dict)  # other config.json fields, written back as they were

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED:
            raise ValueError(
                f"unsupported model_type {self.model_type!r}: pearlmoe runs "
                f"{', '.join(sorted(SUPPORTED))}"
            )
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "intermediate_size"):  # fmt: skip
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"config {name} must be a positive integer, got {value!r}")
        if not isinstance(self.num_experts, int) or self.num_experts < 0:
            raise ValueError(
                f"config num_experts must be an integer >= 0, got {self.num_experts!r}"
            )
        if self.use_cla and (
            not isinstance(self.cla_share_factor, int) or self.cla_share_factor < 1
        ):
            raise ValueError(f"config cla_share_factor must be >= 1, got {self.cla_share_factor!r}")
        if self.trimmed_vocab_size is not None and not (
            isinstance(self.trimmed_vocab_size, int)
            and 1 <= self.trimmed_vocab_size <= self.vocab_size
            and self.tie_word_embeddings
        ):
            raise ValueError(
                f"config trimmed_vocab_size must be an integer in [1, vocab_size={self.vocab_size}]"
                f" with tied embeddings, got {self.trimmed_vocab_size!r}"
            )
        if self.qk_norm_position not in QK_NORM_POSITIONS:
            raise ValueError(f"config qk_norm_position must be one of {QK_NORM_POSITIONS}, got "
                             f"{self.qk_norm_position!r}")  # fmt: skip
        if self.router not in ROUTERS:
            raise ValueError(f"config router must be one of {ROUTERS}, got {self.router!r}")
        rotary = self.partial_rotary_factor
        if not (isinstance(rotary, (int, float)) and 0 < rotary <= 1):
            raise ValueError(f"config partial_rotary_factor must be in (0, 1], got {rotary!r}")
        if not isinstance(self.decoder_sparse_step, int) or self.decoder_sparse_step < 1:
            raise ValueError(f"config decoder_sparse_step must be >= 1, got "
                             f"{self.decoder_sparse_step!r}")  # fmt: skip
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.num_experts and not 1 <= self.moe_topk <= self.num_experts:
            raise ValueError(f"moe_topk={self.moe_topk} must be in [1, {self.num_experts}]")
        if self.model_type == "hunyuan_v1_moe":
            # HF's HunYuanMoEV1 (Hunyuan-A13B) has no such switches: QK-norm and one shared
            # expert of intermediate_size are always on, and there is no CLA.
            self.use_qk_norm, self.use_mixed_mlp_moe, self.num_shared_expert = True, True, 1
            self.use_cla = False
        if not self.use_cla:
            self.cla_share_factor = 1

    # ---- derived ---------------------------------------------------------------------------

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def is_moe_layer(self, layer: int) -> bool:
        """Whether a layer's MLP is the MoE one (else dense, of width intermediate_size)."""
        return (
            self.is_moe
            and layer not in self.mlp_only_layers
            and (layer + 1) % self.decoder_sparse_step == 0
            and layer >= self.first_k_dense_replace
        )

    @property
    def rotary_dim(self) -> int:
        """Head dims RoPE rotates (the first ones; GLM-4.5 rotates half)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def expert_intermediate_size(self) -> int:
        """Width of each routed expert."""
        return self.moe_intermediate_size or self.intermediate_size

    @property
    def shared_intermediate_size(self) -> int:
        """Width of the shared expert (Hunyuan: intermediate_size · num_shared_expert), 0 if
        none."""
        if not self.is_moe or not self.use_mixed_mlp_moe:
            return 0
        if self.shared_expert_intermediate_size is not None:
            return self.shared_expert_intermediate_size
        return self.intermediate_size * max(1, self.num_shared_expert)

    @property
    def renormalize(self) -> bool:
        """Whether the top-k weights are divided by their sum: the family's norm_topk_prob
        (Mixtral: always). Hunyuan-Large combines top-1 with the raw probability and
        renormalises top-k > 1; HF's hunyuan_v1_moe renormalises always (a top-1 weight of 1)."""
        if self.norm_topk_prob is not None:
            return self.norm_topk_prob
        return self.model_type == "hunyuan_v1_moe" or self.moe_topk > 1

    @property
    def rope_base(self) -> float:
        """theta, or with NTK-alpha scaling theta · alpha^(D / (D - 2))."""
        scaling = self.rope_scaling or {}
        alpha = scaling.get("alpha")
        if scaling.get("type", scaling.get("rope_type")) == "dynamic" and alpha:
            return self.rope_theta * alpha ** (self.head_dim / (self.head_dim - 2))
        return self.rope_theta

    def owns_kv(self, layer: int) -> bool:
        """Whether a layer has k/v projections (the first of its CLA group)."""
        return layer % self.cla_share_factor == 0

    # ---- config.json -----------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        if not isinstance(data, dict):
            raise ValueError(f"config.json must hold a JSON object, got {type(data).__name__}")
        data = dict(data)
        archs = data.pop("architectures", None) or []
        model_type = data.get("model_type")
        if model_type not in SUPPORTED:
            raise ValueError(
                f"unsupported model: model_type={model_type!r}, architectures={archs}; pearlmoe "
                f"runs {', '.join(sorted(SUPPORTED.values()))}"
            )
        if model_type in families.ARCHITECTURES:
            data = families.read(model_type, data)
        elif "attention_bias" in data:  # Llama's and Hunyuan's: q, k, v and o
            data["qkv_bias"] = data["o_bias"] = bool(data.pop("attention_bias"))
        if model_type == "llama" and data.get("mlp_bias"):
            raise ValueError("config.json (llama): mlp_bias=true is not supported")
        names = {f.name for f in fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names}
        if model_type == "llama":
            known.pop("num_experts", None)
        try:
            return cls(**known, extra=extra)
        except TypeError as err:  # a required field missing, or a field of the wrong kind
            raise ValueError(f"config.json ({model_type}): {err}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"no config.json at {path}") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from None
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        if self.model_type in families.ARCHITECTURES:
            return {**self.extra, **families.write(self)}
        data = asdict(self)
        extra = data.pop("extra")
        for key, default in _VARIANT_DEFAULTS.items():
            if data[key] == default:
                data.pop(key)
        qkv_bias, o_bias = data.pop("qkv_bias", False), data.pop("o_bias", False)
        if qkv_bias or o_bias:
            if not (qkv_bias and o_bias):
                raise ValueError(f"{self.model_type}: biases on q/k/v and o go together")
            data["attention_bias"] = True
        data["architectures"] = [SUPPORTED[self.model_type]]
        if not self.use_cla:
            data.pop("cla_share_factor")
        if self.trimmed_vocab_size is None:
            data.pop("trimmed_vocab_size")
        return {**extra, **data}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")


@dataclass
class LayerParams:
    attention: int  # projections, their biases, the layer's norms
    shared: int  # router, shared expert and its gate, or the dense MLP
    routed: int  # all routed experts
    routed_active: int  # the top-k of them a token uses


def layer_params(c: ModelConfig, layer: int) -> LayerParams:
    """One decoder layer's parameter counts, every family's variants included."""
    h, d, hq, hkv = c.hidden_size, c.head_dim, c.num_attention_heads, c.num_key_value_heads
    attention = 2 * h * hq * d + 2 * h  # q, o, the two norms
    if c.owns_kv(layer):
        attention += 2 * h * hkv * d
    if c.use_qk_norm:
        attention += (hq + hkv) * d if c.qk_norm_position == "whole" else 2 * d
    if c.qkv_bias:
        attention += (hq + 2 * hkv) * d
    if c.o_bias:
        attention += h
    if not c.is_moe_layer(layer):
        return LayerParams(attention, 3 * h * c.intermediate_size, 0, 0)
    shared = c.num_experts * h + 3 * h * c.shared_intermediate_size
    shared += h if c.shared_expert_gate else 0
    expert = 3 * h * c.expert_intermediate_size
    return LayerParams(attention, shared, c.num_experts * expert, c.moe_topk * expert)


def embedding_params(c: ModelConfig) -> int:
    """The embedding, the untied head if any, and the final norm (a trimmed vocabulary's V' + 1
    rows)."""
    rows = c.trimmed_vocab_size + 1 if c.trimmed_vocab_size else c.vocab_size
    return rows * c.hidden_size * (1 if c.tie_word_embeddings else 2) + c.hidden_size


@dataclass
class Estimate:
    total_params: int
    active_params: int  # per token: everything but the routed experts not chosen
    kv_bytes_per_token: int

    def __str__(self) -> str:
        total, active = self.total_params / 1e9, self.active_params / 1e9
        kv = self.kv_bytes_per_token
        return f"{total:.2f}B parameters, {active:.2f}B active per token, {kv:,} KV bytes/token"


def estimate(config: ModelConfig, kv_dtype_bytes: int = 2) -> Estimate:
    """Total and active parameters and KV-cache bytes per token (GQA heads, one cache per CLA
    group). Hunyuan-Large: ≈ 389B total, ≈ 52B active, 81,920 B/token in bf16."""
    c = config
    total = active = 0
    for layer in range(c.num_hidden_layers):
        p = layer_params(c, layer)
        total += p.attention + p.shared + p.routed
        active += p.attention + p.shared + p.routed_active
    total += embedding_params(c)
    active += embedding_params(c)
    kv_values = (
        KVCache.bytes_per_token(
            c.num_hidden_layers, c.num_key_value_heads, c.head_dim, c.cla_share_factor
        )
        // 2
    )  # values per token (bytes_per_token counts bf16)
    return Estimate(total, active, kv_values * kv_dtype_bytes)
