"""The fused CPU step: a model's whole decode / verification step as one C++ call
(``torch.classes.pearlmoe.CpuModelStep``, csrc/cpu/model_step.cpp), the ``fused`` backend of
pearlmoe.decode.runner.

It runs the eager step's CPU kernels in the same order with the same rounding points, so its
logits equal the eager backend's bit for bit; what it drops is the work between them. On the
embedded pair an eager bf16 step spends more time dispatching ~100 ops, allocating their outputs
and running Python than in the kernels, and a compiled step still pays its wrappers and guards
(~60-100 µs a call, more when they run cold between steps; bench/NOTES.md). ``draft`` also runs a
draft's γ one-token steps in one call.

Projections kept in a GGUF file's blocks (``QuantizedWeight``: ``from_pretrained(...,
quantized=True)``) go through the qlinear op's own CPU path. Models it does not cover (biases,
pre-RoPE or whole-width QK-norm, clamps, partial rotary, gated shared experts, grouped routing,
expert parallelism) get the reason from ``unsupported`` and take the compile backend.
"""

import torch
from torch import Tensor

from .. import ops  # noqa: F401  (loads the extension, which registers the class)
from ..model.quantized import QuantizedWeight
from ..model.transformer import MoE, Transformer

_EMPTY = torch.empty(0)


def unsupported(model: Transformer) -> str | None:
    """Why the fused step cannot run this model, or None when it can."""
    c = model.config
    checks = [
        (model.device.type != "cpu", "the model is not on the CPU"),
        (model.expert_parallel is not None, "expert parallelism"),
        (c.qkv_bias or c.o_bias, "attention biases"),
        (c.use_qk_norm and c.qk_norm_position != "after_rope", "QK-norm before RoPE"),
        (c.clip_qkv is not None, "clip_qkv"),
        (c.rotary_dim != c.head_dim, "partial rotary"),
        (c.is_moe and c.router != "softmax", f"the {c.router} router"),
        (c.is_moe and c.shared_expert_gate, "a gated shared expert"),
        (c.head_dim > 128 or c.head_dim % 2, f"head_dim {c.head_dim}"),
        (model.dtype not in (torch.float32, torch.bfloat16, torch.float16), str(model.dtype)),
    ]
    reasons = [why for bad, why in checks if bad]
    return ", ".join(reasons) if reasons else None


def _w(t: Tensor | QuantizedWeight | None) -> tuple[Tensor, str]:
    """A weight slot: (the tensor, "" when dense or its GGUF block format when quantised)."""
    if t is None:
        return _EMPTY, ""
    if isinstance(t, QuantizedWeight):
        return t.qweight.contiguous(), t.format
    return t.detach().contiguous(), ""


def build(model: Transformer) -> torch.ScriptObject:
    """The C++ step over the model's weights (shared, not copied: it sees in-place updates)."""
    why = unsupported(model)
    if why is not None:
        raise ValueError(f"the fused backend does not run this model ({why}); use compile")
    c = model.config
    vocab_rows = None if model.vocab_rows is None else model.vocab_rows.long()
    slots = [_w(model.embed_tokens), _w(model.norm.weight), _w(model._head()),
             _w(vocab_rows), _w(model.vocab_ids)]  # fmt: skip
    for block in model.layers:
        a, mlp = block.self_attn, block.mlp
        moe = isinstance(mlp, MoE)
        stacked = a.qkv_proj is not None  # [q; k; v] in one quantised weight, in the q slot
        slots += [
            _w(block.input_layernorm.weight),
            _w(a.qkv_proj if stacked else a.q_proj),
            _w(None if stacked else getattr(a, "k_proj", None)),
            _w(None if stacked else getattr(a, "v_proj", None)),
            _w(a.o_proj),
            _w(getattr(a, "query_layernorm", None)),
            _w(getattr(a, "key_layernorm", None)),
            _w(block.post_attention_layernorm.weight),
            _w(mlp.router if moe else None),
            _w(mlp.w13),
            _w(mlp.w2),
            _w(mlp.shared_w13 if moe else None),
            _w(mlp.shared_w2 if moe else None),
        ]
    ints = [c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
            c.head_dim, c.cla_share_factor, int(c.use_qk_norm), c.moe_topk,
            int(c.renormalize), c.vocab_size]  # fmt: skip
    weights, formats = [w for w, _ in slots], [f for _, f in slots]
    return torch.classes.pearlmoe.CpuModelStep(weights, formats, ints,
                                               [c.rms_norm_eps, c.rope_base])  # fmt: skip
