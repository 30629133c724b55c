"""The CUDA launchers of csrc/kernels called under emulation (tests/emulation.py) with the
arguments the extension's op code passes them: torch tensors in, a Result with the outputs.

Strides and offsets are passed as the tensors have them, so views reach the kernels as they would
from the ops. `exe` selects another build of the driver (the planted-bug tests).
"""

from __future__ import annotations

import torch

import emulation
from emulation import Result

_GEMM_DTYPES = {torch.bfloat16: 0, torch.float16: 1}  # moe_gemm::DType / attention::DType
_ROPE_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # attention::RopeDType


def topk_softmax(logits: torch.Tensor, k: int, renormalize: bool, **kw) -> Result:
    """logits [T, E] f32 with unit column stride -> weights [T, k], ids [T, k]."""
    tokens, experts = logits.shape
    assert logits.dtype == torch.float32 and logits.stride(1) == 1
    return emulation.run(
        "topk_softmax",
        dict(
            row_stride=logits.stride(0),
            tokens=tokens,
            experts=experts,
            k=k,
            renormalize=renormalize,
        ),
        dict(logits=logits),
        dict(weights=((tokens, k), torch.float32), ids=((tokens, k), torch.int32)),
        **kw,
    )


def grouped_topk(logits, bias, k, groups, topk_groups, renormalize, scaling, **kw) -> Result:
    """logits [T, E] f32 with unit column stride, bias [E] or None -> weights [T, k], ids [T, k]."""
    tokens, experts = logits.shape
    assert logits.dtype == torch.float32 and logits.stride(1) == 1
    return emulation.run(
        "grouped_topk",
        dict(
            row_stride=logits.stride(0),
            tokens=tokens,
            experts=experts,
            k=k,
            groups=groups,
            topk_groups=topk_groups,
            renormalize=renormalize,
            scaling=scaling,
        ),
        dict(logits=logits, bias=None if bias is None else bias.contiguous()),
        dict(weights=((tokens, k), torch.float32), ids=((tokens, k), torch.int32)),
        **kw,
    )


def moe_align(topk_ids: torch.Tensor, num_experts: int, **kw) -> Result:
    """topk_ids [T, k] int32/int64 (contiguous, as the op passes them)."""
    n = topk_ids.numel()
    ids = topk_ids.contiguous()
    return emulation.run(
        "moe_align",
        dict(slots=n, experts=num_experts, id_bytes=ids.element_size()),
        dict(ids=ids),
        dict(
            sorted_slots=((n,), torch.int32),
            slot_to_row=((n,), torch.int32),
            expert_offsets=((num_experts + 1,), torch.int32),
        ),
        **kw,
    )


def grouped_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    group_offsets: torch.Tensor,
    m: int,
    a_rows: torch.Tensor | None = None,
    swiglu: bool = False,
    **kw,
) -> Result:
    """grouped_gemm_sm80: a [rows, K] (row stride lda = a.stride(0)), b [G, N, K] contiguous,
    group_offsets [G + 1] int32, optional a_rows [m] int32 -> c [m, N or N/2]."""
    groups, n, k = b.shape
    assert a.stride(1) == 1 and b.is_contiguous()
    return emulation.run(
        "grouped_gemm",
        dict(
            lda=a.stride(0),
            m=m,
            n=n,
            k=k,
            groups=groups,
            dtype=_GEMM_DTYPES[a.dtype],
            swiglu=swiglu,
        ),
        dict(a=a, a_rows=a_rows, b=b, group_offsets=group_offsets),
        dict(c=((m, n // 2 if swiglu else n), a.dtype)),
        **kw,
    )


def silu_and_mul(h: torch.Tensor, routed_rows: torch.Tensor | None = None, **kw) -> Result:
    rows, two_inter = h.shape
    return emulation.run(
        "moe_elementwise",
        dict(op=0, dtype=_GEMM_DTYPES[h.dtype], rows=rows, inter=two_inter // 2),
        dict(h=h.contiguous(), routed_rows=routed_rows),
        dict(out=((rows, two_inter // 2), h.dtype)),
        **kw,
    )


def moe_combine(expert_out, weights, slot_to_row, group_offsets, shared=None, **kw) -> Result:
    tokens, top_k = weights.shape
    hidden = expert_out.shape[1]
    return emulation.run(
        "moe_elementwise",
        dict(
            op=1,
            dtype=_GEMM_DTYPES[expert_out.dtype],
            groups=group_offsets.numel() - 1,
            tokens=tokens,
            top_k=top_k,
            hidden=hidden,
        ),
        dict(
            expert_out=expert_out,
            weights=weights,
            slot_to_row=slot_to_row,
            group_offsets=group_offsets,
            shared=shared,
        ),
        dict(y=((tokens, hidden), expert_out.dtype)),
        **kw,
    )


def zero_tail_rows(c: torch.Tensor, group_offsets: torch.Tensor, **kw) -> Result:
    m, cols = c.shape
    return emulation.run(
        "moe_elementwise",
        dict(op=2, dtype=_GEMM_DTYPES[c.dtype], m=m, cols=cols, groups=group_offsets.numel() - 1),
        dict(c_in=c.contiguous(), group_offsets=group_offsets),
        dict(c=((m, cols), c.dtype)),
        **kw,
    )


def rope_norm(x, positions, inv_freq, weight=None, eps=1e-5, normalize=True, **kw) -> Result:
    """rope_norm_cuda: x [T, H, D] (unit last stride), positions [T] int64, inv_freq [D/2] f32,
    weight [D] f32 or None -> out [T, H, D] contiguous."""
    tokens, heads, dim = x.shape
    assert x.stride(2) == 1
    return emulation.run(
        "rope_norm",
        dict(
            tokens=tokens,
            heads=heads,
            head_dim=dim,
            token_stride=x.stride(0),
            head_stride=x.stride(1),
            eps=eps,
            normalize=normalize,
            dtype=_ROPE_DTYPES[x.dtype],
        ),
        dict(x=x, positions=positions.long().contiguous(), weight=weight, inv_freq=inv_freq),
        dict(out=((tokens, heads, dim), x.dtype)),
        **kw,
    )


def spec_verify(target_probs, draft_ids, draft_probs=None, uniforms=None, **kw) -> Result:
    """spec_verify_cuda on contiguous inputs (as the op passes them)."""
    batch, rows, vocab = target_probs.shape
    return emulation.run(
        "spec_verify",
        dict(batch=batch, num_drafts=rows - 1, vocab=vocab, sampling=draft_probs is not None),
        dict(
            target_probs=target_probs.contiguous(),
            draft_ids=draft_ids.long().contiguous(),
            draft_probs=None if draft_probs is None else draft_probs.contiguous(),
            uniforms=None if uniforms is None else uniforms.contiguous(),
        ),
        dict(tokens=((batch, rows), torch.int64), num_accepted=((batch,), torch.int32)),
        **kw,
    )


def attention(q, k, v, kv_lens, scale=None, num_sms=8, **kw) -> Result:
    """attention_cuda with q, k, v as given (k and v share strides; unit head-dim stride),
    kv_lens [B] int32 -> o [B, Sq, Hq, D]."""
    batch, q_len, q_heads, dim = q.shape
    assert k.stride() == v.stride() and q.stride(3) == 1 and k.stride(3) == 1
    return emulation.run(
        "attention",
        dict(
            q_batch_stride=q.stride(0),
            q_row_stride=q.stride(1),
            q_head_stride=q.stride(2),
            kv_batch_stride=k.stride(0),
            kv_row_stride=k.stride(1),
            kv_head_stride=k.stride(2),
            batch=batch,
            q_len=q_len,
            q_heads=q_heads,
            kv_heads=k.shape[2],
            head_dim=dim,
            kv_capacity=k.shape[1],
            scale=dim**-0.5 if scale is None else scale,
            dtype=_GEMM_DTYPES[q.dtype],
            num_sms=num_sms,
        ),
        dict(q=q, k=k, v=v, kv_lens=kv_lens.int().contiguous()),
        dict(o=((batch, q_len, q_heads, dim), q.dtype)),
        **kw,
    )


def attention_plan(batch, q_len, q_heads, kv_heads, head_dim, capacity, num_sms, lens=()) -> dict:
    """attention_plan for a shape (nothing launched), and for each length in `lens` how many of
    the plan's splits split_tiles keeps busy and the most key tiles one takes."""
    r = emulation.run(
        "attention",
        dict(
            q_batch_stride=0,
            q_row_stride=0,
            q_head_stride=0,
            kv_batch_stride=0,
            kv_row_stride=0,
            kv_head_stride=0,
            batch=batch,
            q_len=q_len,
            q_heads=q_heads,
            kv_heads=kv_heads,
            head_dim=head_dim,
            kv_capacity=capacity,
            scale=1.0,
            dtype=0,
            num_sms=num_sms,
            plan_only=1,
            plan_lens=",".join(map(str, lens)) or "0",
        ),
        {},
        {},
    ).check()
    plan, spread = {}, {}
    for line in r.stdout.splitlines():
        kind, *f = line.split()
        if kind == "plan":
            keys = (
                "prefill",
                "splits",
                "warps_m",
                "m_groups",
                "min_split_tiles",
                "gx",
                "gy",
                "gz",
                "workspace",
            )
            plan = dict(zip(keys, map(int, f), strict=True))
        elif kind == "spread":
            spread[int(f[0])] = (int(f[1]), int(f[2]))
    plan["grid"] = (plan.pop("gx"), plan.pop("gy"), plan.pop("gz"))
    plan["spread"] = spread
    return plan


def kv_cache_write(k_cache, v_cache, k, v, positions, group: int = 0, **kw) -> Result:
    """kv_cache_write_cuda into group `group` of k_cache/v_cache [G, B, C, H, D] (contiguous, as
    the KV cache holds them), k/v [B, S, H, D] with their strides, positions [B, S] int64
    -> the whole caches as written."""
    batch, steps, heads, dim = k.shape
    assert k.stride() == v.stride() and k.stride(3) == 1 and k_cache.is_contiguous()
    group_k, group_v = k_cache[group], v_cache[group]  # [B, C, H, D]
    return emulation.run(
        "kv_cache_write",
        dict(
            cache_bytes=group_k.numel() * group_k.element_size(),
            cache_batch_stride=group_k.stride(0),
            cache_row_stride=group_k.stride(1),
            cache_head_stride=group_k.stride(2),
            new_batch_stride=k.stride(0),
            new_row_stride=k.stride(1),
            new_head_stride=k.stride(2),
            batch=batch,
            steps=steps,
            heads=heads,
            head_dim=dim,
            capacity=group_k.shape[1],
            element_bytes=k.element_size(),
        ),
        dict(
            k_cache_in=group_k.contiguous(),
            v_cache_in=group_v.contiguous(),
            k=k,
            v=v,
            positions=positions.long().contiguous(),
        ),
        dict(k_cache=(tuple(group_k.shape), k.dtype), v_cache=(tuple(group_v.shape), k.dtype)),
        **kw,
    )


def rms_norm(x, weight, eps: float = 1e-5, **kw) -> Result:
    """rms_norm_cuda: x [rows, H] (unit last stride), weight [H] -> out [rows, H]."""
    rows, hidden = x.shape
    assert x.stride(1) == 1
    return emulation.run(
        "rms_norm",
        dict(
            rows=rows, hidden=hidden, row_stride=x.stride(0), eps=eps, dtype=_ROPE_DTYPES[x.dtype]
        ),
        dict(x=x, weight=weight.contiguous()),
        dict(out=((rows, hidden), x.dtype)),
        **kw,
    )


_QUANT_FORMATS = {"q4_0": 0, "q4_1": 1, "q8_0": 2}  # quant::Format


def qlinear(x, qweight, format: str, **kw) -> Result:
    """qlinear_cuda: x [rows, K] (unit last stride), qweight [N, row bytes] -> out [rows, N]."""
    rows, k = x.shape
    assert x.stride(1) == 1 and qweight.is_contiguous()
    n = qweight.shape[0]
    return emulation.run(
        "qlinear",
        dict(
            kernel=0,
            rows=rows,
            n=n,
            k=k,
            row_stride=x.stride(0),
            row_bytes=qweight.shape[1],
            format=_QUANT_FORMATS[format],
            dtype=_ROPE_DTYPES[x.dtype],
        ),
        dict(x=x, w=qweight),
        dict(out=((rows, n), x.dtype)),
        **kw,
    )


def dequantize(qweight, format: str, dtype, k: int, **kw) -> Result:
    """dequantize_cuda: qweight [N, row bytes] -> out [N, K] in dtype."""
    n = qweight.shape[0]
    return emulation.run(
        "qlinear",
        dict(
            kernel=1,
            n=n,
            k=k,
            row_bytes=qweight.shape[1],
            format=_QUANT_FORMATS[format],
            dtype=_ROPE_DTYPES[dtype],
        ),
        dict(w=qweight.contiguous()),
        dict(out=((n, k), dtype)),
        **kw,
    )
