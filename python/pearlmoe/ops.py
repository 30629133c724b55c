"""Typed wrappers for every pearlmoe op and their fake (meta) implementations.

Autograd is registered in C++ (csrc/ops/autograd.cpp): a Python autograd kernel would put Python
on every call's path, gradients or not.

Letters used in shape comments: T tokens, E experts, k experts per token, N = T*k token-slots,
H hidden size, I expert width, Is shared-expert width, G groups, M rows, K reduction size.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from . import op_checks

if TYPE_CHECKING:
    from .routing import RouterStats

_ops = torch.ops.pearlmoe

# ---- routing -------------------------------------------------------------------------------------


def topk_softmax(router_logits: Tensor, k: int, renormalize: bool = False) -> tuple[Tensor, Tensor]:
    """fp32 softmax over the router logits, then the top-k experts of each token.

    Experts are ranked by logit (ties to the lower expert index, NaN ranks lowest), so CPU and
    CUDA pick identical ids. ``weights`` are the raw softmax probabilities of the chosen experts,
    as Hunyuan-Large combines them; ``renormalize=True`` divides them by their sum (Mixtral style).

    Shape:
        router_logits: [T, E] float32
        returns weights [T, k] float32, ids [T, k] int32, in rank order

    >>> w, ids = topk_softmax(torch.tensor([[0.0, 2.0, 1.0]]), k=2)
    >>> ids.tolist()
    [[1, 2]]
    """
    return _ops.topk_softmax.default(router_logits, k, renormalize)


def grouped_topk(
    router_logits: Tensor,
    correction_bias: Tensor | None,
    k: int,
    num_groups: int = 1,
    topk_groups: int = 1,
    renormalize: bool = True,
    scaling: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """DeepSeek-V3 / GLM-4.5 routing: sigmoid scores, experts chosen by score + correction_bias
    (the bias steers the choice only), within the ``topk_groups`` of ``num_groups`` contiguous
    expert groups whose two best keys sum highest (experts of the other groups get key 0, as HF
    masks them). ``weights`` are the chosen experts' unbiased scores, divided by their sum
    (+1e-20) when ``renormalize``, times ``scaling`` (routed_scaling_factor). Ties go to the lower
    index; NaN ranks lowest.

    Shape:
        router_logits: [T, E] float32, correction_bias: [E] float32 or None
        returns weights [T, k] float32, ids [T, k] int32, in rank order

    >>> w, ids = grouped_topk(torch.tensor([[0.0, 2.0, 1.0, -1.0]]), None, k=2)
    >>> ids.tolist()
    [[1, 2]]
    """
    return _ops.grouped_topk.default(router_logits, correction_bias, k, num_groups, topk_groups,
                                     renormalize, scaling)  # fmt: skip


def moe_align(topk_ids: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """Group the N = T*k token-slots by expert (a stable counting sort).

    Slot ``s`` is ``topk_ids.flatten()[s]`` (token ``s // k``). Row ``j`` of the expert-grouped
    order holds slot ``sorted_slots[j]``; ``slot_to_row`` is the inverse permutation; expert ``e``
    owns rows ``expert_offsets[e]:expert_offsets[e+1]``, slots in increasing order. An id of -1
    marks a dropped slot: those rows follow ``expert_offsets[E]``. Any other id outside [0, E) is
    an error (on CUDA the check costs one host sync and is skipped under CUDA-graph capture,
    where such ids count as dropped). All outputs have static shapes.

    Shape:
        topk_ids: [T, k] int32 or int64
        returns sorted_slots [N] int32, slot_to_row [N] int32, expert_offsets [E + 1] int32
    """
    return _ops.moe_align.default(topk_ids, num_experts)


@torch.library.register_fake("pearlmoe::topk_softmax")
def _topk_softmax_fake(router_logits: Tensor, k: int, renormalize: bool = False):
    op_checks.topk_softmax(router_logits, k)
    num_tokens = router_logits.shape[0]
    weights = router_logits.new_empty(num_tokens, k)  # [T, k]
    ids = router_logits.new_empty(num_tokens, k, dtype=torch.int32)  # [T, k]
    return weights, ids


@torch.library.register_fake("pearlmoe::grouped_topk")
def _grouped_topk_fake(router_logits, correction_bias, k, num_groups=1, topk_groups=1,
                       renormalize=True, scaling=1.0):  # fmt: skip
    op_checks.grouped_topk(router_logits, correction_bias, k, num_groups, topk_groups)
    num_tokens = router_logits.shape[0]
    weights = router_logits.new_empty(num_tokens, k)  # [T, k]
    ids = router_logits.new_empty(num_tokens, k, dtype=torch.int32)  # [T, k]
    return weights, ids


@torch.library.register_fake("pearlmoe::moe_align")
def _moe_align_fake(topk_ids: Tensor, num_experts: int):
    op_checks.moe_align(topk_ids, num_experts)
    n = topk_ids.numel()
    sorted_slots = topk_ids.new_empty(n, dtype=torch.int32)  # [N]
    slot_to_row = topk_ids.new_empty(n, dtype=torch.int32)  # [N]
    expert_offsets = topk_ids.new_empty(num_experts + 1, dtype=torch.int32)  # [E + 1]
    return sorted_slots, slot_to_row, expert_offsets


# ---- expert FFN ----------------------------------------------------------------------------------


def grouped_gemm(a: Tensor, b: Tensor, group_offsets: Tensor) -> Tensor:
    """Rows ``group_offsets[g]:group_offsets[g+1]`` of ``a`` times ``b[g]^T``, for every group.

    ``b`` is in the checkpoint's out×in orientation. Rows at or beyond ``group_offsets[G]`` come
    out as zeros. bf16/fp16 with fp32 accumulation on CUDA (N and K multiples of 8); any
    floating dtype on the CPU. Differentiable in ``a`` and ``b``.

    Shape:
        a: [M, K], b: [G, N, K], group_offsets: [G + 1] int32 -> [M, N]
    """
    return _ops.grouped_gemm.default(a, b, group_offsets)


def grouped_gemm_wgrad(grad_c: Tensor, a: Tensor, group_offsets: Tensor) -> Tensor:
    """The weight gradient of grouped_gemm: ``grad_b[g] = grad_c[rows of g]^T · a[rows of g]``.

    Shape:
        grad_c: [M, N], a: [M, K], group_offsets: [G + 1] int32 -> [G, N, K]
    """
    return _ops.grouped_gemm_wgrad.default(grad_c, a, group_offsets)


def moe_ffn_routed(
    x: Tensor,
    topk_weights: Tensor,
    topk_ids: Tensor,
    w13: Tensor,
    w2: Tensor,
    shared_w13: Tensor | None = None,
    shared_w2: Tensor | None = None,
) -> Tensor:
    """SwiGLU experts for a given routing, plus the optional shared expert.

    ``y[t] = shared(x[t]) + Σ_i topk_weights[t, i] · expert_{topk_ids[t, i]}(x[t])`` where
    ``expert_e(v) = w2[e] · (silu(w13[e, :I] v) ⊙ (w13[e, I:] v))``. An id of -1 is a dropped
    slot and adds nothing.

    Shape:
        x: [T, H], topk_weights: [T, k] float, topk_ids: [T, k] int32/int64,
        w13: [E, 2I, H] (gate rows, then up rows), w2: [E, H, I],
        shared_w13: [2Is, H], shared_w2: [H, Is] -> [T, H]
    """
    return _ops.moe_ffn_routed.default(x, topk_weights, topk_ids, w13, w2, shared_w13, shared_w2)


def moe_ffn(
    x: Tensor,
    router_w: Tensor,
    w13: Tensor,
    w2: Tensor,
    top_k: int,
    shared_w13: Tensor | None = None,
    shared_w2: Tensor | None = None,
    renormalize: bool = False,
    *,
    capacity_factor: float | None = None,
    recycle: bool = False,
    generator: torch.Generator | None = None,
    return_stats: bool = False,
) -> Tensor | tuple[Tensor, RouterStats]:
    """The Mixture-of-Experts feed-forward layer, Hunyuan-Large semantics by default.

    Router logits in fp32 (``x @ router_w^T``), softmax, top-k; each token's routed experts are
    weighted by their raw softmax probabilities (``renormalize=True`` divides by their sum, as
    Mixtral does) and the shared expert, when given, is added unweighted.

    Training options (they route in Python, then call ``moe_ffn_routed``):
      * ``capacity_factor``: each expert takes at most ``ceil(capacity_factor · T · k / E)`` slots;
        first choices have priority over second choices, then token order; the rest are dropped.
      * ``recycle``: dropped slots are reassigned at random (``generator``) to experts with spare
        capacity, weighted by their probability for the new expert (Hunyuan-Large's recycle
        routing).
      * ``return_stats``: also return the RouterStats (per-expert token fraction and mean
        probability, the load-balancing loss inputs).

    Shape:
        x: [T, H], router_w: [E, H], w13: [E, 2I, H], w2: [E, H, I],
        shared_w13: [2Is, H], shared_w2: [H, Is] -> [T, H]
    """
    if capacity_factor is None and not return_stats:
        return _ops.moe_ffn.default(x, router_w, w13, w2, top_k, shared_w13, shared_w2, renormalize)
    # The op's checks come first here too: this path routes in Python before reaching an op.
    op_checks.moe_ffn(x, router_w, w13, w2, top_k, shared_w13, shared_w2)
    if capacity_factor is not None:
        valid = isinstance(capacity_factor, (int, float)) and not isinstance(capacity_factor, bool)
        torch._check(
            valid and math.isfinite(capacity_factor) and capacity_factor > 0,
            lambda: (
                f"pearlmoe.moe_ffn: capacity_factor must be a positive finite number, got "
                f"{capacity_factor!r}"
            ),
        )
    from .routing import route

    logits = x.float() @ router_w.float().t()  # [T, E]
    weights, ids, stats = route(
        logits,
        top_k,
        renormalize,
        capacity_factor=capacity_factor,
        recycle=recycle,
        generator=generator,
    )
    y = moe_ffn_routed(x, weights, ids, w13, w2, shared_w13, shared_w2)
    return (y, stats) if return_stats else y


def linear(x: Tensor, weight: Tensor) -> Tensor:
    """A dense projection ``x · weight^T`` (no bias), like ``F.linear``.

    It exists for the CPU decode step: a few rows against a large weight go through pearlmoe's
    skinny kernel (AVX-512; bf16 weights with AVX512-BF16 dot products), which streams the weight
    once instead of paying BLAS's packing and per-call cost; more rows go to BLAS. On CUDA it is
    cuBLAS. fp32 accumulation; differentiable.

    Shape:
        x: [..., K], weight: [N, K] -> [..., N]
    """
    return _ops.linear.default(x, weight)


def qlinear(x: Tensor, qweight: Tensor, format: str) -> Tensor:
    """A projection whose weight stays in a GGUF block format: ``x · dequant(qweight)^T``.

    ``format`` is llama.cpp's ``"q4_0"``, ``"q4_1"`` or ``"q8_0"``; ``qweight`` holds each weight
    row's K/32 blocks exactly as a GGUF file stores them (18, 20 or 34 bytes per 32 values). At
    decode sizes the CPU kernel expands each block in registers as it streams the weight once (a
    4-bit weight is 3.2× fewer bytes than bf16); prefill-sized calls expand the weight and use
    BLAS. CUDA: a warp per output column for up to 16 rows, else dequantize + cuBLAS. Sums in
    fp32 over the exactly expanded weights; each row computed on its own. Not differentiable.

    Shape:
        x: [..., K] (K a multiple of 32), qweight: [N, K/32 * block bytes] uint8 -> [..., N]
    """
    return _ops.qlinear.default(x, qweight, format)


def dequantize(qweight: Tensor, format: str, dtype: torch.dtype = torch.float32) -> Tensor:
    """GGUF blocks expanded: ``qweight`` [N, K/32 * block bytes] uint8 -> [N, K] in ``dtype``."""
    return _ops.dequantize.default(qweight, format, dtype)


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-5) -> Tensor:
    """RMSNorm over the last dim with Hugging Face's rounding points:
    ``weight · (x_fp32 · rsqrt(mean(x_fp32²) + eps)).to(x.dtype)``.

    Each row is reduced on its own in a fixed order, so a token's output is bitwise the same
    whatever other rows share the call: a decode step and a verification window agree, which
    keeps greedy speculative decoding token-for-token equal to autoregressive decoding, compiled
    or not. fp32 accumulation (fp64 for fp64 inputs); differentiable.

    Shape:
        x: [..., H], weight: [H] (x's dtype) -> [..., H]
    """
    return _ops.rms_norm.default(x, weight, eps)


def cpu_isa() -> str:
    """The instruction set pearlmoe's CPU GEMM kernels use here: ``avx512bf16``, ``avx512`` or
    ``generic`` (``PEARLMOE_CPU_ISA`` caps it, read once per process)."""
    return _ops.cpu_isa.default()


@torch.library.register_fake("pearlmoe::rms_norm")
def _rms_norm_fake(x: Tensor, weight: Tensor, eps: float = 1e-5):
    op_checks.rms_norm(x, weight)
    return torch.empty_like(x, memory_format=torch.contiguous_format)  # [..., H]


@torch.library.register_fake("pearlmoe::qlinear")
def _qlinear_fake(x: Tensor, qweight: Tensor, format: str):
    op_checks.qlinear(x, qweight, format)
    return x.new_empty(*x.shape[:-1], qweight.shape[0])  # [..., N]


@torch.library.register_fake("pearlmoe::dequantize")
def _dequantize_fake(qweight: Tensor, format: str, dtype: torch.dtype):
    op_checks.dequantize(qweight, format, dtype)
    k = qweight.shape[1] // op_checks._GGUF_BLOCK_BYTES[format] * 32
    return qweight.new_empty(qweight.shape[0], k, dtype=dtype)  # [N, K]


@torch.library.register_fake("pearlmoe::linear")
def _linear_fake(x: Tensor, weight: Tensor):
    op_checks.linear(x, weight)
    return x.new_empty(*x.shape[:-1], weight.shape[0])  # [..., N]


# ---- attention -----------------------------------------------------------------------------------


def attention(
    q: Tensor, k: Tensor, v: Tensor, kv_lens: Tensor, scale: float | None = None
) -> Tensor:
    """Causal attention over a KV buffer, aligned bottom-right: query ``i`` of sequence ``b``
    sees keys ``j < kv_lens[b] - Sq + i + 1``.

    One op for prefill (Sq = prompt length), decode (Sq = 1) and speculative verification
    (Sq = draft length + 1). ``k``/``v`` may be a preallocated cache longer than any sequence
    (``Skv`` = capacity); ``kv_lens`` counts each sequence's valid keys, the queries' own included,
    so ``Sq <= kv_lens[b] <= Skv``. GQA: query head ``h`` reads KV head ``h // (Hq / Hkv)``.
    Softmax and accumulation in fp32. CUDA: bf16/fp16, head_dim 64, 80 or 128. CPU: any float
    dtype; a row at a time for up to 16 query rows and for prefills of up to 2^16 query-key
    pairs, blocked online softmax beyond; never an Sq×Skv matrix.

    Checks: shapes, dtypes and devices always, on the host. ``kv_lens`` values:
      * on the CPU (with q on any device): checked on the host, free, to be in [Sq, Skv]; for a
        CUDA q they are then copied from pinned memory without a sync (not allowed under CUDA-graph
        capture, which would replay the lengths of the capture);
      * on q's CUDA device: never read by the host (no sync, no copy; capturable, so the lengths can
        change between graph replays). Values outside [Sq, Skv] are not reported: the kernels
        clamp each length into [0, Skv], so nothing outside k and v is read, and a query row that
        then sees no key comes out as zeros.

    Shape:
        q: [B, Sq, Hq, D], k, v: [B, Skv, Hkv, D], kv_lens: [B] int32 (on q's device, or on the
        CPU) -> [B, Sq, Hq, D]
    """
    return _ops.attention.default(q, k, v, kv_lens, scale)


def rope_qk_norm(
    q: Tensor,
    k: Tensor,
    positions: Tensor,
    rope_base: float,
    q_weight: Tensor | None = None,
    k_weight: Tensor | None = None,
    eps: float = 1e-5,
    normalize: bool = True,
) -> tuple[Tensor, Tensor]:
    """NeoX RoPE over the full head dim, then QK RMSNorm (Hunyuan-Large's order).

    Returns the query to attend with, ``rms_norm(rope(q)) * q_weight * k_weight``, and the key to
    cache, ``rope(k) / rms(rope(k))`` without any weight. The key-norm weight is folded into the
    query (``q·(w⊙k̂) = (q⊙w)·k̂``), so the two layers of a CLA pair, which differ only in their
    key-norm weights, share one cached key. ``normalize=False`` applies RoPE alone. The angle table
    ``1 / rope_base^(2i/D)`` is built once per (rope_base, D) on the CPU, as HF builds it, and a
    CUDA call passes it to the kernel by value: no per-call copy or sync, capturable.

    Shape:
        q: [T, Hq, D], k: [T, Hkv, D], positions: [T] int, q_weight, k_weight: [D]
        -> q_out [T, Hq, D], k_hat [T, Hkv, D]
    """
    return _ops.rope_qk_norm.default(q, k, positions, rope_base, q_weight, k_weight, eps, normalize)


def kv_cache_write(
    k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, positions: Tensor, group: int = 0
) -> None:
    """Append new tokens' keys and values to a KV cache, in place:
    ``k_cache[group, b, positions[b, s]] = k[b, s]`` and ``v_cache`` likewise.

    The decode step's cache write: index writes on the device, no host work, so it compiles
    into one graph without copying the cache and captures in a CUDA graph. On the CPU a position
    outside ``[0, C)`` is an error; on CUDA (where checking would cost a sync) it is skipped.

    Shape:
        k_cache, v_cache: [G, B, C, Hkv, D], k, v: [B, S, Hkv, D], positions: [B, S] int64
    """
    _ops.kv_cache_write.default(k_cache, v_cache, k, v, positions, group)


def ntk_alpha_rope_base(rope_theta: float, alpha: float, head_dim: int) -> float:
    """Hunyuan-Large's fixed NTK-alpha RoPE base: ``theta · alpha^(D / (D - 2))``
    (1e4 and alpha 1e5 at D = 80 give ≈ 1.343e9)."""
    return rope_theta * alpha ** (head_dim / (head_dim - 2))


@torch.library.register_fake("pearlmoe::attention")
def _attention_fake(q, k, v, kv_lens, scale=None):
    op_checks.attention(q, k, v, kv_lens)
    return torch.empty_like(q, memory_format=torch.contiguous_format)  # [B, Sq, Hq, D]


@torch.library.register_fake("pearlmoe::kv_cache_write")
def _kv_cache_write_fake(k_cache, v_cache, k, v, positions, group=0):
    op_checks.kv_cache_write(k_cache, v_cache, k, v, positions, group)


@torch.library.register_fake("pearlmoe::rope_qk_norm")
def _rope_qk_norm_fake(q, k, positions, rope_base, q_weight=None, k_weight=None, eps=1e-5,
                       normalize=True):  # fmt: skip
    op_checks.rope_qk_norm(q, k, positions, rope_base, q_weight, k_weight, normalize)
    q_out = torch.empty_like(q, memory_format=torch.contiguous_format)
    k_hat = torch.empty_like(k, memory_format=torch.contiguous_format)
    return q_out, k_hat


# ---- speculative decoding ------------------------------------------------------------------------


def spec_verify(
    target_probs: Tensor,
    draft_ids: Tensor,
    draft_probs: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Verify n drafted tokens per sequence against the target, for a batch.

    Greedy (``draft_probs=None``): a draft is accepted iff it is the target's argmax. Sampling:
    accept ``x_i`` iff ``u_i <= p_i(x_i) / q_i(x_i)``; the first rejection emits a sample of
    ``normalise(max(p_i - q_i, 0))`` and stops; when all are accepted a bonus token is sampled from
    the last target row. This keeps the output distributed exactly as the target's (lossless).
    The uniforms come from ``generator``, so runs are reproducible. Every probability row must be
    a distribution (finite, >= 0, not all zero) and every draft id in [0, V), else the error names
    the argument and the row; the check reads the values back once (one device sync on CUDA,
    skipped under CUDA-graph capture, where out-of-range ids are rejected and rows without mass
    give token 0).

    Shape:
        target_probs: [B, n+1, V] float32, draft_ids: [B, n] int, draft_probs: [B, n, V] float32
        -> tokens [B, n+1] int64 (accepted drafts, then the correction or bonus token, then -1),
           num_accepted [B] int32
    """
    op_checks.spec_verify(target_probs, draft_ids, draft_probs, drawn=True)
    uniforms = None
    if draft_probs is not None:
        batch, rows = target_probs.shape[:2]
        rng_device = generator.device if generator is not None else target_probs.device
        uniforms = torch.rand(batch, rows, generator=generator, device=rng_device)
        uniforms = uniforms.to(target_probs.device)
    return _ops.spec_verify.default(target_probs, draft_ids, draft_probs, uniforms)


@torch.library.register_fake("pearlmoe::spec_verify")
def _spec_verify_fake(target_probs, draft_ids, draft_probs=None, uniforms=None):
    op_checks.spec_verify(target_probs, draft_ids, draft_probs, uniforms)
    batch, rows = target_probs.shape[:2]
    tokens = target_probs.new_empty(batch, rows, dtype=torch.int64)  # [B, n+1]
    num_accepted = target_probs.new_empty(batch, dtype=torch.int32)  # [B]
    return tokens, num_accepted


@torch.library.register_fake("pearlmoe::grouped_gemm")
def _grouped_gemm_fake(a: Tensor, b: Tensor, group_offsets: Tensor):
    op_checks.grouped_gemm(a, b, group_offsets)
    return a.new_empty(a.shape[0], b.shape[1])  # [M, N]


@torch.library.register_fake("pearlmoe::grouped_gemm_wgrad")
def _grouped_gemm_wgrad_fake(grad_c: Tensor, a: Tensor, group_offsets: Tensor):
    op_checks.grouped_gemm_wgrad(grad_c, a, group_offsets)
    return a.new_empty(group_offsets.shape[0] - 1, grad_c.shape[1], a.shape[1])  # [G, N, K]


@torch.library.register_fake("pearlmoe::moe_ffn_routed")
def _moe_ffn_routed_fake(x, topk_weights, topk_ids, w13, w2, shared_w13=None, shared_w2=None):
    op_checks.moe_ffn_routed(x, topk_weights, topk_ids, w13, w2, shared_w13, shared_w2)
    return x.new_empty(x.shape)  # [T, H]


@torch.library.register_fake("pearlmoe::moe_ffn")
def _moe_ffn_fake(x, router_w, w13, w2, top_k, shared_w13=None, shared_w2=None, renormalize=False):
    op_checks.moe_ffn(x, router_w, w13, w2, top_k, shared_w13, shared_w2)
    return x.new_empty(x.shape)  # [T, H]
