"""The ops' checks of shapes, dtypes and devices, in Python: what the C++ launchers check before
reading any value, with the same meaning and an error naming the op and the argument.

The fake (meta) kernels in ops.py run them, so tracing rejects what the real kernels reject, and
the ops' Python paths (moe_ffn's training routing, spec_verify's uniforms) run them before their
first tensor operation. Values (ids, lengths, offsets, probabilities) are the C++ checks' alone:
a fake tensor has none. tests/test_fuzz.py holds the two sides to the same verdicts.
"""

from __future__ import annotations

import torch
from torch import Tensor

_INT_MAX = 2**31 - 1
_MAX_EXPERTS = 8192  # routing::kMoeAlignMaxExperts
_MAX_GROUPS = 32  # routing::kGroupedTopkMaxGroups
_CUDA_DTYPES = (torch.bfloat16, torch.float16)


_DTYPE_NAMES = {torch.float32: "Float", torch.float64: "Double", torch.float16: "Half",
                torch.bfloat16: "BFloat16", torch.int32: "Int", torch.int64: "Long",
                torch.int16: "Short", torch.int8: "Char", torch.uint8: "Byte", torch.bool: "Bool",
                torch.complex64: "ComplexFloat", torch.complex128: "ComplexDouble"}  # fmt: skip


def _name(dtype: torch.dtype) -> str:
    """The dtype as the C++ checks print it (c10::ScalarType)."""
    return _DTYPE_NAMES.get(dtype, str(dtype))


def _check(op: str, cond, message: str) -> None:
    torch._check(cond, lambda: f"pearlmoe.{op}: {message}")


def _dim(op: str, t: Tensor, dim: int, name: str) -> None:
    _check(op, t.dim() == dim, f"{name} must be {dim}-D, got shape {list(t.shape)}")


def _same_device(op: str, t: Tensor, ref: Tensor, name: str, ref_name: str) -> None:
    _check(op, t.device == ref.device, f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def _compute_dtype(op: str, t: Tensor, name: str) -> None:
    _check(
        op,
        t.dtype.is_floating_point,
        f"{name} must be a floating-point tensor, got {_name(t.dtype)}",
    )
    if t.device.type == "cuda":
        _check(
            op,
            t.dtype in _CUDA_DTYPES,
            f"{name} must be BFloat16 or Half on CUDA, got {_name(t.dtype)}",
        )


def _int_dtype(op: str, t: Tensor, name: str) -> None:
    _check(
        op,
        t.dtype in (torch.int32, torch.int64),
        f"{name} must be int32 or int64, got {_name(t.dtype)}",
    )


# ---- routing -------------------------------------------------------------------------------------


def _router_logits(op: str, router_logits: Tensor, k: int) -> int:
    """router_logits [T, E] Float with E >= 1 and k in [1, E] (both top-k ops); returns E."""
    _dim(op, router_logits, 2, "router_logits")
    _check(
        op,
        router_logits.dtype == torch.float32,
        f"router_logits must be Float, got {_name(router_logits.dtype)}",
    )
    experts = router_logits.shape[1]
    _check(
        op,
        experts >= 1,
        f"router_logits must have between 1 and INT_MAX expert columns, got shape "
        f"{list(router_logits.shape)}",
    )
    _check(op, 1 <= k <= experts, f"k must be in [1, num_experts={experts}], got {k}")
    return experts


def topk_softmax(router_logits: Tensor, k: int) -> None:
    _router_logits("topk_softmax", router_logits, k)


def grouped_topk(
    router_logits: Tensor, correction_bias: Tensor | None, k: int, num_groups: int, topk_groups: int
) -> None:
    op = "grouped_topk"
    experts = _router_logits(op, router_logits, k)
    _check(
        op,
        1 <= num_groups <= _MAX_GROUPS,
        f"num_groups must be in [1, {_MAX_GROUPS}], got {num_groups}",
    )
    _check(op, experts % num_groups == 0,
           f"num_groups={num_groups} must divide the {experts} experts")  # fmt: skip
    _check(
        op,
        num_groups == 1 or experts // num_groups >= 2,
        "groups must hold at least 2 experts (a group's score sums its best two), got "
        f"{experts // num_groups}",
    )
    _check(op, 1 <= topk_groups <= num_groups,
           f"topk_groups must be in [1, num_groups={num_groups}], got {topk_groups}")  # fmt: skip
    if correction_bias is None:
        return
    _check(
        op,
        correction_bias.dtype == torch.float32,
        f"correction_bias must be Float, got {_name(correction_bias.dtype)}",
    )
    _dim(op, correction_bias, 1, "correction_bias")
    _check(
        op,
        correction_bias.shape[0] == experts,
        f"correction_bias must have num_experts={experts} entries, got {correction_bias.shape[0]}",
    )


def moe_align(topk_ids: Tensor, num_experts: int) -> None:
    op = "moe_align"
    _dim(op, topk_ids, 2, "topk_ids")
    _int_dtype(op, topk_ids, "topk_ids")
    _check(
        op,
        1 <= num_experts <= _MAX_EXPERTS,
        f"num_experts must be in [1, {_MAX_EXPERTS}], got {num_experts}",
    )
    _check(
        op,
        topk_ids.numel() < _INT_MAX,
        f"topk_ids has {topk_ids.numel()} slots; at most INT_MAX - 1",
    )


# ---- expert FFN ----------------------------------------------------------------------------------


def grouped_gemm(a: Tensor, b: Tensor, group_offsets: Tensor, op: str = "grouped_gemm") -> None:
    _dim(op, a, 2, "a")
    _dim(op, b, 3, "b")
    _dim(op, group_offsets, 1, "group_offsets")
    _compute_dtype(op, a, "a")
    _check(op, b.dtype == a.dtype, f"b must have a's dtype {_name(a.dtype)}, got {_name(b.dtype)}")
    _check(
        op,
        group_offsets.dtype == torch.int32,
        f"group_offsets must be Int, got {_name(group_offsets.dtype)}",
    )
    _same_device(op, b, a, "b", "a")
    _same_device(op, group_offsets, a, "group_offsets", "a")
    _check(op, b.shape[0] >= 1, f"b must hold at least one group, got shape {list(b.shape)}")
    _check(
        op,
        b.shape[2] == a.shape[1],
        f"b must be [G, N, K] with K = a.size(1) = {a.shape[1]}, got shape {list(b.shape)}",
    )
    _check(
        op,
        group_offsets.shape[0] == b.shape[0] + 1,
        f"group_offsets must have G + 1 = {b.shape[0] + 1} entries",
    )
    _check(op, a.shape[0] < _INT_MAX, f"a has {a.shape[0]} rows; at most INT_MAX - 1 supported")
    if a.device.type == "cuda":
        _check(
            op,
            b.shape[1] % 8 == 0 and b.shape[2] % 8 == 0,
            "on CUDA the GEMM sizes N and K must be multiples of 8",
        )


def grouped_gemm_wgrad(grad_c: Tensor, a: Tensor, group_offsets: Tensor) -> None:
    op = "grouped_gemm_wgrad"
    _dim(op, grad_c, 2, "grad_c")
    _dim(op, a, 2, "a")
    _dim(op, group_offsets, 1, "group_offsets")
    _check(
        op,
        group_offsets.dtype == torch.int32,
        f"group_offsets must be Int, got {_name(group_offsets.dtype)}",
    )
    _compute_dtype(op, a, "a")
    _check(
        op,
        grad_c.dtype == a.dtype,
        f"grad_c must have a's dtype {_name(a.dtype)}, got {_name(grad_c.dtype)}",
    )
    _same_device(op, grad_c, a, "grad_c", "a")
    _same_device(op, group_offsets, a, "group_offsets", "a")
    _check(op, grad_c.shape[0] == a.shape[0], "grad_c and a must have the same rows")
    _check(op, group_offsets.shape[0] >= 2, "group_offsets needs at least 2 entries")


def _experts(op, x, w13, w2, shared_w13, shared_w2) -> None:
    _dim(op, x, 2, "x")
    _compute_dtype(op, x, "x")
    hidden = x.shape[1]
    _dim(op, w13, 3, "w13")
    _dim(op, w2, 3, "w2")
    for t, name in ((w13, "w13"), (w2, "w2")):
        _check(
            op,
            t.dtype == x.dtype,
            f"{name} must have x's dtype {_name(x.dtype)}, got {_name(t.dtype)}",
        )
        _same_device(op, t, x, name, "x")
    experts, inter = w13.shape[0], w13.shape[1] // 2
    _check(
        op,
        1 <= experts <= _MAX_EXPERTS,
        f"w13 must hold between 1 and {_MAX_EXPERTS} experts, got shape {list(w13.shape)}",
    )
    _check(
        op,
        w13.shape[1] % 2 == 0 and w13.shape[1] > 0 and w13.shape[2] == hidden,
        f"w13 must be [E, 2*I, H] with H = x.size(1) = {hidden}, got shape {list(w13.shape)}",
    )
    _check(
        op,
        w2.shape[0] == experts and w2.shape[1] == hidden and w2.shape[2] == inter,
        f"w2 must be [E, H, I] = [{experts}, {hidden}, {inter}], got {list(w2.shape)}",
    )
    _check(
        op,
        (shared_w13 is None) == (shared_w2 is None),
        "shared_w13 and shared_w2 must be given together",
    )
    if shared_w13 is not None:
        _dim(op, shared_w13, 2, "shared_w13")
        _dim(op, shared_w2, 2, "shared_w2")
        for t, name in ((shared_w13, "shared_w13"), (shared_w2, "shared_w2")):
            _check(
                op,
                t.dtype == x.dtype,
                f"{name} must have x's dtype {_name(x.dtype)}, got {_name(t.dtype)}",
            )
            _same_device(op, t, x, name, "x")
        shared_inter = shared_w13.shape[0] // 2
        _check(
            op,
            shared_w13.shape[0] % 2 == 0
            and shared_w13.shape[0] > 0
            and shared_w13.shape[1] == hidden,
            f"shared_w13 must be [2*Is, H] with H = {hidden}, got shape {list(shared_w13.shape)}",
        )
        _check(
            op,
            shared_w2.shape[0] == hidden and shared_w2.shape[1] == shared_inter,
            f"shared_w2 must be [H, Is] = [{hidden}, {shared_inter}], got {list(shared_w2.shape)}",
        )
    if x.device.type == "cuda":
        _check(
            op,
            (2 * inter) % 8 == 0 and hidden % 8 == 0 and inter % 8 == 0,
            "on CUDA the GEMM sizes N and K must be multiples of 8",
        )


def moe_ffn_routed(x, topk_weights, topk_ids, w13, w2, shared_w13=None, shared_w2=None) -> None:
    op = "moe_ffn_routed"
    _experts(op, x, w13, w2, shared_w13, shared_w2)
    _dim(op, topk_weights, 2, "topk_weights")
    _dim(op, topk_ids, 2, "topk_ids")
    _int_dtype(op, topk_ids, "topk_ids")
    _check(
        op,
        topk_weights.dtype.is_floating_point,
        f"topk_weights must be floating point, got {_name(topk_weights.dtype)}",
    )
    _check(
        op,
        topk_weights.shape == topk_ids.shape and topk_ids.shape[0] == x.shape[0],
        f"topk_weights and topk_ids must both be [T, k] with T = x.size(0) = {x.shape[0]}",
    )
    _check(
        op,
        topk_ids.shape[1] >= 1,
        f"top_k must be >= 1, got topk_ids of shape {list(topk_ids.shape)}",
    )
    _check(op, topk_ids.numel() < _INT_MAX, "T * k must be below INT_MAX")
    _same_device(op, topk_weights, x, "topk_weights", "x")
    _same_device(op, topk_ids, x, "topk_ids", "x")


def moe_ffn(x, router_w, w13, w2, top_k, shared_w13=None, shared_w2=None) -> None:
    op = "moe_ffn"
    _experts(op, x, w13, w2, shared_w13, shared_w2)
    _dim(op, router_w, 2, "router_w")
    _check(
        op,
        router_w.dtype.is_floating_point,
        f"router_w must be floating point, got {_name(router_w.dtype)}",
    )
    _same_device(op, router_w, x, "router_w", "x")
    experts = w13.shape[0]
    _check(
        op,
        router_w.shape[0] == experts and router_w.shape[1] == x.shape[1],
        f"router_w must be [E, H] = [{experts}, {x.shape[1]}], got {list(router_w.shape)}",
    )
    _check(op, top_k >= 1 and top_k <= experts, f"top_k must be in [1, E={experts}], got {top_k}")


# ---- attention -----------------------------------------------------------------------------------


def attention(q: Tensor, k: Tensor, v: Tensor, kv_lens: Tensor) -> None:
    op = "attention"
    _dim(op, q, 4, "q")
    _dim(op, k, 4, "k")
    _dim(op, v, 4, "v")
    _dim(op, kv_lens, 1, "kv_lens")
    _check(op, kv_lens.dtype == torch.int32, f"kv_lens must be Int, got {_name(kv_lens.dtype)}")
    _check(op, q.dtype.is_floating_point, f"q must be floating point, got {_name(q.dtype)}")
    if q.device.type == "cuda":
        _check(
            op, q.dtype in _CUDA_DTYPES, f"q must be BFloat16 or Half on CUDA, got {_name(q.dtype)}"
        )
    _same_device(op, k, q, "k", "q")
    _same_device(op, v, q, "v", "q")
    _check(
        op,
        kv_lens.device == q.device or kv_lens.device.type == "cpu",
        f"kv_lens must be on q's device or on the CPU, got {kv_lens.device}",
    )
    _check(op, k.dtype == q.dtype and v.dtype == q.dtype, "q, k and v must share a dtype")
    _check(op, k.shape == v.shape, "k and v must have the same shape")
    batch, q_heads, dim, kv_heads = q.shape[0], q.shape[2], q.shape[3], k.shape[2]
    _check(
        op,
        k.shape[0] == batch and k.shape[3] == dim,
        f"k must be [B, Skv, Hkv, D] with B = {batch} and D = {dim} to match q",
    )
    _check(
        op,
        kv_heads >= 1 and q_heads % kv_heads == 0,
        f"the {q_heads} query heads must be a multiple of the {kv_heads} KV heads",
    )
    _check(op, kv_lens.shape[0] == batch, f"kv_lens must have B = {batch} entries")
    _check(op, dim >= 1, "head_dim must be positive")
    if q.device.type == "cuda":
        _check(op, dim in (64, 80, 128), f"head_dim must be 64, 80 or 128 on CUDA, got {dim}")


def rope_qk_norm(q, k, positions, rope_base, q_weight=None, k_weight=None, normalize=True) -> None:
    op = "rope_qk_norm"
    _dim(op, q, 3, "q")
    _dim(op, k, 3, "k")
    _dim(op, positions, 1, "positions")
    _int_dtype(op, positions, "positions")
    _check(
        op, q.dtype.is_floating_point and k.dtype == q.dtype, "q and k must share a floating dtype"
    )
    tokens, dim = q.shape[0], q.shape[2]
    _check(
        op,
        k.shape[0] == tokens and k.shape[2] == dim,
        f"k must be [T, Hkv, D] = [{tokens}, *, {dim}] to match q",
    )
    _check(op, positions.shape[0] == tokens, f"positions must have T = {tokens} entries")
    _check(
        op,
        dim % 2 == 0 and dim >= 2 and dim <= 128,
        f"head_dim must be even and at most 128, got {dim}",
    )
    for w, name in ((q_weight, "q_weight"), (k_weight, "k_weight")):
        if w is None:
            continue
        _check(op, normalize, f"{name} given, but normalize=False applies no norm")
        _dim(op, w, 1, name)
        _check(op, w.shape[0] == dim, f"{name} must have head_dim = {dim} entries")
        _same_device(op, w, q, name, "q")
    _same_device(op, k, q, "k", "q")
    _same_device(op, positions, q, "positions", "q")
    _check(
        op,
        0 < rope_base < float("inf"),
        f"rope_base must be a positive finite number, got {rope_base}",
    )
    if q.device.type == "cuda":
        _check(op, q.dtype != torch.float64, "float64 runs on the CPU only")


# ---- speculative decoding ------------------------------------------------------------------------


def spec_verify(
    target_probs, draft_ids, draft_probs=None, uniforms=None, *, drawn: bool = False
) -> None:
    """drawn: the wrapper draws the uniforms itself (so they are not checked here)."""
    op = "spec_verify"
    _dim(op, target_probs, 3, "target_probs")
    _check(
        op,
        target_probs.dtype == torch.float32,
        f"target_probs must be Float, got {_name(target_probs.dtype)}",
    )
    _dim(op, draft_ids, 2, "draft_ids")
    _int_dtype(op, draft_ids, "draft_ids")
    batch, vocab, n = target_probs.shape[0], target_probs.shape[2], draft_ids.shape[1]
    _check(op, vocab >= 1, f"target_probs needs a vocabulary, got shape {list(target_probs.shape)}")
    _check(
        op,
        draft_ids.shape[0] == batch and target_probs.shape[1] == n + 1,
        f"target_probs must be [B, n+1, V] for draft_ids [B, n] = {list(draft_ids.shape)}",
    )
    _same_device(op, draft_ids, target_probs, "draft_ids", "target_probs")
    _check(op, uniforms is None or draft_probs is not None, "uniforms given without draft_probs")
    if draft_probs is None:
        return
    _dim(op, draft_probs, 3, "draft_probs")
    _check(
        op,
        draft_probs.dtype == torch.float32,
        f"draft_probs must be Float, got {_name(draft_probs.dtype)}",
    )
    _check(
        op,
        tuple(draft_probs.shape) == (batch, n, vocab),
        f"draft_probs must be [B, n, V] = [{batch}, {n}, {vocab}]",
    )
    _same_device(op, draft_probs, target_probs, "draft_probs", "target_probs")
    if drawn:
        return
    _check(op, uniforms is not None, "sampling (draft_probs given) needs uniforms [B, n+1]")
    _check(
        op, uniforms.dtype == torch.float32, f"uniforms must be Float, got {_name(uniforms.dtype)}"
    )
    _check(
        op,
        tuple(uniforms.shape) == (batch, n + 1),
        f"uniforms must be [B, n+1] = [{batch}, {n + 1}]",
    )
    _same_device(op, uniforms, target_probs, "uniforms", "target_probs")


# ---- the decode step's ops ---------------------------------------------------------------------


def _x_and_weight(op: str, x: Tensor, weight: Tensor, weight_dim: int, letter: str) -> None:
    """x [..., letter] floating, weight of rank weight_dim in x's dtype and device whose last dim
    is x's (what linear and rms_norm both require)."""
    _check(op, x.dim() >= 1, f"x must be [..., {letter}], got a 0-D tensor")
    _dim(op, weight, weight_dim, "weight")
    _check(op, x.dtype.is_floating_point, f"x must be floating point, got {_name(x.dtype)}")
    _check(op, weight.dtype == x.dtype,
           f"weight must have x's dtype {_name(x.dtype)}, got {_name(weight.dtype)}")  # fmt: skip
    _same_device(op, weight, x, "weight", "x")
    shape = "[N, K]" if weight_dim == 2 else f"[{letter}]"
    _check(op, weight.shape[-1] == x.shape[-1],
           f"weight must be {shape} with {letter} = x.size(-1) = {x.shape[-1]}, got shape "
           f"{list(weight.shape)}")  # fmt: skip


def linear(x: Tensor, weight: Tensor) -> None:
    _x_and_weight("linear", x, weight, 2, "K")


_GGUF_BLOCK_BYTES = {"q4_0": 18, "q4_1": 20, "q8_0": 34}
_QUANT_X_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _gguf_format(op: str, format: str) -> int:
    """The bytes per block of a GGUF format name."""
    _check(op, format in _GGUF_BLOCK_BYTES,
           f"format must be 'q4_0', 'q4_1' or 'q8_0', got '{format}'")  # fmt: skip
    return _GGUF_BLOCK_BYTES[format]


def _qweight(op: str, qweight: Tensor) -> None:
    _dim(op, qweight, 2, "qweight")
    _check(op, qweight.dtype == torch.uint8,
           f"qweight must be Byte, got {_name(qweight.dtype)}")  # fmt: skip


def qlinear(x: Tensor, qweight: Tensor, format: str) -> None:
    op = "qlinear"
    block = _gguf_format(op, format)
    _check(op, x.dim() >= 1, "x must be [..., K], got a 0-D tensor")
    _qweight(op, qweight)
    _check(op, x.dtype in _QUANT_X_DTYPES,
           f"x must be float32, bfloat16 or float16, got {_name(x.dtype)}")  # fmt: skip
    _same_device(op, qweight, x, "qweight", "x")
    k = x.shape[-1]
    _check(op, k % 32 == 0,
           f"x.size(-1) = K must be a multiple of 32 ({format} blocks), got {k}")  # fmt: skip
    row = k // 32 * block
    _check(op, qweight.shape[1] == row,
           f"qweight must be [N, {row}] for K = {k} in {format} ({block} bytes per 32 values), "
           f"got shape {list(qweight.shape)}")  # fmt: skip


def dequantize(qweight: Tensor, format: str, dtype: torch.dtype) -> None:
    op = "dequantize"
    block = _gguf_format(op, format)
    _qweight(op, qweight)
    _check(op, dtype in _QUANT_X_DTYPES,
           f"dtype must be float32, bfloat16 or float16, got {_name(dtype)}")  # fmt: skip
    _check(op, qweight.shape[1] % block == 0,
           f"qweight rows must be whole {format} blocks of {block} bytes, got shape "
           f"{list(qweight.shape)}")  # fmt: skip


def rms_norm(x: Tensor, weight: Tensor) -> None:
    _x_and_weight("rms_norm", x, weight, 1, "H")


def kv_cache_write(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, positions: Tensor,
                   group: int) -> None:  # fmt: skip
    op = "kv_cache_write"
    _dim(op, k_cache, 5, "k_cache")
    _check(op, v_cache.shape == k_cache.shape, f"v_cache must have k_cache's shape "
           f"{list(k_cache.shape)}, got {list(v_cache.shape)}")  # fmt: skip
    _dim(op, k, 4, "k")
    _check(op, v.shape == k.shape, f"v must have k's shape {list(k.shape)}, got {list(v.shape)}")
    _dim(op, positions, 2, "positions")
    _check(op, positions.dtype == torch.int64,
           f"positions must be Long, got {_name(positions.dtype)}")  # fmt: skip
    _check(op, k_cache.dtype.is_floating_point,
           f"k_cache must be floating point, got {_name(k_cache.dtype)}")  # fmt: skip
    for t, name in ((v_cache, "v_cache"), (k, "k"), (v, "v")):
        _check(op, t.dtype == k_cache.dtype, f"{name} must have k_cache's dtype "
               f"{_name(k_cache.dtype)}, got {_name(t.dtype)}")  # fmt: skip
    for t, name in ((v_cache, "v_cache"), (k, "k"), (v, "v"), (positions, "positions")):
        _same_device(op, t, k_cache, name, "k_cache")
    groups, batch = k_cache.shape[0], k_cache.shape[1]
    _check(op, 0 <= group < groups, f"group must be in [0, {groups}), got {group}")
    _check(op, k.shape[0] == batch and k.shape[2:] == k_cache.shape[3:],
           f"k must be [B, S, Hkv, D] = [{batch}, S, {k_cache.shape[3]}, {k_cache.shape[4]}] "
           f"for k_cache of shape {list(k_cache.shape)}, got {list(k.shape)}")  # fmt: skip
    _check(op, positions.shape == k.shape[:2], f"positions must be [B, S] = [{batch}, "
           f"{k.shape[1]}], got {list(positions.shape)}")  # fmt: skip
