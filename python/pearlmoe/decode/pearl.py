"""PEARL: parallel speculative decoding with adaptive draft length (Liu et al., ICLR 2025).

Draft and target run at the same time: two threads (each model's forward releases the GIL), and
on a GPU each thread on its own CUDA stream. Every sequence of the batch is in one of two modes:

  pre-verify:  the draft drafts e_1..e_γ while the target scores the last committed token,
               which pre-verifies e_1. Reject: emit the correction, roll the draft back, stay.
               Accept: commit e_1, keep e_2..e_γ unverified, go to post-verify.
  post-verify: the draft drafts f_1..f_γ after e_γ while the target scores e_1..e_γ, which
               verifies the window e_2..e_γ, f_1. All accepted: commit it, f_2..f_γ become the
               unverified tokens, stay (the effective draft length grows by γ each round).
               Rejected at n: commit the n accepted and the correction, roll both back, go to
               pre-verify.

Verification is ``ops.spec_verify`` (greedy, or rejection sampling with the draft probabilities
kept for the unverified tokens), so the output is lossless; unlike the official code no token ids
travel through floating point. The caches obey: target = committed[:-1]; draft = committed[:-1]
(pre) or committed + unverified[:-1] (post). Rollback happens only after both sides have joined.

Shape letters: B sequences, γ window, V vocabulary.
"""

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

from .. import ops
from ..model.transformer import Transformer
from .autoregressive import _eos_set, _prompts
from .common import CachedModel, DecodeStats, auto_gamma, check_pair, emit
from .sampling import logits_to_probs, sample

PRE, POST = 0, 1


class _Side:
    """Runs one model's work for a round, on its own CUDA stream when the model is on a GPU, and
    on a CPU with its share of the cores (the thread count is per thread: set in the worker)."""

    def __init__(self, model: Transformer, cpu_threads: int) -> None:
        self.stream = torch.cuda.Stream(model.device) if model.device.type == "cuda" else None
        self.cpu_threads = cpu_threads

    def run(self, fn: Callable[[], object]) -> object:
        torch.set_num_threads(self.cpu_threads)
        with torch.inference_mode():
            if self.stream is None:
                return fn()
            with torch.cuda.stream(self.stream):
                out = fn()
            self.stream.synchronize()  # the join: results are complete when run() returns
            return out


def _verify(
    p: Tensor, drafts: Tensor, q: Tensor | None, generator
) -> tuple[list[list[int]], list[int]]:
    """spec_verify over windows without a bonus token: the last target row is duplicated so the
    op has its n+1 rows, and a bonus it samples after a full accept is dropped."""
    rows = torch.cat([p, p[:, -1:]], dim=1)  # [B, n+1, V]
    q = None if q is None else q.to(p.device)  # the draft may run on another device
    tokens, accepted = ops.spec_verify(rows, drafts.to(p.device), q, generator)
    n = drafts.shape[1]
    out = []
    for b, a in enumerate(accepted.tolist()):
        out.append(tokens[b, : a + (a < n)].tolist())
    return out, accepted.tolist()


@torch.inference_mode()
def pearl_generate(
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
    ``gamma=None`` uses the measured target/draft step-time ratio (Theorem 1: γ = c)."""
    check_pair(target, draft)
    prompts = _prompts(input_ids)
    batch, eos = len(prompts), _eos_set(eos_token_id)
    gamma = gamma or auto_gamma(target, draft, batch)
    greedy = temperature <= 0
    stats = DecodeStats(gamma=gamma, extra={"pre_rounds": 0, "post_rounds": 0})
    start = time.perf_counter()
    capacity = max(map(len, prompts)) + max_new_tokens + 3 * gamma + 4
    tgt, drf = CachedModel(target, prompts, capacity), CachedModel(draft, prompts, capacity)
    # On a CPU the two sides split the cores: each forward's intra-op pool would otherwise take
    # them all and the two sides would only take turns (measured: 186 vs 238 tok/s on 2 cores).
    share = max(1, torch.get_num_threads() // 2)
    target_side, draft_side = _Side(target, share), _Side(draft, share)

    committed = [list(p) for p in prompts]
    mode = [PRE] * batch
    unverified: list[list[int]] = [[] for _ in prompts]  # e_2..e_γ in post mode
    unverified_q: list[Tensor | None] = [None] * batch  # their draft probabilities [γ-1, V]
    outputs: list[list[int]] = [[] for _ in prompts]
    done = [max_new_tokens <= 0] * batch

    def draft_round() -> tuple[Tensor, Tensor]:
        # The draft's cache lacks e_γ (post) or the last committed token (pre, or post at γ=1).
        first = [
            [u[-1]] if m == POST and u else [c[-1]]
            for m, u, c in zip(mode, unverified, committed, strict=True)
        ]
        rows = torch.stack([lg[-1] for lg in drf.feed(first)])  # [B, V]
        qs, xs = [], []
        for i in range(gamma):
            qs.append(logits_to_probs(rows, temperature, top_k, top_p))
            xs.append(sample(qs[-1], generator, greedy))
            if i + 1 < gamma:
                rows = torch.stack([lg[-1] for lg in drf.feed([[int(x)] for x in xs[-1]])])
        return torch.stack(xs, 1), torch.stack(qs, 1)  # [B, γ], [B, γ, V]

    def target_round() -> list[Tensor]:
        feeds = [
            [c[-1], *u] if m == POST else [c[-1]]
            for m, u, c in zip(mode, unverified, committed, strict=True)
        ]
        return [logits_to_probs(lg, temperature, top_k, top_p) for lg in tgt.feed(feeds)]

    def _run_rounds() -> None:
        with ThreadPoolExecutor(max_workers=2) as pool:
            while not all(done):
                drafted = pool.submit(draft_side.run, draft_round)
                scored = pool.submit(target_side.run, target_round)
                (xs, qs), p_rows = drafted.result(), scored.result()
                stats.draft_calls += gamma
                stats.target_calls += 1

                # Verify each mode's sequences together (their windows have one length).
                emitted: list[list[int]] = [[] for _ in prompts]
                results: dict[int, tuple[list[int], int]] = {}
                for m, n in ((PRE, 1), (POST, gamma)):
                    idx = [b for b in range(batch) if mode[b] == m]
                    if not idx:
                        continue
                    stats.extra["pre_rounds" if m == PRE else "post_rounds"] += 1
                    window = torch.stack(
                        [
                            torch.tensor(unverified[b] + [int(xs[b, 0])], device=xs.device)
                            if m == POST
                            else xs[b, :1]
                            for b in idx
                        ]
                    )  # [n_seq, n]
                    p = torch.stack([p_rows[b][:n] for b in idx])  # [n_seq, n, V]
                    q = None
                    if not greedy:
                        q = torch.stack([
                            torch.cat([unverified_q[b], qs[b, :1]]) if m == POST else qs[b, :1]
                            for b in idx
                        ])  # fmt: skip
                    tokens, accepted = _verify(p, window, q, generator)
                    for j, b in enumerate(idx):
                        results[b] = (tokens[j], accepted[j])

                t_lens, d_lens = [], []
                for b in range(batch):
                    tokens, a = results[b]
                    was = mode[b]
                    n = 1 if was == PRE else gamma
                    if not done[b]:
                        stats.proposed += n
                        stats.accepted += a
                        done[b] = emit(tokens, outputs[b], emitted[b], eos, max_new_tokens)
                    committed[b].extend(tokens)
                    if done[b]:  # finished: reset to pre-verify on what is committed
                        mode[b], unverified[b], unverified_q[b] = PRE, [], None
                        t_lens.append(len(committed[b]) - 1)
                        d_lens.append(len(committed[b]) - 1)
                    elif a == n:  # all accepted: the drafts after x_1 stay unverified
                        mode[b] = POST
                        unverified[b] = xs[b, 1:].tolist()
                        unverified_q[b] = qs[b, 1:]
                        t_lens.append(len(tgt.tokens[b]))
                        d_lens.append(len(drf.tokens[b]))
                    else:  # rejected: back to pre-verify on the committed tokens
                        mode[b], unverified[b], unverified_q[b] = PRE, [], None
                        t_lens.append(len(committed[b]) - 1)
                        d_lens.append(len(committed[b]) - 1)
                tgt.truncate(t_lens)
                drf.truncate(d_lens)
                stats.emitted += sum(len(e) for e in emitted)
                if callback is not None:
                    callback(emitted)

    _run_rounds()
    stats.seconds = time.perf_counter() - start
    return outputs, stats
