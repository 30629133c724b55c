"""Vanilla speculative decoding (draft γ tokens, then one target pass verifies them), batched,
with per-sequence acceptance and rollback. Lossless: greedy output equals greedy autoregressive
output; sampled output follows the target distribution (``ops.spec_verify``).

Every round has the same shapes, so each side's steps are static (pearlmoe.decode.runner): the
target scores [last, d_1..d_γ] (γ+1 tokens) for every sequence; the draft re-feeds the committed
token before ``last`` together with ``last`` (2 tokens; in place, at the same position, so its
cache is unchanged) and then drafts. Acceptance moves each side's lengths with tensor ops; the
round's only host sync is reading the emitted tokens.

Shape letters: B sequences, γ draft length, V vocabulary.
"""

import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .. import ops
from ..model.transformer import Transformer
from .autoregressive import _eos_set, _prompts
from .common import DecodeStats, check_pair, emit, gamma_policy
from .runner import Runner, Sampling
from .sampling import sample


def draft_tokens(
    drf: Runner, feed: Tensor, gamma: int, generator: torch.Generator | None
) -> tuple[Tensor, Tensor | None]:
    """γ draft tokens after ``feed`` [B, w] (which the draft caches): (tokens [B, γ], their
    distributions [B, γ, V] or None when greedy). Advances the draft's lengths by w + γ - 1."""
    probs, greedy = drf(feed)
    drf.lens.add_(feed.shape[1])
    xs, qs = [], []
    for i in range(gamma):
        if greedy is not None:
            xs.append(greedy[:, -1].clone())  # clone: a CUDA graph's output buffer is reused
        else:
            qs.append(probs[:, -1].clone())
            xs.append(sample(qs[-1], generator))
        if i + 1 < gamma:
            probs, greedy = drf(xs[-1].unsqueeze(1))
            drf.lens.add_(1)
    return torch.stack(xs, 1), (torch.stack(qs, 1) if qs else None)


def verify(
    p: Tensor | None,
    target_tokens: Tensor | None,
    drafts: Tensor,
    q: Tensor | None,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor]:
    """Accepted counts [B] (int64) and the token after the accepted drafts [B] (the correction,
    or the bonus when all are accepted), for drafts [B, n] against the target's n+1 rows.

    Greedy (target_tokens [B, n+1] given): a draft is accepted iff it is the target's argmax, as
    ``ops.spec_verify`` does with one-hot rows, without building them. Sampled: spec_verify's
    rejection sampling over p [B, n+1, V] and q [B, n, V]."""
    if target_tokens is not None:
        n = drafts.shape[1]
        accepted = (drafts == target_tokens[:, :n]).long().cumprod(1).sum(1)  # [B]
        return accepted, target_tokens.gather(1, accepted.unsqueeze(1)).squeeze(1)
    tokens, accepted = ops.spec_verify(p, drafts, q, generator)
    accepted = accepted.long()
    return accepted, tokens.gather(1, accepted.unsqueeze(1)).squeeze(1)


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
    backend: str = "eager",
) -> tuple[list[list[int]], DecodeStats]:
    """Each sequence's new tokens (up to and including its EOS) and the run's statistics.
    ``gamma=None`` picks the draft length from the measured cost curve and the acceptance rate
    seen so far, and re-picks it as decoding goes (pearlmoe.decode.cost_model)."""
    check_pair(target, draft)
    prompts = _prompts(input_ids)
    batch, eos = len(prompts), _eos_set(eos_token_id)
    sampling = Sampling(temperature, top_k, top_p)
    policy = gamma_policy(target, draft, batch, "speculative", backend, gamma)
    stats = DecodeStats(gamma=policy.gamma)
    capacity = max(map(len, prompts)) + max_new_tokens + policy.max_gamma + 2
    tgt = Runner(target, batch, capacity, backend, sampling)
    drf = Runner(draft, batch, capacity, backend, sampling)
    # Compile or capture every step the rounds use first: reported apart from decoding.
    stats.extra["warmup_seconds"] = tgt.warmup([policy.gamma + 1]) + drf.warmup([1, 2])
    start = time.perf_counter()
    tgt.prefill([p[:-1] for p in prompts])
    drf.prefill([p[:-1] for p in prompts])
    device = target.device
    last = torch.tensor([p[-1] for p in prompts], device=device)  # [B] committed, fed to neither
    prev = last.clone()  # [B] the committed token before last (the draft re-feeds it)
    active = torch.ones(batch, dtype=torch.bool, device=device)  # [B] still generating
    outputs: list[list[int]] = [[] for _ in prompts]
    done = [max_new_tokens <= 0] * batch
    first = True

    while not all(done):
        gamma = policy.gamma
        t0, d0 = tgt.lens.clone(), drf.lens.clone()
        feed = last.unsqueeze(1) if first else torch.stack([prev, last], 1)  # [B, 1 or 2]
        drafts, q = draft_tokens(drf, feed.to(drf.device), gamma, generator)  # [B, γ]
        drafts = drafts.to(device)
        p, target_tokens = tgt(torch.cat([last.unsqueeze(1), drafts], 1))  # over γ+1 tokens
        accepted, after = verify(p, target_tokens, drafts, None if q is None else q.to(device),
                                 generator)  # fmt: skip
        stats.draft_calls += gamma
        stats.target_calls += 1

        # Target keeps last and the accepted drafts; the draft keeps everything but the last
        # accepted token (re-fed next round) and the correction.
        tgt.lens.copy_(torch.where(active, t0 + accepted + 1, t0).to(torch.int32))
        d_keep = drf.lens - (gamma - accepted).to(drf.device)
        drf.lens.copy_(torch.where(active.to(drf.device), d_keep, d0).to(torch.int32))
        before_after = drafts.gather(1, (accepted - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
        prev = torch.where(active, torch.where(accepted > 0, before_after, last), prev)
        last = torch.where(active, after, last)
        first = False

        # The round's host sync: accepted counts and emitted tokens (drafts, then `after`).
        steps = torch.arange(gamma + 1, device=device)
        window = torch.cat([drafts, drafts[:, :1]], 1)  # [B, γ+1]
        emitted = torch.where(steps < accepted.unsqueeze(1), window, after.unsqueeze(1))
        rows = torch.cat([accepted.unsqueeze(1), emitted], 1).tolist()
        step: list[list[int]] = [[] for _ in prompts]
        proposed, round_accepted = 0, 0
        for b, (a, *tokens) in enumerate(rows):
            if done[b]:
                continue
            proposed += gamma
            round_accepted += a
            done[b] = emit(tokens[: a + 1], outputs[b], step[b], eos, max_new_tokens)
            if done[b]:
                active[b] = False
        stats.proposed += proposed
        stats.accepted += round_accepted
        policy.update(round_accepted, proposed)
        stats.emitted += sum(len(s) for s in step)
        if callback is not None:
            callback(step)
    stats.seconds = time.perf_counter() - start
    stats.extra["gammas"] = policy.history
    return outputs, stats
