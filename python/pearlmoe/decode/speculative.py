"""Vanilla speculative decoding (draft γ tokens, then one target pass verifies them), batched,
with per-sequence acceptance and rollback. Lossless: greedy output equals greedy autoregressive
output; sampled output follows the target distribution (``ops.spec_verify``).

Every round has the same shapes, so each side's steps are static (pearlmoe.decode.runner): the
target scores [last, d_1..d_γ] (γ+1 tokens) for every sequence (C++ rounds on fused steps:
every sequence still decoding, finished ones leaving their slots); the draft re-feeds the
committed token before ``last`` together with ``last`` (2 tokens; in place, at the same
position, so its cache is unchanged) and then drafts. Acceptance moves each side's lengths with
tensor ops; the round's only host sync is reading the emitted tokens.

Shape letters: B sequences, γ draft length, V vocabulary.
"""

import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .. import ops
from ..model.transformer import Transformer
from .autoregressive import _eos_set, _prompts
from .common import (
    LOOKUP,
    DecodeStats,
    check_pair,
    emit,
    end_decode,
    end_plain_steps,
    end_round,
    gamma_policy,
    num_threads,
    pad,
    round_fn,
    speculation_gate,
    stand_ins,
    token_history,
)
from .cost_model import SpeculationGate
from .runner import Runner, Sampling
from .sampling import sample


def draft_tokens(
    drf: Runner, feed: Tensor, gamma: int, generator: torch.Generator | None
) -> tuple[Tensor, Tensor | None]:
    """γ draft tokens after ``feed`` [B, w] (which the draft caches): (tokens [B, γ], their
    distributions [B, γ, V] or None when greedy). Advances the draft's lengths by w + γ - 1."""
    if drf.drafts_in_one_call:
        return drf.draft(feed, gamma), None
    probs, greedy = drf(feed)
    drf.lens.add_(feed.shape[1])
    xs, qs = [], []
    reused = drf.backend == "cudagraph"  # its outputs live in buffers the next replay overwrites
    for i in range(gamma):
        if greedy is not None:
            xs.append(greedy[:, -1].clone() if reused else greedy[:, -1])
        else:
            qs.append(probs[:, -1].clone() if reused else probs[:, -1])
            xs.append(sample(qs[-1], generator))
        if i + 1 < gamma:
            probs, greedy = drf(xs[-1].unsqueeze(1))
            drf.lens.add_(1)
    return torch.stack(xs, 1), (torch.stack(qs, 1) if qs else None)


def sampled_verify(
    p: Tensor, drafts: Tensor, q: Tensor, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """Accepted counts [B] (int64) and the token after the accepted drafts [B] (the correction,
    or the bonus when all are accepted): ``ops.spec_verify``'s rejection sampling of drafts
    [B, n] against the target's rows p [B, n+1, V] and the draft's q [B, n, V]."""
    tokens, accepted = ops.spec_verify(p, drafts, q, generator)
    accepted = accepted.long()
    return accepted, tokens.gather(1, accepted.unsqueeze(1)).squeeze(1)


def _commit(
    drafts: Tensor, accepted: Tensor, after: Tensor, gamma: Tensor | int, active: Tensor,
    t0: Tensor, d_lens: Tensor, d0: Tensor, prev: Tensor, last: Tensor,
) -> tuple[Tensor, ...]:  # fmt: skip
    """A verified round's new state: both sides' lengths [B] int32, prev and last [B], and the
    host rows [B, 2 + w] for drafts [B, w]: the accepted count a, then the a accepted drafts
    and ``after``. Sequences not active keep their state."""
    # Target keeps last and the accepted drafts; the draft keeps everything but the last
    # accepted token (re-fed next round) and the correction.
    t_lens = torch.where(active, t0 + accepted + 1, t0)
    d_lens = torch.where(active, d_lens - (gamma - accepted), d0)
    before_after = drafts.gather(1, (accepted - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
    prev = torch.where(active, torch.where(accepted > 0, before_after, last), prev)
    last = torch.where(active, after, last)
    cols = torch.arange(drafts.shape[1] + 1, device=drafts.device)
    window = torch.cat([drafts, drafts[:, :1]], 1)  # [B, w + 1]
    emitted = torch.where(cols < accepted.unsqueeze(1), window, after.unsqueeze(1))
    host = torch.cat([accepted.unsqueeze(1), emitted], 1)
    return t_lens.int(), d_lens.int(), prev, last, host


def _greedy_round(
    drafts: Tensor, target_tokens: Tensor, gamma: Tensor, active: Tensor, t0: Tensor,
    d_lens: Tensor, d0: Tensor, prev: Tensor, last: Tensor,
) -> tuple[Tensor, ...]:  # fmt: skip
    """Greedy verification and commit of a round on buffers of a fixed width G (the policy's
    largest γ) with γ a 0-d tensor, so the compile backend runs it as one call, never
    recompiled when γ changes. drafts [B, G] (the γ drafts first), target_tokens [B, G + 1] (the
    target's argmax over [last, d_1..d_γ]); returns what ``_commit`` does."""
    cols = torch.arange(drafts.shape[1], device=drafts.device)
    match = (drafts == target_tokens[:, :-1]) & (cols < gamma)
    accepted = match.long().cumprod(1).sum(1)  # [B]
    after = target_tokens.gather(1, accepted.unsqueeze(1)).squeeze(1)  # correction or bonus
    return _commit(drafts, accepted, after, gamma, active, t0, d_lens, d0, prev, last)


def _host_round(
    drafts: Tensor, target_tokens: Tensor, prev: Tensor, last: Tensor, done: list[bool],
    feed_width: int, tgt: Runner, drf: Runner,
) -> tuple[list[list[int]], Tensor, Tensor]:  # fmt: skip
    """Greedy verification and commit of a round on the host's ints (``bookkeeping="host"``):
    the rows ``_commit`` returns, new prev and last [B], both sides' lengths written. The draft
    advanced every sequence by feed_width + γ - 1 this round; the target did not move."""
    gamma = drafts.shape[1]
    t_lens, d_lens = tgt.lens.tolist(), drf.lens.tolist()
    prev_l, last_l, rows = prev.tolist(), last.tolist(), []
    scored_rows = target_tokens.tolist()  # [B][γ + 1]
    for b, (drafted, scored) in enumerate(zip(drafts.tolist(), scored_rows, strict=True)):
        a = 0
        while a < gamma and drafted[a] == scored[a]:
            a += 1
        rows.append([a, *drafted[:a], scored[a]])
        if done[b]:  # keeps its state: the draft back to where it was
            d_lens[b] -= feed_width + gamma - 1
            continue
        t_lens[b] += a + 1  # last and the accepted drafts
        d_lens[b] -= gamma - a  # all but the last accepted token (re-fed) and the correction
        prev_l[b] = drafted[a - 1] if a > 0 else last_l[b]
        last_l[b] = scored[a]
    tgt.lens.copy_(torch.tensor(t_lens, dtype=torch.int32))
    drf.lens.copy_(torch.tensor(d_lens, dtype=torch.int32))
    return rows, torch.tensor(prev_l, device=prev.device), torch.tensor(last_l, device=last.device)


def _retire_finished(
    slots: list[int], live: int, done: list[bool], per_slot: list[Tensor], caches: list[Tensor]
) -> int:
    """Moves finished sequences out of slots 0..live-1: the last live sequence's state is copied
    into a finished one's slot in every per-slot tensor (batch first; empty ones skipped) and
    cache (batch second); a finished sequence's own state is not read again. A row's results do
    not depend on the others', so the rest decode on unchanged. Returns the new live count."""
    slot = 0
    while slot < live:
        if not done[slots[slot]]:
            slot += 1
            continue
        live -= 1
        while live > slot and done[slots[live]]:  # finished at the end: nothing to move
            live -= 1
        if live > slot:
            for t in per_slot:
                if t.numel():
                    t[slot] = t[live]
            for t in caches:
                t[:, slot] = t[:, live]
            slots[slot], slots[live] = slots[live], slots[slot]
            slot += 1
    return live


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
    bookkeeping: str = "auto",
    lookup: int = LOOKUP,
    gate: "bool | SpeculationGate | None" = None,
) -> tuple[list[list[int]], DecodeStats]:
    """Each sequence's new tokens (up to and including its EOS) and the run's statistics.
    ``gamma=None`` picks the draft length from the measured cost curve and the acceptance rate
    seen so far, and re-picks it as decoding goes (pearlmoe.decode.cost_model).
    ``gate=True``: on fused CPU steps, greedy, the loop measures its rounds against plain steps
    of the target alone and runs whichever commits more tokens a second (cost_model.
    SpeculationGate: where verification costs more than it commits, decoding then runs at
    about autoregressive speed); None (the default) and False speculate every round
    (common.speculation_gate gives the measurements behind the default).
    ``lookup``: the prompt lookup's n-gram length for drafts on fused CPU steps (0: the draft
    model alone; other paths draft with the model alone; sampled, the lookup's token is
    proposed with all its mass, which rejection sampling keeps lossless). ``callback`` receives
    each round's tokens; on fused CPU steps, the rounds of one C++ call (up to
    ROUNDS_PER_CALL) come in a burst when it returns.
    ``bookkeeping``: verify and commit a round with tensor ops on the device ("device", what a
    GPU and sampling off fused steps use) or on the host ("host": the default on a CPU, greedy,
    or sampled on fused steps, where the whole round, its draws included, is one C++ call; the
    tensor ops' fixed cost is most of a small model's round: pearlmoe.decode.pearl_rounds)."""
    if lookup < 0:
        raise ValueError(f"speculative_generate: lookup must be >= 0, got {lookup}")
    check_pair(target, draft)
    prompts = _prompts(input_ids)
    batch, eos = len(prompts), _eos_set(eos_token_id)
    sampling = Sampling(temperature, top_k, top_p)
    policy = gamma_policy(target, draft, batch, "speculative", backend, gamma)
    stats = DecodeStats(gamma=policy.gamma)
    # A sequence's last round may commit max_gamma + 1 tokens past its budget, and once done it
    # drafts and scores windows on (unused) until every sequence is: twice max_gamma of room.
    capacity = max(map(len, prompts)) + max_new_tokens + 2 * policy.max_gamma + 2
    tgt = Runner(target, batch, capacity, backend, sampling)
    drf = Runner(draft, batch, capacity, backend, sampling)
    device = target.device
    width_g = policy.max_gamma  # G: the bookkeeping's fixed width
    # Sampled rounds run in C++ (draws, verification, commit) where both sides are fused steps.
    fused_sampling = tgt.samples_in_one_call and drf.samples_in_one_call
    if bookkeeping == "auto":
        on_host = device.type == "cpu" and (sampling.greedy or fused_sampling)
        bookkeeping = "host" if on_host else "device"
    if bookkeeping not in ("host", "device") or (
        bookkeeping == "host" and not (sampling.greedy or fused_sampling)
    ):
        raise ValueError(f"speculative_generate: bookkeeping must be auto, device, or host when "
                         f"greedy or sampling on fused CPU steps; got {bookkeeping!r}")  # fmt: skip
    stats.extra["bookkeeping"] = bookkeeping
    greedy_device = sampling.greedy and bookkeeping == "device"
    bookkeep = round_fn(_greedy_round, device, backend) if greedy_device else None
    # Compile or capture every step the rounds use first: reported apart from decoding.
    stats.extra["warmup_seconds"] = tgt.warmup([policy.gamma + 1]) + drf.warmup([1, 2])
    if bookkeep is not None and bookkeep is not _greedy_round:
        began = time.perf_counter()
        # Distinct contiguous tensors like the loop's (a strided or aliased stand-in compiles a
        # graph whose guards every later call fails first).
        row, window, lens = stand_ins(batch, width_g, device)
        scored = stand_ins(batch, width_g + 1, device)[1]
        bookkeep(window(), scored(), torch.tensor(1, device=device), row() == 0, lens(), lens(),
                 lens(), row(), row())  # fmt: skip
        stats.extra["warmup_seconds"] += time.perf_counter() - began
    start = time.perf_counter()
    tgt.prefill([p[:-1] for p in prompts])
    drf.prefill([p[:-1] for p in prompts])
    last = torch.tensor([p[-1] for p in prompts], device=device)  # [B] committed, fed to neither
    prev = last.clone()  # [B] the committed token before last (the draft re-feeds it)
    active = torch.ones(batch, dtype=torch.bool, device=device)  # [B] still generating
    outputs: list[list[int]] = [[] for _ in prompts]
    done = [max_new_tokens <= 0] * batch
    first = True
    gamma = gamma_t = None
    timed = device.type == drf.device.type == "cpu"
    # On fused steps the whole round (draft, verify, commit; sampled: the draws too) is one C++
    # call.
    one_call = (
        bookkeeping == "host"
        and tgt.fused_step is not None
        and (drf.drafts_in_one_call or fused_sampling)
    )
    sampler = tgt.sampler(generator) if one_call and not sampling.greedy else None
    stats.extra["round"] = "C++" if one_call else "Python"
    lookup = lookup if one_call else 0
    stats.extra["lookup"] = lookup
    history, history_lens = token_history(prompts, capacity + policy.max_gamma + 1, lookup)
    # The C++ rounds step only slots 0..live-1: a finished sequence swaps its slot with the last
    # live one (measured at batch 4: 11% of the target's rows were finished sequences' windows).
    slots, live = list(range(batch)), batch  # slot -> sequence
    stats.extra["target_rows"] = 0
    gate = speculation_gate(target, draft, batch, "speculative", backend,
                            gate if one_call and sampler is None else False)  # fmt: skip
    # After plain steps, the tokens the draft has not cached, fed to it at the next round: the
    # round's usual feed ([prev, last], or [last] at first) and every token committed since.
    pending: Tensor | None = None  # [B, w]

    stops = torch.tensor(sorted(eos), dtype=torch.long)  # [E]
    queued: list[tuple] = []  # rounds the last C++ call ran past its first, to commit in order
    spread = 0.0  # the last call's host work a round, past its rounds' sides
    while not all(done):
        round_top = time.perf_counter()
        in_call = 0.0  # seconds of this iteration inside a C++ call
        if queued:  # committed as if each had been its own call
            (rows, info, n_drafted), catching_up = queued.pop(0), False
        else:
            if policy.gamma != gamma:
                gamma = policy.gamma
                gamma_t = torch.tensor(gamma, device=device)
            feed = last.unsqueeze(1).clone() if first else torch.stack([prev, last], 1)  # [B, w]
            if gate.plain:  # steps of the target alone, ~autoregressive decoding
                pending = feed if pending is None else pending
                pending = _plain_steps(tgt, live, gate, pending, prev, last, history,
                                       history_lens, outputs, slots, done, active, eos,
                                       max_new_tokens, stats, callback, round_top)  # fmt: skip
                per_slot = [prev, last, active, tgt.lens, drf.lens, history, history_lens,
                            pending]  # fmt: skip
                caches = [tgt.cache.k, tgt.cache.v, drf.cache.k, drf.cache.v]
                with num_threads(1):
                    live = _retire_finished(slots, live, done, per_slot, caches)
                first = False
                continue
            # The round after plain steps feeds the draft every token it missed: its sides'
            # times are not a round's (the γ policy does not see them; the gate skips a phase's
            # first).
            catching_up = pending is not None
            if catching_up:
                feed, pending = pending, None
            n_drafted = gamma  # this round's drafts: γ, or more where the lookup ran on
            if one_call:  # prev, last and both sides' lengths move in place
                # Where the lookup finds every next token the drafts run on to max_gamma: a loop
                # in the output is verified in one long window, other text in windows of γ + 1.
                extend = policy.max_gamma - gamma if lookup else 0
                # Several rounds a call (their Python host work paid once; with the gate, no
                # more than its phase has left), but one where the draft catches up; the call
                # ends after a round in which a sequence finishes, so sequences finish and
                # retire between calls.
                k = min(ROUNDS_PER_CALL, gate.budget() if gate.enabled else ROUNDS_PER_CALL)
                k = 1 if catching_up else k
                n = live  # views of the live slots: prefixes along the batch dimension
                left = torch.tensor([max_new_tokens - len(outputs[slots[i]]) for i in range(n)])
                called = time.perf_counter()
                args = (
                    drf.fused_step, feed[:n], prev[:n], last[:n], gamma, tgt.cache.k[:, :n],
                    tgt.cache.v[:, :n], tgt.lens[:n], drf.cache.k[:, :n], drf.cache.v[:, :n],
                    drf.lens[:n], active[:n], history[:n], history_lens[:n], lookup, extend, k,
                    stops, left,
                )  # fmt: skip
                if sampler is None:
                    rows_k, seconds_k, drafted_k = tgt.fused_step.speculative_rounds(*args)
                else:
                    rows_k, seconds_k, drafted_k = tgt.fused_step.sampled_rounds(*args, sampler)
                queued = list(
                    zip(rows_k.tolist(), seconds_k.tolist(), drafted_k.tolist(), strict=True)
                )
                in_call = time.perf_counter() - called
                # The call's host work past its rounds' sides, spread evenly over them (so the
                # policy's and the gate's running figures do not depend on where a call ends).
                spread = (in_call - sum(i[0] + i[1] for _, i, _ in queued)) / len(queued)
                rows, info, n_drafted = queued.pop(0)
        model_drafts = None  # (tested, accepted) of the draft model's own, where told apart
        if one_call:
            stats.extra["target_rows"] += n * (n_drafted + 1)
            draft_s, target_s, model_steps, tested, model_accepted = info
            # The policy prices the draft model's own drafts (their steps' cost, their
            # acceptance), not the lookup's: those cost nearly nothing and are almost always
            # right, and counted in they read α high and drafting cheap (as PEARL's rounds do).
            model_drafts = (int(tested), int(model_accepted))
            sides = stats.extra.setdefault("side_seconds", [0.0, 0.0])  # [draft, target]
            sides[0] += draft_s
            sides[1] += target_s
            if n == batch and not catching_up:  # the curve is the whole batch's: fewer rows
                policy.observe(n_drafted + 1, target_s, int(model_steps), draft_s)  # skew it
            stats.draft_calls += n_drafted
            stats.target_calls += 1
        else:
            if bookkeeping == "device":
                t0, d0 = tgt.lens.clone(), drf.lens.clone()
            began = time.perf_counter()
            drafts, q = draft_tokens(drf, feed.to(drf.device), gamma, generator)  # [B, γ]
            drafts = drafts.to(device)
            drafted = time.perf_counter()
            p, target_tokens = tgt(torch.cat([last.unsqueeze(1), drafts], 1))  # over γ+1 tokens
            stats.extra["target_rows"] += batch * (gamma + 1)
            sides_end = time.perf_counter()
            if timed:  # on a CPU the phases' wall times are the sides' costs (a GPU queues them)
                policy.observe(gamma + 1, sides_end - drafted, gamma, drafted - began)
            stats.draft_calls += gamma
            stats.target_calls += 1
            if bookkeeping == "host":
                rows, prev, last = _host_round(
                    drafts, target_tokens, prev, last, done, feed.shape[1], tgt, drf
                )
            else:
                d_now, d0 = drf.lens.to(device), d0.to(device)
                if bookkeep is not None:
                    t_lens, d_lens, prev, last, host = bookkeep(
                        pad(drafts, width_g), pad(target_tokens, width_g + 1), gamma_t, active, t0,
                        d_now, d0, prev, last,
                    )  # fmt: skip
                else:  # rejection sampling (ops.spec_verify) with the draft's distributions
                    accepted, after = sampled_verify(p, drafts, q.to(device), generator)
                    t_lens, d_lens, prev, last, host = _commit(
                        drafts, accepted, after, gamma, active, t0, d_now, d0, prev, last
                    )
                tgt.lens.copy_(t_lens)
                drf.lens.copy_(d_lens.to(drf.device))
                rows = host.tolist()  # the round's host sync: accepted counts and emitted tokens
        first = False

        step: list[list[int]] = [[] for _ in prompts]
        proposed, round_accepted = 0, 0
        for slot, (a, *tokens) in enumerate(rows):
            b = slots[slot]
            if done[b]:
                continue
            proposed += n_drafted
            round_accepted += a
            done[b] = emit(tokens[: a + 1], outputs[b], step[b], eos, max_new_tokens)
            if done[b]:
                active[slot] = False
        if one_call and not queued:
            per_slot = [prev, last, active, tgt.lens, drf.lens, history, history_lens]
            caches = [tgt.cache.k, tgt.cache.v, drf.cache.k, drf.cache.v]  # [G, B, ...]
            # On one thread: a copy this large would be an ATen OpenMP region, whose idle team
            # then spins for milliseconds beside the fused steps' pool (measured: speculative
            # decoding at batch 4 at 0.6-0.7x).
            with num_threads(1):
                live = _retire_finished(slots, live, done, per_slot, caches)
        end_round(stats, policy, step, proposed, round_accepted, callback, model_drafts)
        round_end = time.perf_counter()
        if one_call:  # a round's host work: its Python bookkeeping and its share of the call's
            host = round_end - round_top - in_call + spread
            seconds = host + info[0] + info[1]  # and with its sides, the round's own seconds
        else:
            seconds = round_end - round_top
            host = seconds - (sides_end - began)
        gate.record(sum(map(len, step)), seconds)
        if timed and (not one_call or n == batch) and not catching_up:
            policy.observe_host(host)
    end_decode(stats, policy, start)
    stats.extra["gate"] = gate.summary()
    gate.remember()
    return outputs, stats


# Speculative rounds one C++ call runs at most (ModelStep.speculative_rounds): from Python a
# round costs ~0.1 ms of host work (the call, its arguments, its results) beside the embedded
# pair's ~1 ms rounds; the γ policy then re-picks between calls, and a streaming callback sees
# the call's rounds one after another when it returns.
ROUNDS_PER_CALL = 16

# Plain steps one C++ call runs at most: fewer calls, and a sequence that ends mid-call wastes
# at most this many less one (its tokens after EOS or its budget are dropped).
PLAIN_STEPS = 8


def _plain_steps(
    tgt: Runner, live: int, gate, pending: Tensor, prev: Tensor, last: Tensor, history: Tensor,
    history_lens: Tensor, outputs: list[list[int]], slots: list[int], done: list[bool],
    active: Tensor, eos: set[int], budget: int, stats: DecodeStats, callback, top: float,
) -> Tensor:  # fmt: skip
    """Greedy steps of the target alone over the live slots (the gate's plain arm, in one C++
    call: ModelStep.draft on the target), committed like a round's; returns the draft's pending
    feed [B, w + m] with the m new tokens appended (the target's cache holds all but last)."""
    m = min(gate.budget(), PLAIN_STEPS)
    tokens = tgt.fused_step.draft(
        last[:live].unsqueeze(1), tgt.cache.k[:, :live], tgt.cache.v[:, :live], tgt.lens[:live], m
    )  # [n, m]
    prev[:live] = tokens[:, -2] if m > 1 else last[:live]
    last[:live] = tokens[:, -1]
    grown = pending.new_zeros(pending.shape[0], pending.shape[1] + m)  # [B, w + m]
    grown[:, : pending.shape[1]] = pending
    grown[:live, pending.shape[1] :] = tokens
    step: list[list[int]] = [[] for _ in outputs]
    for slot, row in enumerate(tokens.tolist()):
        if history.numel():  # the lookup's history: the committed tokens
            h = int(history_lens[slot])
            history[slot, h : h + m] = tokens[slot]
            history_lens[slot] = h + m
        b = slots[slot]
        done[b] = emit(row, outputs[b], step[b], eos, budget)
        if done[b]:
            active[slot] = False
    end_plain_steps(stats, gate, step, m, callback, top)
    return grown
