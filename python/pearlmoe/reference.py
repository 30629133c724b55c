"""Golden pure-torch implementations of every pearlmoe op: the oracle the tests compare against.

Written for clarity, not speed. Shape letters as in ops.py.
"""

import torch
from torch import Tensor

# ---- routing -------------------------------------------------------------------------------------


def topk_softmax(router_logits: Tensor, k: int, renormalize: bool = False) -> tuple[Tensor, Tensor]:
    """Softmax in the logits' precision (fp32, or fp64 for an fp64 oracle), then top-k by logit
    with ties to the lower expert index (NaN ranks as -inf)."""
    probs = torch.softmax(router_logits, dim=-1)  # [T, E]
    key = torch.where(router_logits.isnan(), float("-inf"), router_logits)  # [T, E]
    # A stable descending sort keeps equal keys in index order: ties go to the lower index.
    ids = torch.sort(key, dim=-1, descending=True, stable=True).indices[:, :k]  # [T, k]
    weights = probs.gather(1, ids)  # [T, k]
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights, ids.to(torch.int32)


def grouped_topk(
    router_logits: Tensor,
    correction_bias: Tensor | None,
    k: int,
    num_groups: int = 1,
    topk_groups: int = 1,
    renormalize: bool = True,
    scaling: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """HF's Glm4MoeTopkRouter / DeepSeek-V3 in plain torch: sigmoid scores, experts ranked by
    score + bias (NaN as -inf, ties to the lower index); with groups, only the topk_groups groups
    whose two best keys sum highest stay in play and the rest get key 0.0; weights the unbiased
    scores, / (sum + 1e-20) on request, times scaling."""
    scores = router_logits.sigmoid()  # [T, E]
    key = scores if correction_bias is None else scores + correction_bias
    key = torch.where(key.isnan(), float("-inf"), key)  # [T, E]
    if num_groups > 1:
        tokens, experts = key.shape
        grouped = key.view(tokens, num_groups, experts // num_groups)  # [T, G, E/G]
        group_key = grouped.topk(2, dim=-1).values.sum(-1)  # [T, G]
        kept = torch.sort(group_key, dim=-1, descending=True, stable=True).indices[:, :topk_groups]
        mask = torch.zeros_like(group_key, dtype=torch.bool).scatter_(1, kept, True)  # [T, G]
        key = torch.where(mask.repeat_interleave(experts // num_groups, dim=1), key, 0.0)
    ids = torch.sort(key, dim=-1, descending=True, stable=True).indices[:, :k]  # [T, k]
    weights = scores.gather(1, ids)  # [T, k]
    if renormalize:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * scaling, ids.to(torch.int32)


def moe_align(topk_ids: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """Stable sort of the flattened slots by expert; -1 (dropped) sorts after every expert."""
    flat = topk_ids.reshape(-1).long()  # [N]
    bucket = torch.where(flat == -1, num_experts, flat)  # [N]
    order = torch.sort(bucket, stable=True).indices  # [N]
    slot_to_row = torch.empty_like(order)
    slot_to_row[order] = torch.arange(order.numel(), device=order.device)
    counts = torch.bincount(bucket, minlength=num_experts + 1)[:num_experts]  # [E]
    offsets = torch.zeros(num_experts + 1, dtype=torch.long, device=flat.device)
    offsets[1:] = counts.cumsum(0)
    return order.int(), slot_to_row.int(), offsets.int()


# ---- expert FFN ----------------------------------------------------------------------------------


def grouped_gemm(a: Tensor, b: Tensor, group_offsets: Tensor) -> Tensor:
    """One matmul per group; rows past the last offset stay zero."""
    out = a.new_zeros(a.shape[0], b.shape[1])  # [M, N]
    offs = group_offsets.tolist()
    for g in range(b.shape[0]):
        out[offs[g] : offs[g + 1]] = a[offs[g] : offs[g + 1]] @ b[g].t()
    return out


def grouped_gemm_wgrad(grad_c: Tensor, a: Tensor, group_offsets: Tensor) -> Tensor:
    offs = group_offsets.tolist()
    grads = [
        grad_c[offs[g] : offs[g + 1]].t() @ a[offs[g] : offs[g + 1]] for g in range(len(offs) - 1)
    ]
    return torch.stack(grads)  # [G, N, K]


def hf_rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-5) -> Tensor:
    """Hugging Face's RMSNorm (what ``ops.rms_norm`` computes): normalise in fp32 (fp64 for fp64
    inputs), cast back, then scale."""
    x32 = x.double() if x.dtype == torch.float64 else x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def linear(x: Tensor, weight: Tensor) -> Tensor:
    """x [..., K] · weight [N, K]^T -> [..., N]."""
    return torch.nn.functional.linear(x, weight)


# GGUF block formats: bytes per block of 32 values (ops.qlinear).
GGUF_BLOCK_BYTES = {"q4_0": 18, "q4_1": 20, "q8_0": 34}


def dequantize(qweight: Tensor, format: str, dtype: torch.dtype = torch.float32) -> Tensor:
    """llama.cpp's blocks [N, K/32 * bytes] (uint8) -> [N, K]: Q4_0 ``(q - 8)·d``, Q4_1
    ``q·d + m``, Q8_0 ``q·d`` with fp16 d, m, in fp32 (exact but for Q4_1's one rounding)."""
    n, size = qweight.shape[0], GGUF_BLOCK_BYTES[format]
    blocks = qweight.reshape(n, qweight.shape[1] // size, size)  # [N, K/32, bytes]
    d = blocks[..., 0:2].contiguous().view(torch.float16).float()  # [N, K/32, 1]
    if format == "q8_0":
        q = blocks[..., 2:].contiguous().view(torch.int8).float()  # [N, K/32, 32]
        w = q * d
    else:
        packed = blocks[..., 4:] if format == "q4_1" else blocks[..., 2:]  # [N, K/32, 16]
        q = torch.cat([packed & 15, packed >> 4], dim=-1).float()  # [N, K/32, 32]
        if format == "q4_1":
            w = q * d + blocks[..., 2:4].contiguous().view(torch.float16).float()
        else:
            w = (q - 8) * d
    return w.reshape(n, qweight.shape[1] // size * 32).to(dtype)  # [N, K]


def qlinear(x: Tensor, qweight: Tensor, format: str) -> Tensor:
    """x [..., K] · dequant(qweight)^T in fp32 -> [..., N] in x's dtype."""
    return (x.float() @ dequantize(qweight, format).t()).to(x.dtype)


def swiglu_mlp(x: Tensor, w13: Tensor, w2: Tensor) -> Tensor:
    """down(silu(gate(x)) * up(x)) with w13 = [gate; up] stacked as [2I, H] and w2 [H, I]."""
    inter = w2.shape[1]
    h = x @ w13.t()  # [T, 2I]
    return (torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]) @ w2.t()  # [T, H]


def moe_ffn_routed(
    x: Tensor,
    topk_weights: Tensor,
    topk_ids: Tensor,
    w13: Tensor,
    w2: Tensor,
    shared_w13: Tensor | None = None,
    shared_w2: Tensor | None = None,
) -> Tensor:
    """The per-expert loop users write by hand: each expert's tokens through its SwiGLU MLP in
    x's dtype, combined in fp32 (fp64 for fp64 inputs)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = torch.zeros(x.shape, dtype=acc, device=x.device)  # [T, H]
    for e in range(w13.shape[0]):
        token, choice = (topk_ids == e).nonzero(as_tuple=True)
        if token.numel() == 0:
            continue
        out = swiglu_mlp(x[token], w13[e], w2[e])  # [n, H]
        y.index_add_(0, token, out.to(acc) * topk_weights[token, choice].to(acc).unsqueeze(1))
    if shared_w13 is not None:
        y += swiglu_mlp(x, shared_w13, shared_w2).to(acc)
    return y.to(x.dtype)


def moe_ffn(
    x: Tensor,
    router_w: Tensor,
    w13: Tensor,
    w2: Tensor,
    top_k: int,
    shared_w13: Tensor | None = None,
    shared_w2: Tensor | None = None,
    renormalize: bool = False,
) -> Tensor:
    """Hunyuan-Large's MoE layer: fp32 (fp64 for fp64 inputs) router softmax, top-k with raw
    probabilities as weights unless renormalize, plus the shared expert."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    logits = x.to(acc) @ router_w.to(acc).t()  # [T, E]
    weights, ids = topk_softmax(logits, top_k, renormalize)
    return moe_ffn_routed(x, weights, ids, w13, w2, shared_w13, shared_w2)


# ---- attention -----------------------------------------------------------------------------------


def attention(
    q: Tensor, k: Tensor, v: Tensor, kv_lens: Tensor, scale: float | None = None
) -> Tensor:
    """Per sequence: full score matrix, explicit bottom-right causal mask, softmax in fp32
    (fp64 for fp64 inputs); Q·K and P·V in the inputs' dtype."""
    batch, q_len, q_heads, dim = q.shape
    group = q_heads // k.shape[2]
    scale = dim**-0.5 if scale is None else scale
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.empty_like(q)
    for b in range(batch):
        kv_len = int(kv_lens[b])
        kb = k[b, :kv_len].repeat_interleave(group, dim=1)  # [L, Hq, D]
        vb = v[b, :kv_len].repeat_interleave(group, dim=1)  # [L, Hq, D]
        scores = torch.einsum("qhd,khd->hqk", q[b], kb).to(acc) * scale  # [Hq, Sq, L]
        row = torch.arange(q_len, device=q.device).unsqueeze(1)
        key = torch.arange(kv_len, device=q.device).unsqueeze(0)
        visible = key < kv_len - q_len + row + 1  # [Sq, L]
        probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
        out[b] = torch.einsum("hqk,khd->qhd", probs.to(q.dtype), vb)
    return out


def kv_cache_write(
    k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, positions: Tensor, group: int = 0
) -> None:
    """k_cache[group, b, positions[b, s]] = k[b, s] (v likewise), in place."""
    rows = torch.arange(k.shape[0], device=k.device).unsqueeze(1)  # [B, 1]
    k_cache[group][rows, positions] = k
    v_cache[group][rows, positions] = v


def rope(x: Tensor, positions: Tensor, base: float) -> Tensor:
    """NeoX rotate-half RoPE over the full head dim. Angles in fp32 as HF builds its tables
    (inv_freq = 1 / base^(2i/D)); the rotation in fp32, fp64 for fp64 inputs."""
    dim = x.shape[-1]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    inv_freq = (1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))).to(x.device)
    angle = positions.float().unsqueeze(1) * inv_freq.unsqueeze(0)  # [T, D/2]
    emb = torch.cat([angle, angle], dim=-1).to(acc).unsqueeze(1)  # [T, 1, D]
    x = x.to(acc)
    rotated = torch.cat([-x[..., dim // 2 :], x[..., : dim // 2]], dim=-1)
    return x * emb.cos() + rotated * emb.sin()


def rms_norm(x: Tensor, weight: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    out = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return out if weight is None else out * weight.to(out.dtype)


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
    q_rot, k_rot = rope(q, positions, rope_base), rope(k, positions, rope_base)
    if not normalize:
        return q_rot.to(q.dtype), k_rot.to(k.dtype)
    q_out = rms_norm(q_rot, q_weight, eps)
    if k_weight is not None:
        q_out = q_out * k_weight.to(q_out.dtype)
    return q_out.to(q.dtype), rms_norm(k_rot, None, eps).to(k.dtype)


# ---- speculative decoding ------------------------------------------------------------------------


def spec_verify(
    target_probs: Tensor,
    draft_ids: Tensor,
    draft_probs: Tensor | None = None,
    uniforms: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Token by token, as Leviathan et al. state it; the last uniform of each sequence samples
    the correction / bonus token by inverse CDF (float64 cumulative sums)."""
    batch, rows = target_probs.shape[:2]
    n = rows - 1
    tokens = torch.full((batch, rows), -1, dtype=torch.int64)
    accepted = torch.zeros(batch, dtype=torch.int32)

    def sample(weights: Tensor, u: float) -> int:
        weights = weights.double()
        if weights.sum() <= 0:
            raise AssertionError("no mass")
        cum = weights.cumsum(0)
        hits = ((cum > u * cum[-1]) & (weights > 0)).nonzero()
        return int(hits[0]) if hits.numel() else int((weights > 0).nonzero()[-1])

    for b in range(batch):
        p, x = target_probs[b].cpu(), draft_ids[b].cpu()
        for i in range(rows):
            if i == n:
                tokens[b, i] = (
                    int(p[i].argmax())
                    if draft_probs is None
                    else sample(p[i], float(uniforms[b, n]))
                )
                accepted[b] = n
                break
            if draft_probs is None:
                ok = int(x[i]) == int(p[i].argmax())
            else:
                q = draft_probs[b, i].cpu()
                ok = float(uniforms[b, i]) * float(q[x[i]]) <= float(p[i, x[i]])
            if ok:
                tokens[b, i] = x[i]
                continue
            if draft_probs is None:
                tokens[b, i] = int(p[i].argmax())
            else:
                residual = (p[i] - draft_probs[b, i].cpu()).clamp(min=0)
                if residual.sum() <= 0:
                    residual = p[i]
                tokens[b, i] = sample(residual, float(uniforms[b, n]))
            accepted[b] = i
            break
    return tokens, accepted
