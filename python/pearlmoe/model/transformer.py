"""The Hunyuan-Large transformer composed from pearlmoe ops (dense Llama as a special case).

Per layer: x += o_proj(attention(rope_qk_norm(q_proj(n1(x))), cache)); x += mlp(n2(x)), with
GQA, CLA (the first layer of each group writes the shared, normalised key and the values; the
others reuse them, folding their own key-norm weight into the query), QK-norm after RoPE, and a
MoE MLP (shared expert + top-k routed SwiGLU experts) or a dense SwiGLU MLP. Tied embeddings.
``reference=True`` runs the golden pure-torch ops instead, for parity checks.

Shape letters: B sequences, S new tokens per step, H hidden, Hq/Hkv heads, D head dim, V vocab,
E experts, I expert width.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops, reference
from .config import ModelConfig
from .kv_cache import KVCache
from .quantized import QuantizedWeight, project


def _param(*shape: int, dtype: torch.dtype, device, std: float | None = 0.02) -> nn.Parameter:
    if std is None:
        return nn.Parameter(torch.ones(*shape, dtype=dtype, device=device))
    return nn.Parameter(torch.randn(*shape, device=device).mul_(std).to(dtype))


class RMSNorm(nn.Module):
    """HF semantics: normalise in fp32, cast back, then scale."""

    def __init__(self, size: int, eps: float, dtype: torch.dtype, device) -> None:
        super().__init__()
        self.eps = eps
        self.weight = _param(size, dtype=dtype, device=device, std=None)

    def forward(self, x: Tensor, reference_ops: bool = False) -> Tensor:
        if reference_ops:
            return reference.hf_rms_norm(x, self.weight, self.eps)
        return ops.rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, c: ModelConfig, layer: int, dtype: torch.dtype, device) -> None:
        super().__init__()
        self.layer, self.c = layer, c
        self.owns_kv = c.owns_kv(layer)
        hq, hkv, d, h = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.hidden_size
        self.q_proj = _param(hq * d, h, dtype=dtype, device=device)  # [Hq*D, H]
        self.o_proj = _param(h, hq * d, dtype=dtype, device=device)  # [H, Hq*D]
        if self.owns_kv:
            self.k_proj = _param(hkv * d, h, dtype=dtype, device=device)  # [Hkv*D, H]
            self.v_proj = _param(hkv * d, h, dtype=dtype, device=device)  # [Hkv*D, H]
        if c.use_qk_norm:
            # [D] per head (Hunyuan after RoPE, Qwen3 before), or OLMoE's whole widths
            whole = c.qk_norm_position == "whole"
            self.query_layernorm = _param(hq * d if whole else d, dtype=dtype, device=device,
                                          std=None)  # fmt: skip
            self.key_layernorm = _param(hkv * d if whole else d, dtype=dtype, device=device,
                                        std=None)  # fmt: skip
        if c.qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(hq * d, dtype=dtype, device=device))
            if self.owns_kv:
                self.k_bias = nn.Parameter(torch.zeros(hkv * d, dtype=dtype, device=device))
                self.v_bias = nn.Parameter(torch.zeros(hkv * d, dtype=dtype, device=device))
        if c.o_bias:
            self.o_bias = nn.Parameter(torch.zeros(h, dtype=dtype, device=device))
        # [q; k; v] as one quantised weight (pearlmoe.model.quantized: one call, not three)
        self.qkv_proj: QuantizedWeight | None = None

    def _project(
        self, x: Tensor, reference_ops: bool
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """q [.., Hq*D], k and v [.., Hkv*D] (None without own K/V) with the family's biases,
        pre-RoPE norms and clamp applied."""
        c = self.c
        if self.qkv_proj is not None:
            hq, hkv, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
            qkv = project(x, self.qkv_proj, reference_ops)  # [.., (Hq + 2 Hkv) * D]
            q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
        else:
            q = project(x, self.q_proj, reference_ops)
            k = project(x, self.k_proj, reference_ops) if self.owns_kv else None
            v = project(x, self.v_proj, reference_ops) if self.owns_kv else None
        if c.qkv_bias:
            q = q + self.q_bias
            if self.owns_kv:
                k, v = k + self.k_bias, v + self.v_bias
        if c.use_qk_norm and c.qk_norm_position != "after_rope":
            norm = reference.hf_rms_norm if reference_ops else ops.rms_norm
            whole = c.qk_norm_position == "whole"  # one RMS over all heads of a token

            def normed(t: Tensor, weight: Tensor) -> Tensor:
                if whole:
                    return norm(t, weight, c.rms_norm_eps)
                return norm(t.unflatten(-1, (-1, c.head_dim)), weight, c.rms_norm_eps).flatten(-2)

            q = normed(q, self.query_layernorm)
            k = normed(k, self.key_layernorm) if self.owns_kv else None
        if c.clip_qkv is not None and self.owns_kv:
            q, k, v = (t.clamp(-c.clip_qkv, c.clip_qkv) for t in (q, k, v))
        return q, k, v

    def _out(self, o: Tensor, reference_ops: bool) -> Tensor:
        out = project(o, self.o_proj, reference_ops)
        return out + self.o_bias if self.c.o_bias else out

    def forward(
        self, x: Tensor, cache: KVCache, positions: Tensor, kv_lens: Tensor, reference_ops: bool
    ) -> Tensor:
        c = self.c
        batch, steps, _ = x.shape
        hq, hkv, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        q, k, v = self._project(x, reference_ops)
        q = q.reshape(batch * steps, hq, d)  # [B*S, Hq, D]
        if self.owns_kv:
            k = k.reshape(batch * steps, hkv, d)  # [B*S, Hkv, D]
            v = v.view(batch, steps, hkv, d)  # [B, S, Hkv, D]
        else:
            k = q[:, :0]  # no key of its own: the group's first layer cached it
        rope = reference.rope_qk_norm if reference_ops else ops.rope_qk_norm
        after = c.use_qk_norm and c.qk_norm_position == "after_rope"
        weights = (self.query_layernorm, self.key_layernorm) if after else (None, None)
        if c.rotary_dim < d:  # GLM: rotate the first rotary_dim dims, pass the rest through
            q, k_hat = _partial_rope(rope, q, k, positions.reshape(-1), c)
        else:
            q, k_hat = rope(q, k, positions.reshape(-1), c.rope_base, *weights, c.rms_norm_eps,
                            after)  # fmt: skip
        if self.owns_kv:
            cache.write_at(self.layer, k_hat.view(batch, steps, hkv, d), v, positions)
        k_buf, v_buf = cache.buffers(self.layer)  # [B, C, Hkv, D]
        attend = reference.attention if reference_ops else ops.attention
        o = attend(q.view(batch, steps, hq, d), k_buf, v_buf, kv_lens)  # [B, S, Hq, D]
        return self._out(o.reshape(batch, steps, hq * d), reference_ops)  # [B, S, H]

    def forward_train(self, x: Tensor, shared_kv: list) -> Tensor:
        """Whole sequences, differentiable (torch RoPE / norms and SDPA), Hunyuan's formulation:
        each layer normalises the group's raw keys with its own key norm. shared_kv carries the
        first layer's raw (k, v) to the rest of its CLA group."""
        c = self.c
        batch, steps, _ = x.shape
        hq, hkv, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        q, k, v = self._project(x, reference_ops=True)
        q = q.view(batch, steps, hq, d)
        if self.owns_kv:
            shared_kv[:] = [k.view(batch, steps, hkv, d), v.view(batch, steps, hkv, d)]
        k, v = shared_kv
        positions = torch.arange(steps, device=x.device)
        rd, where = c.rotary_dim, positions.repeat(batch)

        def rotate(t: Tensor) -> Tensor:  # the first rotary_dim dims (all but for GLM)
            r = reference.rope(t[..., :rd], where, c.rope_base)
            return torch.cat([r, t[..., rd:].to(r.dtype)], -1)

        q, k = rotate(q.reshape(-1, hq, d)), rotate(k.reshape(-1, hkv, d))
        if c.use_qk_norm and c.qk_norm_position == "after_rope":
            q = reference.rms_norm(q, self.query_layernorm, c.rms_norm_eps)
            k = reference.rms_norm(k, self.key_layernorm, c.rms_norm_eps)
        q = q.to(x.dtype).view(batch, steps, hq, d).transpose(1, 2)  # [B, Hq, S, D]
        k = k.to(x.dtype).view(batch, steps, hkv, d).transpose(1, 2)  # [B, Hkv, S, D]
        o = F.scaled_dot_product_attention(q, k, v.transpose(1, 2), is_causal=True, enable_gqa=True)
        return self._out(o.transpose(1, 2).reshape(batch, steps, hq * d), reference_ops=True)


def _partial_rope(rope, q: Tensor, k: Tensor, positions: Tensor, c: ModelConfig):
    """RoPE on the first rotary_dim dims of each head (its own angle table over those dims, as
    HF's partial_rotary_factor builds it), the rest unchanged: q [T, Hq, D], k [T, Hkv, D]."""
    rd = c.rotary_dim
    q_rot, k_rot = rope(q[..., :rd].contiguous(), k[..., :rd].contiguous(), positions,
                        c.rope_base, None, None, c.rms_norm_eps, False)  # fmt: skip
    return torch.cat([q_rot, q[..., rd:]], -1), torch.cat([k_rot, k[..., rd:]], -1)


class MoE(nn.Module):
    """Shared expert + top-k routed SwiGLU experts, in the op layouts: w13 stacks each expert's
    gate_proj then up_proj rows."""

    def __init__(self, c: ModelConfig, dtype: torch.dtype, device) -> None:
        super().__init__()
        self.c = c
        e, h, i, shared = (
            c.num_experts,
            c.hidden_size,
            c.expert_intermediate_size,
            c.shared_intermediate_size,
        )
        self.router = _param(e, h, dtype=torch.float32, device=device)  # [E, H], fp32 as in HF
        self.w13 = _param(e, 2 * i, h, dtype=dtype, device=device)  # [E, 2I, H]
        self.w2 = _param(e, h, i, dtype=dtype, device=device)  # [E, H, I]
        self.shared_w13 = _param(2 * shared, h, dtype=dtype, device=device) if shared else None
        self.shared_w2 = _param(h, shared, dtype=dtype, device=device) if shared else None
        # Qwen2-MoE: the shared expert's output scaled by sigmoid(x · shared_gate) per token
        gated = shared and c.shared_expert_gate
        self.shared_gate = _param(1, h, dtype=dtype, device=device) if gated else None  # [1, H]
        # GLM-4.5: the selection-only correction bias of the sigmoid router (fp32, as in HF)
        bias = torch.zeros(e, dtype=torch.float32, device=device)
        self.register_buffer("correction_bias", bias if c.router == "sigmoid_grouped" else None)
        # Expert parallelism (pearlmoe.distributed.shard_experts): w13/w2 hold experts
        # expert_offset.. of this rank only, and the layer exchanges token-slots with the others.
        self.expert_offset = 0
        self.expert_parallel = None

    def forward(self, x: Tensor, reference_ops: bool) -> Tensor:
        moe_ffn = reference.moe_ffn if reference_ops else ops.moe_ffn
        if self.expert_parallel is not None:
            moe_ffn = self.expert_parallel.moe_ffn
        flat = x.reshape(-1, x.shape[-1])  # [B*S, H]
        if self.correction_bias is not None:
            return self._grouped(flat, reference_ops).view_as(x)
        gated = self.shared_gate is not None  # then the shared expert runs beside the op
        y = moe_ffn(
            flat, self.router, self.w13, self.w2, self.c.moe_topk,
            None if gated else self.shared_w13, None if gated else self.shared_w2,
            self.c.renormalize,
        )  # fmt: skip
        if gated:
            y = y + self._gated_shared(flat, reference_ops)
        return y.view_as(x)

    def _grouped(self, flat: Tensor, reference_ops: bool) -> Tensor:
        """GLM-4.5's layer: fp32 router logits, grouped_topk, the experts combined in fp32, plus
        the ungated shared expert: [T, H]."""
        if self.expert_parallel is not None:
            raise NotImplementedError("expert parallelism runs softmax routers only (not GLM's)")
        c = self.c
        linear = reference.linear if reference_ops else ops.linear
        logits = linear(flat.float(), self.router)  # [T, E] fp32
        topk = reference.grouped_topk if reference_ops else ops.grouped_topk
        weights, ids = topk(logits, self.correction_bias, c.moe_topk, c.n_group, c.topk_group,
                            c.renormalize, c.routed_scaling_factor)  # fmt: skip
        routed = reference.moe_ffn_routed if reference_ops else ops.moe_ffn_routed
        return routed(flat, weights, ids, self.w13, self.w2, self.shared_w13, self.shared_w2)

    def _gated_shared(self, flat: Tensor, reference_ops: bool) -> Tensor:
        """Qwen2-MoE's shared expert: sigmoid(x · w_gate) · swiglu(x), [T, H]."""
        linear = reference.linear if reference_ops else ops.linear
        gate = torch.sigmoid(linear(flat, self.shared_gate))  # [T, 1]
        return gate * swiglu(flat, self.shared_w13, self.shared_w2, reference_ops)

    def forward_train(self, x: Tensor, routing: dict) -> tuple[Tensor, Tensor]:
        """Training routing (capacity, recycle) through the differentiable op; returns the
        output and this layer's load-balancing loss."""
        if self.correction_bias is not None:
            raise NotImplementedError(
                "training GLM-4.5's sigmoid / grouped router is not supported (inference only)"
            )
        # pearlmoe's ops take one dtype for activations and weights, so do autocast's job by
        # hand: the expert GEMMs in the autocast dtype, the router in fp32 as always.
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        dtype = dtype or self.w13.dtype
        flat = x.reshape(-1, x.shape[-1]).to(dtype)  # [B*S, H]
        gated = self.shared_gate is not None  # then the shared expert runs beside the op
        shared = (None, None) if gated else (self.shared_w13, self.shared_w2)
        cast = [None if w is None else w.to(dtype) for w in (self.w13, self.w2, *shared)]
        with torch.autocast(device, enabled=False):
            y, stats = ops.moe_ffn(
                flat, self.router, cast[0], cast[1], self.c.moe_topk, cast[2], cast[3],
                self.c.renormalize, return_stats=True, **routing,
            )  # fmt: skip
        y = y.to(x.dtype)
        if gated:
            y = y + self._gated_shared(x.reshape(-1, x.shape[-1]), reference_ops=True)
        return y.view_as(x), stats.load_balancing_loss()


def swiglu(x: Tensor, w13: Tensor, w2: Tensor, reference_ops: bool) -> Tensor:
    """down(silu(gate(x)) * up(x)) with w13 = [gate_proj; up_proj]: [..., H]."""
    if reference_ops and not isinstance(w13, QuantizedWeight):
        return reference.swiglu_mlp(x.reshape(-1, x.shape[-1]), w13, w2).view_as(x)
    gate, up = project(x, w13, reference_ops).chunk(2, dim=-1)  # [..., I] each
    return project(F.silu(gate) * up, w2, reference_ops)  # [..., H]


class DenseMLP(nn.Module):
    def __init__(self, c: ModelConfig, dtype: torch.dtype, device) -> None:
        super().__init__()
        h, i = c.hidden_size, c.intermediate_size
        self.w13 = _param(2 * i, h, dtype=dtype, device=device)  # [2I, H]: gate_proj; up_proj
        self.w2 = _param(h, i, dtype=dtype, device=device)  # [H, I]

    def forward(self, x: Tensor, reference_ops: bool) -> Tensor:
        return swiglu(x, self.w13, self.w2, reference_ops)


class Block(nn.Module):
    def __init__(self, c: ModelConfig, layer: int, dtype: torch.dtype, device) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype, device)
        self.self_attn = Attention(c, layer, dtype, device)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype, device)
        self.mlp = MoE(c, dtype, device) if c.is_moe_layer(layer) else DenseMLP(c, dtype, device)

    def forward(
        self, x: Tensor, cache: KVCache, positions: Tensor, kv_lens: Tensor, reference_ops: bool
    ) -> Tensor:
        h = self.input_layernorm(x, reference_ops)
        x = x + self.self_attn(h, cache, positions, kv_lens, reference_ops)
        return x + self.mlp(self.post_attention_layernorm(x, reference_ops), reference_ops)


class Transformer(nn.Module):
    def __init__(
        self, config: ModelConfig, dtype: torch.dtype = torch.float32, device="cpu"
    ) -> None:
        super().__init__()
        c = self.config = config
        rows = c.vocab_size if c.trimmed_vocab_size is None else c.trimmed_vocab_size + 1
        self.embed_tokens = _param(rows, c.hidden_size, dtype=dtype, device=device)  # [V|V'+1, H]
        if c.trimmed_vocab_size is None:
            self.vocab_ids = self.vocab_rows = None
        else:
            # vocab_ids[r]: the token of head row r; vocab_rows[t]: token t's embedding row
            # (row V' for the tokens the draft does not score).
            self.register_buffer(
                "vocab_ids", torch.arange(c.trimmed_vocab_size, dtype=torch.int32, device=device)
            )  # [V']
            self.register_buffer(
                "vocab_rows",
                torch.arange(c.vocab_size, device=device).clamp_(max=c.trimmed_vocab_size),
                persistent=False,
            )  # [V]
        self.layers = nn.ModuleList(Block(c, i, dtype, device) for i in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype, device)
        self.lm_head = (
            None if c.tie_word_embeddings
            else _param(c.vocab_size, c.hidden_size, dtype=dtype, device=device)
        )  # fmt: skip
        self.expert_parallel = None  # set by pearlmoe.distributed.shard_experts

    @torch.no_grad()
    def set_vocab(self, vocab_ids: Tensor) -> None:
        """A trimmed vocabulary's token ids [V'] (distinct, in [0, vocab_size)), head row order."""
        c = self.config
        ids = torch.as_tensor(vocab_ids).to(self.device, torch.int64)
        kept = c.trimmed_vocab_size
        if ids.shape != (kept,) or ids.min() < 0 or ids.max() >= c.vocab_size:
            raise ValueError(
                f"set_vocab: vocab_ids must be {kept} token ids in [0, {c.vocab_size}), got "
                f"shape {tuple(ids.shape)}"
            )
        if ids.unique().numel() != kept:
            raise ValueError("set_vocab: vocab_ids must be distinct")
        self.vocab_ids.copy_(ids)
        self.vocab_rows.fill_(kept)
        self.vocab_rows[ids] = torch.arange(kept, device=self.device)

    def _embed(self, input_ids: Tensor) -> Tensor:
        rows = input_ids if self.vocab_rows is None else self.vocab_rows[input_ids]
        return F.embedding(rows, self.embed_tokens)  # [B, S, H]

    def _head(self) -> Tensor | QuantizedWeight:
        if self.lm_head is not None:
            return self.lm_head
        if self.vocab_ids is not None:
            return self.embed_tokens[: self.config.trimmed_vocab_size]  # [V', H]
        return self.embed_tokens

    def full_vocab(self, logits: Tensor) -> Tensor:
        """Trimmed-vocabulary logits [..., V'] placed in the whole vocabulary [..., V] (-inf for
        the tokens not scored); other logits unchanged."""
        if self.vocab_ids is None:
            return logits
        full = logits.new_full((*logits.shape[:-1], self.config.vocab_size), float("-inf"))
        return full.index_copy_(-1, self.vocab_ids.long(), logits)

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.device

    @property
    def dtype(self) -> torch.dtype:
        """The weights' (and so the KV cache's) dtype; follows ``model.to(dtype)``."""
        return self.embed_tokens.dtype

    def new_cache(self, batch_size: int, capacity: int) -> KVCache:
        c = self.config
        return KVCache(
            num_layers=c.num_hidden_layers, batch_size=batch_size, capacity=capacity,
            kv_heads=c.num_key_value_heads, head_dim=c.head_dim,
            cla_share_factor=c.cla_share_factor, dtype=self.dtype, device=self.device,
        )  # fmt: skip

    def forward_train(
        self,
        input_ids: Tensor,
        capacity_factor: float | None = None,
        recycle: bool = False,
        generator: torch.Generator | None = None,
        full_vocab: bool = True,
    ) -> tuple[Tensor, Tensor]:
        """Differentiable whole-sequence forward for training: logits [B, S, V] (a trimmed
        vocabulary's [B, S, V'] when not full_vocab) and the summed load-balancing loss of the
        MoE layers (capacity and recycle routing as configured)."""
        routing = dict(capacity_factor=capacity_factor, recycle=recycle, generator=generator)
        x = self._embed(input_ids)  # [B, S, H]
        aux = x.new_zeros((), dtype=torch.float32)
        shared_kv: list = []
        for block in self.layers:
            h = block.input_layernorm(x, reference_ops=True)
            x = x + block.self_attn.forward_train(h, shared_kv)
            h = block.post_attention_layernorm(x, reference_ops=True)
            if isinstance(block.mlp, MoE):
                y, layer_aux = block.mlp.forward_train(h, routing)
                aux = aux + layer_aux
            else:
                y = block.mlp(h, reference_ops=True)
            x = x + y
        logits = F.linear(self.norm(x, reference_ops=True), self._head()).float()
        return (self.full_vocab(logits) if full_vocab else logits), aux

    def forward(
        self, input_ids: Tensor, cache: KVCache | None = None, reference_ops: bool = False
    ) -> Tensor:
        """Logits [B, S, V] in fp32 for the S new tokens of every sequence, appended to the
        cache after each sequence's current length (a fresh cache when none is given); checks
        the capacity on the host, then runs ``step`` and advances the lengths."""
        batch, steps = input_ids.shape
        if cache is None:
            cache = self.new_cache(batch, steps)
        cache._check_room([steps] * batch)
        logits = self.step(input_ids, cache, reference_ops)
        cache.advance(steps)
        return logits

    def step(self, input_ids: Tensor, cache: KVCache, reference_ops: bool = False) -> Tensor:
        """The static decode / verification step: fp32 logits [B, S, V] for S new tokens per
        sequence, whose K/V go to positions ``cache.lens[b] + 0..S-1``.

        No host work: no checks, no ``.item()``, lengths and positions stay on the device, and
        the lengths are not advanced (the caller moves ``cache.lens``, by as many tokens as it
        keeps). So it traces into one graph (``torch.compile(fullgraph=True)``) and replays as a
        CUDA graph. A sequence may use fewer than its S rows (right padding): the rows after its
        real tokens see only earlier keys, their outputs are ignored, and the K/V they write past
        the sequence's end are overwritten later. The caller keeps ``lens + S <= capacity``.
        """
        steps = input_ids.shape[1]
        if self.expert_parallel is not None:
            self.expert_parallel.announce(self.device)  # idle ranks of the group join this forward
        positions = cache.lens.long().unsqueeze(1) + torch.arange(steps, device=self.device)
        kv_lens = cache.lens + steps  # [B] int32: keys each sequence's last row sees
        x = self._embed(input_ids)  # [B, S, H]
        for block in self.layers:
            x = block(x, cache, positions, kv_lens, reference_ops)
        logits = project(self.norm(x, reference_ops), self._head(), reference_ops).float()
        return self.full_vocab(logits)  # [B, S, V]

    @torch.no_grad()
    def forward_idle(self) -> None:
        """An expert-parallel rank without tokens: join every MoE layer's exchange with none,
        serving the token-slots the other ranks send to this rank's experts."""
        empty = torch.empty(0, self.config.hidden_size, dtype=self.dtype, device=self.device)
        for block in self.layers:
            if isinstance(block.mlp, MoE):
                block.mlp(empty, reference_ops=False)
