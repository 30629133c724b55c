"""Vanilla speculative decoding (draft γ tokens, then one target pass verifies them), batched,
with per-sequence acceptance and rollback. Lossless: greedy output equals greedy autoregressive
output; sampled output follows the target distribution (``ops.spec_verify``).

Shape letters: B sequences, γ draft length, V vocabulary.
"""

import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .. import ops
from ..model.transformer import Transformer
from .autoregressive import _eos_set, _prompts
from .common import CachedModel, DecodeStats, auto_gamma, check_pair, emit
from .sampling import logits_to_probs, sample


@torch.inference_mode()
def speculative_generate(
    target: Transformer,
    draft: Transformer,
    input_ids: Tensor | Sequence[Sequence[int]],
    max_new_tokens: int,
    gamma: int | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    callback: Callable[[list[list[int]]], None] | None = None,
) -> tuple[list[list[int]], DecodeStats]:
    """Each sequence's new tokens (up to and including its EOS) and the run's statistics.
    ``gamma=None`` measures the draft/target step-time ratio and uses it (PEARL's Theorem 1)."""
    check_pair(target, draft)
    prompts = _prompts(input_ids)
    batch, eos = len(prompts), _eos_set(eos_token_id)
    gamma = gamma or auto_gamma(target, draft, batch)
    greedy = temperature <= 0
    stats = DecodeStats(gamma=gamma)
    start = time.perf_counter()
    capacity = max(map(len, prompts)) + max_new_tokens + 2 * gamma + 2  # a window past the end
    tgt, drf = CachedModel(target, prompts, capacity), CachedModel(draft, prompts, capacity)
    last = [p[-1] for p in prompts]  # committed, fed to neither model yet
    pending = [[t] for t in last]  # what the draft feeds before drafting
    outputs: list[list[int]] = [[] for _ in prompts]
    done = [max_new_tokens <= 0] * batch

    while not all(done):
        # Draft γ tokens per sequence.
        rows = torch.stack([lg[-1] for lg in drf.feed(pending)])  # [B, V]
        q, drafts = [], []
        for i in range(gamma):
            q.append(logits_to_probs(rows, temperature, top_k, top_p))  # [B, V]
            drafts.append(sample(q[-1], generator, greedy))  # [B]
            if i + 1 < gamma:
                rows = torch.stack([lg[-1] for lg in drf.feed([[int(d)] for d in drafts[-1]])])
        stats.draft_calls += gamma
        drafted = torch.stack(drafts, 1)  # [B, γ]
        # One target pass over [last, d_1..d_γ] scores every draft and the bonus position.
        feeds = [[t, *d] for t, d in zip(last, drafted.tolist(), strict=True)]
        p = logits_to_probs(torch.stack(tgt.feed(feeds)), temperature, top_k, top_p)  # [B, γ+1, V]
        stats.target_calls += 1
        q_rows = None if greedy else torch.stack(q, 1).to(p.device)  # [B, γ, V]
        tokens, accepted = ops.spec_verify(p, drafted.to(p.device), q_rows, generator)

        step: list[list[int]] = [[] for _ in prompts]
        t_lens, d_lens = [], []
        for b in range(batch):
            base = len(tgt.tokens[b]) - gamma - 1  # cached before this round (committed - 1)
            a = int(accepted[b])
            if done[b]:  # finished: undo the round, keep feeding the same token
                t_lens.append(base)
                d_lens.append(base)
                pending[b] = [last[b]]
                continue
            stats.proposed += gamma
            stats.accepted += a
            done[b] = emit(tokens[b, : a + 1].tolist(), outputs[b], step[b], eos, max_new_tokens)
            # Target: keep last and the accepted drafts. Draft: it cached last, d_1..d_{γ-1}.
            t_lens.append(base + 1 + a)
            d_lens.append(base + 1 + min(a, gamma - 1))
            pending[b] = (
                [int(drafted[b, -1]), int(tokens[b, a])] if a == gamma else [int(tokens[b, a])]
            )
            last[b] = int(tokens[b, a])
        tgt.truncate(t_lens)
        drf.truncate(d_lens)
        stats.emitted += sum(len(s) for s in step)
        if callback is not None:
            callback(step)
    stats.seconds = time.perf_counter() - start
    return outputs, stats
