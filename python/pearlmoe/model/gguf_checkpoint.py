"""llama.cpp's GGUF files of the Llama family as pearlmoe checkpoints: the config from the file's
metadata, every tensor dequantised by the ``gguf`` package (F32, F16, BF16, Q8_0, Q4_0, Q4_1,
Q5_*, the K-quants: whatever it dequantises) and cast to the model's dtype, the query and key
rows put back in the rotate-half order pearlmoe's RoPE uses, and the tokenizer rebuilt from the
metadata. Nothing is fetched; the ``gguf`` package (pure Python + numpy) is only imported here.

llama.cpp's converter interleaves each head's query/key rows (it rotates adjacent pairs, HF
rotates the two halves); ``_unpermute`` is the inverse of its ``permute``.

Shape letters: V vocabulary, H hidden, Hq/Hkv heads, D head dim.
"""

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import CheckpointError, load_tensors
from .config import ModelConfig
from .quantized import FORMATS, QuantizedWeight, replace_weight
from .transformer import Transformer

ARCHITECTURES = ("llama",)
_TOP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_MISSING = object()


def is_gguf(path: str | Path) -> bool:
    path = Path(path)
    return path.suffix.lower() == ".gguf" and path.is_file()


# Parsed files, newest last: opening SmolLM2's took 2.7 s of parsing its header (the tokenizer,
# the config and the tensors each open the file). Keyed by the file's identity and version, so
# a changed file is parsed again; the readers only read (a read-only memory map).
_READERS: "OrderedDict[tuple, Any]" = OrderedDict()
_KEEP_READERS = 2
_READERS_LOCK = threading.Lock()


def _reader(path: Path):
    try:
        import gguf
    except ImportError:
        raise ImportError(
            f"reading {path} needs the gguf package: pip install gguf (pure Python + numpy)"
        ) from None
    try:
        st = path.stat()
        key = (str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        with _READERS_LOCK:
            reader = _READERS.get(key)
        if reader is None:
            reader = gguf.GGUFReader(path)
        with _READERS_LOCK:
            _READERS[key] = reader
            _READERS.move_to_end(key)
            while len(_READERS) > _KEEP_READERS:
                _READERS.popitem(last=False)
        return reader
    except Exception as err:  # the reader raises ValueError, struct.error, OSError, ...
        raise CheckpointError(f"{path}: not a readable GGUF file ({err})") from None


def _field(reader, key: str, default: Any = _MISSING) -> Any:
    field = reader.get_field(key)
    if field is None:
        if default is _MISSING:
            raise CheckpointError(f"GGUF metadata lacks {key}")
        return default
    return field.contents()


def read_config(path: str | Path, reader=None) -> ModelConfig:
    """The ModelConfig a GGUF file's metadata describes (a dense Llama)."""
    path = Path(path)
    reader = reader or _reader(path)
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise CheckpointError(
            f"{path}: GGUF architecture {arch!r} is not supported (pearlmoe reads "
            f"{', '.join(ARCHITECTURES)})"
        )
    scaling = _field(reader, f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", None):
        raise CheckpointError(f"{path}: RoPE scaling {scaling!r} is not supported")
    hidden = int(_field(reader, f"{arch}.embedding_length"))
    heads = int(_field(reader, f"{arch}.attention.head_count"))
    tokens = _field(reader, "tokenizer.ggml.tokens", None)
    vocab = _field(reader, f"{arch}.vocab_size", None) or (len(tokens) if tokens else None)
    if vocab is None:
        raise CheckpointError(f"{path}: GGUF metadata gives no vocabulary size")
    names = {t.name for t in reader.tensors}
    eos = _field(reader, "tokenizer.ggml.eos_token_id", None)
    return ModelConfig(
        model_type="llama",
        vocab_size=int(vocab),
        hidden_size=hidden,
        num_hidden_layers=int(_field(reader, f"{arch}.block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(_field(reader, f"{arch}.attention.head_count_kv", heads)),
        intermediate_size=int(_field(reader, f"{arch}.feed_forward_length")),
        head_dim=int(_field(reader, f"{arch}.attention.key_length", hidden // heads)),
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        rms_norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        max_position_embeddings=int(_field(reader, f"{arch}.context_length", 4096)),
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id", None),
        eos_token_id=None if eos is None else int(eos),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id", None),
        extra={"gguf_file": path.name},
    )


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert permute(w, heads) undone: each head's rows from pair-interleaved
    (x0, x1, x2, x3, ...) back to the two halves (x0, x2, ..., x1, x3, ...)."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_name(name: str) -> str | None:
    """The HF checkpoint name of a GGUF tensor name, or None for a tensor pearlmoe does not use."""
    if name in _TOP:
        return _TOP[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[3] == "weight":
        block = _BLOCK.get(parts[2])
        return None if block is None else f"model.layers.{parts[1]}.{block}.weight"
    return None


def _index(path: Path, reader) -> dict[str, Any]:
    """The file's tensors by their HF names (nothing read yet)."""
    index = {}
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        if name is None:
            if tensor.name.endswith("rope_freqs.weight"):
                raise CheckpointError(f"{path}: {tensor.name} (RoPE frequency factors) is not "
                                      "supported")  # fmt: skip
            raise CheckpointError(f"{path}: unexpected GGUF tensor {tensor.name}")
        index[name] = tensor
    return index


def _dequantize(path: Path, name: str, tensor, config: ModelConfig) -> torch.Tensor:
    """One tensor in fp32 (CPU), Q/K rows un-permuted."""
    import gguf

    try:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except (NotImplementedError, ValueError, KeyError) as err:
        raise CheckpointError(
            f"{path}: tensor {tensor.name} has type {tensor.tensor_type.name}, which the gguf "
            f"package cannot dequantise ({err})"
        ) from None
    if name.endswith("q_proj.weight"):
        values = _unpermute(values, config.num_attention_heads)
    elif name.endswith("k_proj.weight"):
        values = _unpermute(values, config.num_key_value_heads)
    return torch.from_numpy(np.array(values, dtype=np.float32))  # a copy: the file is mapped


def from_gguf(
    path: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    quantized: bool = False,
) -> Transformer:
    """A Transformer with a GGUF file's config and weights (read one tensor at a time). With
    ``quantized`` the projections stored as Q4_0, Q4_1 or Q8_0 keep their blocks
    (pearlmoe.model.quantized); the rest is expanded to ``dtype``."""
    path = Path(path)
    reader = _reader(path)
    config = read_config(path, reader)
    with torch.device("meta"):
        model = Transformer(config, dtype=dtype)
    model = model.to_empty(device=device)
    index = _index(path, reader)

    def get(name: str) -> torch.Tensor | None:
        return _dequantize(path, name, index[name], config) if name in index else None

    load_tensors(model, get, set(index), str(path), config_source="its metadata")
    if quantized:
        _keep_blocks(model, index, config, torch.device(device))
    return model.eval()


def _blocks(tensor, name: str, config: ModelConfig) -> torch.Tensor:
    """A quantised tensor's raw rows [N, K/32 * block bytes] (uint8), Q/K rows un-permuted."""
    rows = np.asarray(tensor.data)
    if name.endswith("q_proj.weight"):
        rows = _unpermute(rows, config.num_attention_heads)
    elif name.endswith("k_proj.weight"):
        rows = _unpermute(rows, config.num_key_value_heads)
    return torch.from_numpy(np.array(rows, dtype=np.uint8))  # a copy: the file is mapped


def _keep_blocks(model: Transformer, index: dict, config: ModelConfig, device) -> None:
    """Every projection the file stores in a format ops.qlinear takes becomes a QuantizedWeight
    of the file's blocks: attention q/k/v (stacked into one qkv_proj when the three share a
    format) and o, the MLP (gate and up rows stacked into w13, when both share a format) and
    the output head (the tied embedding's blocks when tied; lookups keep the expanded table)."""

    def quantized(*names: str) -> QuantizedWeight | None:
        tensors = [index.get(n) for n in names]
        if any(t is None for t in tensors):
            return None
        formats = {FORMATS.get(t.tensor_type.name) for t in tensors}
        if len(formats) != 1 or None in formats:
            return None
        rows = torch.cat([_blocks(t, n, config) for t, n in zip(tensors, names, strict=True)])
        in_features = int(tensors[0].shape[0])  # GGUF shapes are [K, N]
        return QuantizedWeight(rows.to(device), formats.pop(), in_features)

    for i, block in enumerate(model.layers):
        prefix = f"model.layers.{i}."
        attn = block.self_attn
        qkv = quantized(*(f"{prefix}self_attn.{p}_proj.weight" for p in "qkv"))
        if qkv is not None:  # one format for all three: one call
            for proj in ("q_proj", "k_proj", "v_proj"):
                del attn._parameters[proj]
            attn.qkv_proj = qkv
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            weight = quantized(f"{prefix}self_attn.{proj}.weight")
            if weight is not None and proj in attn._parameters:
                replace_weight(attn, proj, weight)
        w13 = quantized(f"{prefix}mlp.gate_proj.weight", f"{prefix}mlp.up_proj.weight")
        w2 = quantized(f"{prefix}mlp.down_proj.weight")
        if w13 is not None and w2 is not None:
            replace_weight(block.mlp, "w13", w13)
            replace_weight(block.mlp, "w2", w2)
    head = quantized("lm_head.weight" if "lm_head.weight" in index else "model.embed_tokens.weight")
    if head is not None:
        replace_weight(model, "lm_head", head)


def read_tokenizer(path: str | Path, reader=None):
    """The file's tokenizer as a ``tokenizers.Tokenizer`` (GPT-2-style byte-level BPE, the
    ``gpt2`` tokenizer model of llama.cpp), with its control tokens as special tokens. Decoding
    is exact; encoding splits words with the generic byte-level pre-tokenizer, an approximation
    of the model's own split rule (``tokenizer.ggml.pre``), so a few strings (long digit runs,
    some punctuation) may encode to other, equally valid, id sequences."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    path = Path(path)
    reader = reader or _reader(path)
    kind = _field(reader, "tokenizer.ggml.model", None)
    if kind != "gpt2":
        raise CheckpointError(
            f"{path}: tokenizer model {kind!r} is not supported (pearlmoe rebuilds byte-level BPE, "
            "llama.cpp's 'gpt2')"
        )
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    types = list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    bpe = models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False)
    tokenizer = Tokenizer(bpe)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    control = 3  # llama.cpp's token types: 1 normal, 2 unknown, 3 control, 4 user-defined, ...
    special = [t for t, k in zip(tokens, types, strict=True) if k == control]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    return tokenizer


def chat_template(path: str | Path, reader=None) -> str | None:
    """The file's chat template (Jinja), if it has one."""
    return _field(reader or _reader(Path(path)), "tokenizer.chat_template", None)


def render_chat_template(template: str, messages: list[dict]) -> str:
    """A conversation through a chat template (Jinja, strict), ready for the reply."""
    import jinja2

    env = jinja2.Environment(undefined=jinja2.StrictUndefined)
    return env.from_string(template).render(messages=messages, add_generation_prompt=True)
