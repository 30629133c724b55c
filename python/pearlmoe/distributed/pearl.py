"""PEARL across processes: the draft on one rank, the target on another (optionally expert-parallel
over a group of ranks led by that one), through torch.distributed point-to-point messages.

Each round both ranks compute at once, as in the official code: the draft drafts γ tokens while
the target scores its uncached tail (the last committed token in pre-verify mode, which checks
e_1; the last committed token and e_1..e_γ in post-verify mode, which checks e_2..e_γ, f_1). Then
one exchange, carrying only what the algorithm needs:

  draft -> target: the γ new draft token ids (int64) and, when sampling, the draft
                   probabilities of exactly the tokens this round verifies ([1 or γ, V]);
  target -> draft: the verdict as integers: accepted count, then the committed tokens.

The target verifies (ops.spec_verify: greedy, or rejection sampling with the target rank's
generator), so the target's probabilities never travel; both ranks then apply the same verdict to
their own state and cache. The state machine is the single-process one (pearlmoe.decode.pearl)
for one sequence.

Shape letters: γ window, V vocabulary.
"""

import time
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .. import ops
from ..decode.autoregressive import _eos_set
from ..decode.common import CachedModel, DecodeStats, check_gamma, emit
from ..decode.sampling import logits_to_probs, sample
from ..model.transformer import Transformer
from .expert_parallel import comm_device

PRE, POST = 0, 1


@torch.inference_mode()
def distributed_pearl_generate(
    model: Transformer,
    prompt: Sequence[int],
    max_new_tokens: int,
    gamma: int,
    role: str,
    peer: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    callback: Callable[[list[int]], None] | None = None,
) -> tuple[list[int], DecodeStats]:
    """Called on both ranks: ``role`` "draft" (model = the draft) or "target" (model = the target,
    the leader of its expert-parallel group if it has one); ``peer`` is the other side's global
    rank. Both return the same new tokens (up to and including EOS) and statistics.

    When sampling, the two sides' generators must be independent streams (seed them differently,
    e.g. seed + rank): the target's acceptance uniforms must not repeat the draft's draws. The
    two sides first exchange and compare vocabulary size, γ, greedy flag, budget and prompt."""
    if role not in ("draft", "target"):
        raise ValueError(f"role must be 'draft' or 'target', got {role!r}")
    check_gamma(gamma)  # a longer window is not computed as decode steps are
    prompt = list(prompt)
    if not prompt:
        raise ValueError("prompt must hold at least one token")
    eos = _eos_set(eos_token_id)
    greedy = temperature <= 0
    vocab = model.config.vocab_size
    comm = comm_device(model.device)
    _handshake(role, peer, comm, [vocab, gamma, int(greedy), max_new_tokens, *_digest(prompt)])
    stats = DecodeStats(gamma=gamma, extra={"pre_rounds": 0, "post_rounds": 0})
    start = time.perf_counter()
    side = CachedModel(model, [prompt], len(prompt) + max_new_tokens + 3 * gamma + 4)
    committed, mode, unverified = list(prompt), PRE, []
    unverified_q: Tensor | None = None  # draft side: q rows of e_2..e_γ [γ-1, V]
    outputs: list[int] = []
    done = max_new_tokens <= 0

    while not done:
        n = 1 if mode == PRE else gamma  # tokens this round verifies
        if role == "draft":
            first = unverified[-1] if mode == POST and unverified else committed[-1]
            row = side.feed([[first]])[0][-1]  # [V]
            xs, qs = [], []
            for i in range(gamma):
                qs.append(logits_to_probs(row, temperature, top_k, top_p))  # [V]
                xs.append(int(sample(qs[-1].unsqueeze(0), generator, greedy)[0]))
                if i + 1 < gamma:
                    row = side.feed([[xs[-1]]])[0][-1]
            dist.send(torch.tensor(xs, dtype=torch.int64, device=comm), peer)
            if not greedy:
                used = qs[:1] if mode == PRE else [*unverified_q, qs[0]]
                dist.send(torch.stack(used).float().to(comm), peer)  # [n, V]
            verdict = torch.empty(gamma + 2, dtype=torch.int64, device=comm)
            dist.recv(verdict, peer)
            accepted, count = int(verdict[0]), int(verdict[1])
            tokens = verdict[2 : 2 + count].tolist()
        else:
            feed = [committed[-1], *unverified] if mode == POST else [committed[-1]]
            p = logits_to_probs(side.feed([feed])[0], temperature, top_k, top_p)  # [n, V]
            received = torch.empty(gamma, dtype=torch.int64, device=comm)
            dist.recv(received, peer)
            xs = received.tolist()
            q = None
            if not greedy:
                q = torch.empty(n, vocab, dtype=torch.float32, device=comm)
                dist.recv(q, peer)
                q = q.to(model.device).unsqueeze(0)  # [1, n, V]
            window = torch.tensor([[*unverified, xs[0]] if mode == POST else [xs[0]]],
                                  device=model.device)  # [1, n]  # fmt: skip
            rows = torch.cat([p, p[-1:]]).unsqueeze(0)  # [1, n+1, V]: no bonus token in PEARL
            out, acc = ops.spec_verify(rows, window, q, generator)
            accepted = int(acc[0])
            tokens = out[0, : accepted + (accepted < n)].tolist()
            verdict = torch.zeros(gamma + 2, dtype=torch.int64)
            verdict[0], verdict[1] = accepted, len(tokens)
            verdict[2 : 2 + len(tokens)] = torch.tensor(tokens, dtype=torch.int64)
            dist.send(verdict.to(comm), peer)
        stats.target_calls += 1
        stats.draft_calls += gamma
        stats.extra["pre_rounds" if mode == PRE else "post_rounds"] += 1
        stats.proposed += n
        stats.accepted += accepted
        step: list[int] = []
        done = emit(tokens, outputs, step, eos, max_new_tokens)
        stats.emitted += len(step)
        committed.extend(tokens)
        if callback is not None and step:
            callback(step)
        if not done and accepted == n:  # all accepted: e_2..e_γ of this round stay unverified
            mode, unverified = POST, xs[1:]
            if role == "draft" and not greedy:
                unverified_q = qs[1:]
            keep = len(side.tokens[0])
        else:
            mode, unverified, unverified_q = PRE, [], None
            keep = len(committed) - 1
        side.truncate([keep])
    stats.seconds = time.perf_counter() - start
    return outputs, stats


def _digest(prompt: list[int]) -> list[int]:
    """Length and a position-weighted checksum of the prompt (to catch mismatched prompts)."""
    return [len(prompt), sum((i + 1) * t for i, t in enumerate(prompt)) % (2**61 - 1)]


def _handshake(role: str, peer: int, comm: torch.device, mine: list[int]) -> None:
    """Swap the settings both sides must share; both raise (neither hangs) on a mismatch."""
    names = ["vocab_size", "gamma", "greedy", "max_new_tokens", "prompt length", "prompt checksum"]
    own = torch.tensor(mine, dtype=torch.int64, device=comm)
    other = torch.empty_like(own)
    if role == "draft":
        dist.send(own, peer)
        dist.recv(other, peer)
    else:
        dist.recv(other, peer)
        dist.send(own, peer)
    diff = [
        f"{n} {a} vs {b}" for n, a, b in zip(names, mine, other.tolist(), strict=True) if a != b
    ]
    if diff:
        raise ValueError(f"{role} and its peer (rank {peer}) disagree: " + ", ".join(diff))
