"""Model configuration in the HF ``config.json`` schema of tencent/Tencent-Hunyuan-Large (which
also reads HF's ``hunyuan_v1_moe`` and dense Llama configs), and the size estimate."""

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .kv_cache import KVCache

# model_type -> the architecture name written back.
SUPPORTED = {
    "hunyuan": "HunYuanForCausalLM",
    "hunyuan_v1_moe": "HunYuanMoEV1ForCausalLM",
    "llama": "LlamaForCausalLM",
}


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
    extra: dict = field(default_factory=dict)  # other config.json fields, written back as they were

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED:
            raise ValueError(
                f"unsupported model_type {self.model_type!r}: pearlmoe runs "
                f"{', '.join(sorted(SUPPORTED))} (Hunyuan-Large, Hunyuan MoE v1, dense Llama)"
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

    @property
    def shared_intermediate_size(self) -> int:
        """Width of the shared expert (intermediate_size · num_shared_expert), 0 if none."""
        if not self.is_moe or not self.use_mixed_mlp_moe:
            return 0
        return self.intermediate_size * max(1, self.num_shared_expert)

    @property
    def renormalize(self) -> bool:
        """Hunyuan-Large combines top-1 with the raw probability and renormalises top-k > 1;
        HF's hunyuan_v1_moe renormalises always (a top-1 weight of 1)."""
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
        data = asdict(self)
        extra = data.pop("extra")
        data["architectures"] = [SUPPORTED[self.model_type]]
        if not self.use_cla:
            data.pop("cla_share_factor")
        return {**extra, **data}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")


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
    hidden, d = c.hidden_size, c.head_dim
    attn_q_o = 2 * hidden * c.num_attention_heads * d
    attn_kv = 2 * hidden * c.num_key_value_heads * d
    norms = 2 * hidden + (2 * d if c.use_qk_norm else 0)
    expert = 3 * hidden * c.intermediate_size
    total = active = 0
    for layer in range(c.num_hidden_layers):
        base = attn_q_o + (attn_kv if c.owns_kv(layer) else 0) + norms
        if c.is_moe:
            shared = 3 * hidden * c.shared_intermediate_size
            router = c.num_experts * hidden
            total += base + router + shared + c.num_experts * expert
            active += base + router + shared + c.moe_topk * expert
        else:
            total += base + expert
            active += base + expert
    embed = c.vocab_size * hidden
    head = 0 if c.tie_word_embeddings else embed
    total += embed + head + hidden
    active += embed + head + hidden
    kv_values = (
        KVCache.bytes_per_token(c.num_hidden_layers, c.num_key_value_heads, d, c.cla_share_factor)
        // 2
    )  # values per token (bytes_per_token counts bf16)
    return Estimate(total, active, kv_values * kv_dtype_bytes)
