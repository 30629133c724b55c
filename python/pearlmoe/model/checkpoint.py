"""Checkpoint I/O in the HF safetensors format of tencent/Tencent-Hunyuan-Large (single file or
sharded with model.safetensors.index.json). Nothing is ever unpickled.

Expert weights are packed into the op layouts on load (w13[e] = [gate_proj; up_proj]) and
unpacked on save, so a save → load round trip is bit-exact.
"""

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from .config import ModelConfig
from .transformer import DenseMLP, MoE, Transformer

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that does not match its config or is damaged."""


_GATE_UP_DOWN = ("gate_proj", "up_proj", "down_proj")
# model_type -> the q/k norms' names; (router, experts prefix, expert gate/up/down, shared prefix)
_QK_NORMS = {"hunyuan": ("query_layernorm", "key_layernorm"),
             "hunyuan_v1_moe": ("query_layernorm", "key_layernorm")}  # fmt: skip
_MOE_NAMES = {
    "hunyuan": (
        "mlp.gate.wg",
        "mlp.experts.",
        _GATE_UP_DOWN,
        "mlp.shared_mlp.",
    ),
    "mixtral": ("block_sparse_moe.gate", "block_sparse_moe.experts.", ("w1", "w3", "w2"), None),
    "qwen2_moe": (
        "mlp.gate",
        "mlp.experts.",
        _GATE_UP_DOWN,
        "mlp.shared_expert.",
    ),
}
_MOE_NAMES["hunyuan_v1_moe"] = _MOE_NAMES["hunyuan"]
_MOE_NAMES["qwen3_moe"] = _MOE_NAMES["olmoe"] = _MOE_NAMES["qwen2_moe"]
_MOE_NAMES["glm4_moe"] = ("mlp.gate", "mlp.experts.", _GATE_UP_DOWN, "mlp.shared_experts.")


def hf_tensors(model: Transformer) -> Iterator[tuple[str, Tensor]]:
    """The model's tensors under their HF names (views into the packed parameters), in the
    naming of its family (Hunyuan, Llama, Mixtral, Qwen2/3(-MoE), OLMoE)."""
    c = model.config
    yield "model.embed_tokens.weight", model.embed_tokens
    if model.vocab_ids is not None:
        yield "model.vocab_ids", model.vocab_ids
    q_norm, k_norm = _QK_NORMS.get(c.model_type, ("q_norm", "k_norm"))
    router, experts, expert_names, shared = _MOE_NAMES.get(c.model_type, _MOE_NAMES["hunyuan"])
    for i, block in enumerate(model.layers):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", block.input_layernorm.weight
        yield p + "post_attention_layernorm.weight", block.post_attention_layernorm.weight
        attn = block.self_attn
        yield p + "self_attn.q_proj.weight", attn.q_proj
        if attn.owns_kv:
            yield p + "self_attn.k_proj.weight", attn.k_proj
            yield p + "self_attn.v_proj.weight", attn.v_proj
        yield p + "self_attn.o_proj.weight", attn.o_proj
        if c.qkv_bias:
            yield p + "self_attn.q_proj.bias", attn.q_bias
            if attn.owns_kv:
                yield p + "self_attn.k_proj.bias", attn.k_bias
                yield p + "self_attn.v_proj.bias", attn.v_bias
        if c.o_bias:
            yield p + "self_attn.o_proj.bias", attn.o_bias
        if c.use_qk_norm:
            yield p + f"self_attn.{q_norm}.weight", attn.query_layernorm
            yield p + f"self_attn.{k_norm}.weight", attn.key_layernorm
        mlp = block.mlp
        if isinstance(mlp, MoE):
            yield p + router + ".weight", mlp.router
            if mlp.correction_bias is not None:
                yield p + router + ".e_score_correction_bias", mlp.correction_bias
            inter = c.expert_intermediate_size
            for e in range(mlp.w13.shape[0]):  # this rank's experts under expert parallelism
                name = p + f"{experts}{mlp.expert_offset + e}."
                yield from _swiglu(name, mlp.w13[e], mlp.w2[e], inter, expert_names)
            if mlp.shared_w13 is not None:
                yield from _swiglu(p + shared, mlp.shared_w13, mlp.shared_w2,
                                   c.shared_intermediate_size)  # fmt: skip
            if mlp.shared_gate is not None:
                yield p + "mlp.shared_expert_gate.weight", mlp.shared_gate
        else:
            assert isinstance(mlp, DenseMLP)
            yield from _swiglu(p + "mlp.", mlp.w13, mlp.w2, c.intermediate_size)
    yield "model.norm.weight", model.norm.weight
    if model.lm_head is not None:
        yield "lm_head.weight", model.lm_head


def _expert_index(name: str) -> int | None:
    """The routed expert a tensor name belongs to (….experts.{e}.…), else None."""
    _, sep, rest = name.partition(".experts.")
    index = rest.split(".", 1)[0]
    return int(index) if sep and index.isdigit() else None


def _swiglu(
    prefix: str, w13: Tensor, w2: Tensor, inter: int, names: tuple[str, ...] = _GATE_UP_DOWN
) -> Iterator[tuple[str, Tensor]]:
    gate, up, down = names
    yield prefix + gate + ".weight", w13[:inter]
    yield prefix + up + ".weight", w13[inter:]
    yield prefix + down + ".weight", w2


def _shards(directory: Path) -> dict[str, Path]:
    """tensor name -> file holding it."""
    index = directory / INDEX
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise CheckpointError(f"{index}: not a valid safetensors index ({err})") from None
        # Shards are checked when first needed: an expert-parallel rank needs only its own.
        return {name: directory / file for name, file in weight_map.items()}
    single = directory / SINGLE
    if not single.exists():
        raise CheckpointError(
            f"no safetensors checkpoint in {directory} (expected {SINGLE} or {INDEX}; "
            "pickled .bin checkpoints are not loaded)"
        )
    return {}  # filled from the file's own key list


def _open(file: Path):
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise CheckpointError(f"{file}: not a readable safetensors file ({err})") from None


def load_tensors(
    model: Transformer, get, available: set[str], source: str, ignored: set[str] = frozenset(),
    config_source: str = "config.json",
) -> None:  # fmt: skip
    """Copy every tensor the model has (its HF names, ``hf_tensors``) from ``get(name)`` (None
    when absent), checking shapes; names in ``available`` that the model does not use, other than
    ``ignored``, are an error, as are the ones it needs and ``get`` lacks."""
    config = model.config
    missing, used = [], set()
    with torch.no_grad():
        for name, target in hf_tensors(model):
            tensor = get(name)
            if tensor is None:
                missing.append(name)
                continue
            if tuple(tensor.shape) != tuple(target.shape):
                raise CheckpointError(
                    f"tensor {name} has shape {tuple(tensor.shape)}, but {config_source} implies "
                    f"{tuple(target.shape)}"
                )
            if target is model.vocab_ids:
                model.set_vocab(tensor)  # also rebuilds the token -> row map
            else:
                target.copy_(tensor)
            used.add(name)
    if config.tie_word_embeddings:
        used.add("lm_head.weight")  # tied checkpoints may still carry it
    unexpected = sorted(
        n for n in available - used - ignored if not n.endswith("rotary_emb.inv_freq")
    )
    if missing:
        raise CheckpointError(
            f"checkpoint {source} is missing {len(missing)} tensor(s) the config needs: "
            + ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
        )  # fmt: skip
    if unexpected:
        raise CheckpointError(
            f"checkpoint {source} has {len(unexpected)} tensor(s) the config does not "
            "explain: " + ", ".join(unexpected[:8]) + (" ..." if len(unexpected) > 8 else "")
        )  # fmt: skip


def from_pretrained(
    directory: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    expert_parallel=None,
    quantized: bool = False,
) -> Transformer:
    """Load a checkpoint directory (config.json + safetensors), a llama-family GGUF file
    (pearlmoe.model.gguf_checkpoint) or a named model ("smollm2-135m": pearlmoe.model.named) into
    a Transformer. ``quantized`` (GGUF only) keeps the file's Q4_0/Q4_1/Q8_0 projections in their
    blocks (ops.qlinear) instead of expanding them to ``dtype``. With an ``expert_parallel`` plan
    (pearlmoe.distributed.ExpertParallel) only this rank's routed experts are built and read;
    shard files holding none of its tensors are never opened."""
    from .gguf_checkpoint import from_gguf, is_gguf
    from .named import resolve

    directory = resolve(directory)  # a known name (pearlmoe.model.named) or a path
    if is_gguf(directory):
        if expert_parallel is not None:
            raise ValueError("from_pretrained: a GGUF file holds a dense model, no experts")
        return from_gguf(directory, dtype=dtype, device=device, quantized=quantized)
    if quantized:
        raise ValueError(
            f"from_pretrained: quantized=True keeps a GGUF file's blocks; {directory} is not a "
            "GGUF file"
        )
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
    config = ModelConfig.from_file(directory)
    with torch.device("meta"):
        model = Transformer(config, dtype=dtype)
    if expert_parallel is not None:
        from ..distributed.expert_parallel import shard_experts

        shard_experts(model, expert_parallel)
    model = model.to_empty(device=device)

    files = _shards(directory)
    handles = {}
    if not files:
        handle = _open(directory / SINGLE)
        handles[directory / SINGLE] = handle
        files = dict.fromkeys(handle.keys(), directory / SINGLE)

    def get(name: str) -> Tensor | None:
        if name not in files:
            return None
        file = files[name]
        if file not in handles:
            if not file.exists():
                index = directory / INDEX
                raise CheckpointError(f"{index} names {file.name}, which does not exist")
            handles[file] = _open(file)
        try:
            return handles[file].get_tensor(name)
        except Exception as err:
            raise CheckpointError(f"{file}: cannot read tensor {name} ({err})") from None

    # GLM-4.5 checkpoints carry multi-token-prediction layers after the last one (HF skips them).
    ignored: set[str] = set()
    if config.model_type == "glm4_moe":
        layer = (n.split(".")[2] for n in files if n.startswith("model.layers."))
        extra = {int(i) for i in layer if i.isdigit() and int(i) >= config.num_hidden_layers}
        ignored = {n for n in files if any(n.startswith(f"model.layers.{i}.") for i in extra)}
    if expert_parallel is not None:  # the other ranks' experts
        others = set(range(config.num_experts)) - set(
            range(expert_parallel.first, expert_parallel.last)
        )
        ignored |= {n for n in files if _expert_index(n) in others}
    load_tensors(model, get, set(files), str(directory), ignored)
    return model.eval()


def save_pretrained(
    model: Transformer, directory: str | Path, max_shard_bytes: int | None = None
) -> None:
    """Write config.json and the weights under their HF names, sharded when max_shard_bytes is
    given (with model.safetensors.index.json)."""
    from .quantized import is_quantized

    if is_quantized(model):
        raise ValueError("save_pretrained: the model keeps GGUF blocks (quantized=True); "
                         "load it without quantized to save it")  # fmt: skip
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save(directory / "config.json")
    tensors = {name: t.detach().contiguous().cpu() for name, t in hf_tensors(model)}
    if max_shard_bytes is None:
        save_file(tensors, str(directory / SINGLE), metadata={"format": "pt"})
        return
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX).write_text(json.dumps(index, indent=2) + "\n")
