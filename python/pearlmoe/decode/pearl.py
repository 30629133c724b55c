"""PEARL: parallel speculative decoding with adaptive draft length (Liu et al., ICLR 2025).

Draft and target run at the same time: the draft on a worker thread, the target on the calling
thread; on a CPU each with half the cores (and with the compile backend each side's step runs in
C++ without the GIL), on a GPU each on its own CUDA stream. Every sequence of the batch is in one
of two modes:

  pre-verify:  the draft drafts e_1..e_γ while the target scores the last committed token,
               which pre-verifies e_1. Reject: emit the correction, roll the draft back, stay.
               Accept: commit e_1, keep e_2..e_γ unverified, go to post-verify.
  post-verify: the draft drafts f_1..f_γ after e_γ while the target scores e_1..e_γ, which
               verifies the window e_2..e_γ, f_1. All accepted: commit it, f_2..f_γ become the
               unverified tokens, stay (the effective draft length grows by γ each round).
               Rejected at n: commit the n accepted and the correction, roll both back, go to
               pre-verify.

With the prompt lookup (the fused CPU rounds) the draft takes the lookup's token
wherever the lookup finds one, so where it finds a run at a round's start those are the draft's
first tokens, known before it drafts: the lookahead adds them to the target's window in the same
round (a pre-verify round then verifies e_1..e_k and the target's next token, not e_1 alone).

Verification is greedy argmax comparison or ``ops.spec_verify``'s rejection sampling with the
draft probabilities kept for the unverified tokens, so the output is lossless; no token ids travel
through floating point. The caches obey: target = committed[:-1]; draft = committed[:-1] (pre) or
committed + unverified[:-1] (post). The state is tensors; the round syncs with the host once.

Shape letters: B sequences, γ window, V vocabulary.
"""

import contextlib
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

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
    side_threads,
    speculation_gate,
    token_history,
)
from .cost_model import SpeculationGate
from .draft_process import DraftProcess
from .pearl_rounds import DeviceRounds, HostRounds
from .runner import Runner, Sampling, effective_backend
from .speculative import PLAIN_STEPS, draft_tokens

PRE, POST = 0, 1


class _Side:
    """One side's thread setup: its CUDA stream on a GPU, its share of the cores on a CPU (the
    thread count is per thread, so it is set in the thread that runs the side)."""

    def __init__(self, model: Transformer, cpu_threads: int) -> None:
        self.stream = torch.cuda.Stream(model.device) if model.device.type == "cuda" else None
        self.cpu_threads = cpu_threads

    def run(self, fn: Callable[[], object]) -> tuple[object, float]:
        """fn's result and its seconds (the stream synchronised: the join)."""
        start = time.perf_counter()
        with torch.inference_mode():
            if self.stream is None:
                return fn(), time.perf_counter() - start
            with torch.cuda.stream(self.stream):
                out = fn()
            self.stream.synchronize()
            return out, time.perf_counter() - start


class _ThreadDraft:
    """The draft side on a worker thread (a GPU or another device, or eager CPU runs): the same
    submit / result interface as DraftProcess."""

    def __init__(self, runner: Runner, side: _Side, pool: ThreadPoolExecutor, generator) -> None:
        self.runner, self.side, self.pool, self.generator = runner, side, pool, generator
        self.lens, self.device = runner.lens, runner.device
        self._future = None

    def prefill(self, prompts: list[list[int]]) -> None:
        self._future = self.pool.submit(self.side.run, lambda: self.runner.prefill(prompts))

    def wait(self) -> None:
        self._future.result()

    def submit(self, first: Tensor, gamma: int) -> None:
        feed = first.unsqueeze(1).to(self.device)
        self._future = self.pool.submit(
            self.side.run, lambda: draft_tokens(self.runner, feed, gamma, self.generator)
        )

    def result(self) -> tuple[Tensor, Tensor | None, float]:
        (xs, qs), seconds = self._future.result()
        return xs, qs, seconds


class _FusedDraft(_ThreadDraft):
    """The draft side as a C++ thread (``torch.classes.pearlmoe.CpuDraftWorker``): greedy
    drafting with the fused backend on the CPU. Handing a round's feed over and the drafts back
    is an atomic flag each way, with no Python thread, future or GIL hand-over in between (its
    prefill runs on the caller's thread, after the target's: see pearl_generate)."""

    def __init__(self, runner: Runner, side: _Side, pool: ThreadPoolExecutor) -> None:
        super().__init__(runner, side, pool, None)
        self.worker = None

    def start(self) -> None:
        """Start the C++ thread once the prefills are done and the caller's other threads have
        stopped spinning (``cpu_pool_rest``). Started beside a spinning OpenMP team (an eager
        decode just before) or pool helper, it was placed on the caller's core and the rounds'
        jobs started late: 0.31 ms a round after an eager decode, PEARL at 1415 tok/s against
        2274 (bench/NOTES.md v14)."""
        torch.ops.pearlmoe.cpu_pool_rest()
        self.worker = torch.classes.pearlmoe.CpuDraftWorker(self.runner.fused_step,
                                                            self.side.cpu_threads)  # fmt: skip

    def submit(self, first: Tensor, gamma: int) -> None:
        c = self.runner.cache
        self.worker.submit(first.unsqueeze(1).long(), c.k, c.v, c.lens, gamma)

    def result(self) -> tuple[Tensor, None, float]:  # type: ignore[override]
        return self.worker.result(), None, self.worker.seconds()


def draft_thread_lent(
    target: Transformer, draft: Transformer, backend: str, draft_process: bool = False
) -> bool:
    """Whether PEARL's rounds lend the draft's thread to the target once it has drafted: the
    C++ rounds on fused CPU steps (greedy or sampled), through the claiming pool (with OpenMP's
    the target's team would take the draft's core)."""
    return (
        not draft_process
        and target.device.type == draft.device.type == "cpu"
        and all(effective_backend(m, backend) == "fused" for m in (target, draft))
        and torch.ops.pearlmoe.cpu_pool() == "claim"
    )


# PEARL rounds one C++ call runs at most (PearlRounds.rounds), as speculative decoding's
# ROUNDS_PER_CALL: the Python host work of a round paid once a call.
ROUNDS_PER_CALL = 16


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
    backend: str = "eager",
    draft_process: bool | None = None,
    bookkeeping: str = "auto",
    lookup: int = LOOKUP,
    draft_helps: bool = True,
    lookahead: bool = True,
    gate: "bool | SpeculationGate | None" = None,
) -> tuple[list[list[int]], DecodeStats]:
    """Each sequence's new tokens (up to and including its EOS) and the run's statistics.
    ``gamma=None`` picks the window from the measured cost curve and the acceptance rate seen so
    far, and re-picks it between rounds with nothing unverified (pearlmoe.decode.cost_model).
    ``draft_process``: draft in a child process (pearlmoe.decode.draft_process) instead of a
    thread; by default when both models are on the CPU and either side compiles its step (the
    fused backend's steps release the GIL, so its sides overlap on threads).
    ``bookkeeping``: "host" (the default on a CPU, greedy or sampling on fused steps, where the
    whole round, its draws included, is one C++ call) or "device" (pearlmoe.decode.
    pearl_rounds). ``lookup``: the prompt lookup's n-gram length for drafts in the C++ rounds
    (pearlmoe.decode.common.LOOKUP; 0: the draft model alone, as on other paths; sampled, the
    lookup's token is proposed with all its mass, which rejection sampling keeps lossless).
    ``draft_helps``: in the C++ rounds (on pearlmoe's claiming CPU pool), the draft's thread runs
    the target's work from the end of its drafting until its next job (its core would otherwise
    idle while the target verifies). ``lookahead``: in the C++ rounds with the lookup, a round's
    target window also scores the drafts the lookup already knows the draft will draft this
    round (a pre-verify round would otherwise verify only the first). ``gate``: in the C++
    rounds, the loop measures its rounds against plain steps of the target alone and runs
    whichever commits more tokens a second (cost_model.SpeculationGate; speculative_generate's
    ``gate``; None, the default, gates batches of more than one sequence); False runs PEARL's
    rounds throughout. ``callback`` receives each round's tokens; in the C++ rounds, those of
    one call (up to ROUNDS_PER_CALL) come in a burst when it returns."""
    if lookup < 0:
        raise ValueError(f"pearl_generate: lookup must be >= 0, got {lookup}")
    check_pair(target, draft)
    prompts = _prompts(input_ids)
    batch, eos = len(prompts), _eos_set(eos_token_id)
    sampling = Sampling(temperature, top_k, top_p)
    # Lent in the C++ rounds: greedy, or sampled unless the Python rounds are asked for.
    helps = (
        draft_helps
        and draft_thread_lent(target, draft, backend, bool(draft_process))
        and (sampling.greedy or bookkeeping != "device")
    )
    policy = gamma_policy(target, draft, batch, "pearl", backend, gamma, helped=helps)
    gamma = policy.gamma
    greedy = sampling.greedy
    stats = DecodeStats(gamma=gamma, extra={"pre_rounds": 0, "post_rounds": 0})
    round_times = {"wall": 0.0, "draft": 0.0, "target": 0.0, "slower": 0.0, "alone": 0.0,
                   "draft_start": 0.0}  # fmt: skip
    by_width: dict[int, list] = {}
    capacity = max(map(len, prompts)) + max_new_tokens + 2 * policy.max_gamma + 2
    tgt = Runner(target, batch, capacity, backend, sampling)
    # On a CPU the two sides split the cores: each step's intra-op pool would otherwise take
    # them all and the sides would only take turns.
    cores = torch.get_num_threads()  # plain steps (the gate's) take them all, as AR does
    share = side_threads()
    if draft_process is None:  # a child process where the GIL would make the sides take turns
        draft_process = target.device.type == draft.device.type == "cpu" and "compile" in (
            effective_backend(target, backend),
            effective_backend(draft, backend),
        )  # the fused step runs without the GIL: its sides overlap on threads
    pool = ThreadPoolExecutor(1, initializer=torch.set_num_threads, initargs=(share,))
    device = target.device
    draft_prompts = [p[:-1] for p in prompts]
    # Sampled rounds run in C++ (draws, verification, commit) where both sides are fused steps.
    fused_sampling = (
        not greedy
        and tgt.samples_in_one_call
        and not draft_process
        and effective_backend(draft, backend) == "fused"
    )
    if bookkeeping == "auto":
        on_host = device.type == "cpu" and (greedy or fused_sampling)
        bookkeeping = "host" if on_host else "device"
    if bookkeeping == "host" and not (greedy or fused_sampling):
        raise ValueError("pearl_generate: host bookkeeping is greedy only (or sampling on fused "
                         "CPU steps)")  # fmt: skip
    if bookkeeping not in ("host", "device"):
        raise ValueError(f"bookkeeping must be auto, host or device, got {bookkeeping!r}")
    with num_threads(share):  # compiled code is specialised to its thread count
        stats.extra["warmup_seconds"] = tgt.warmup([1, gamma])
        began = time.perf_counter()
        if draft_process:
            drf = DraftProcess.get(draft, share)
            seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))\
                if generator is not None else 0  # fmt: skip
            drf.start(batch, capacity, backend, sampling, seed, policy.max_gamma,
                      draft.config.vocab_size)  # fmt: skip
        else:
            runner = Runner(draft, batch, capacity, backend, sampling)
            runner.warmup([1])
            if runner.drafts_in_one_call or (fused_sampling and bookkeeping == "host"):
                drf = _FusedDraft(runner, _Side(draft, share), pool)  # the fused backend
            else:
                drf = _ThreadDraft(runner, _Side(draft, share), pool, generator)
        if bookkeeping == "device":
            rounds = DeviceRounds(prompts, device, policy.max_gamma, gamma, greedy, backend, tgt,
                                  drf, generator)  # fmt: skip
            rounds.warmup()
        stats.extra["warmup_seconds"] += time.perf_counter() - began
    stats.extra["draft_process"] = bool(draft_process)
    side_kind = "C++ thread" if isinstance(drf, _FusedDraft) else "thread"
    stats.extra["draft_side"] = "process" if draft_process else side_kind
    stats.extra["bookkeeping"] = bookkeeping
    start = time.perf_counter()
    if isinstance(drf, _FusedDraft):
        # One after the other, each on all the cores: a prompt's prefill is a batched GEMM that
        # two threads speed up (the embedded target's 63 tokens: 10.4 ms on one, 6.6 on two),
        # where side by side the target's would take one core and the draft's the other.
        tgt.prefill(draft_prompts)
        drf.runner.prefill(draft_prompts)
        drf.start()
    else:
        drf.prefill(draft_prompts)  # both sides prefill at once
        with num_threads(share):
            tgt.prefill(draft_prompts)
        drf.wait()
    one_call = bookkeeping == "host" and isinstance(drf, _FusedDraft) and tgt.fused_step is not None
    lookup = lookup if one_call else 0
    stats.extra["lookup"] = lookup
    if one_call:  # on fused steps the whole round (sampled: its draws too) is one C++ call
        t, d = tgt.cache, drf.runner.cache
        history, history_lens = token_history(prompts, max(map(len, prompts)), lookup)
        rounds = torch.classes.pearlmoe.CpuPearlRounds(
            tgt.fused_step, drf.worker, t.k, t.v, t.lens, d.k, d.v, d.lens,
            [p[-1] for p in prompts], [len(p) for p in prompts], history, history_lens, lookup,
            helps, lookahead,
        )  # fmt: skip
        if not greedy:  # a sampler per side: the draft's draws on its own thread
            rounds.sample_with(tgt.sampler(generator), drf.runner.sampler(generator))
    elif bookkeeping == "host":
        rounds = HostRounds(prompts, gamma, tgt, drf)
    stats.extra["round"] = "C++" if one_call else "Python"
    # The draft's thread, lent to the target's pool between its jobs, is one more thread there.
    helps = helps and one_call
    loop_threads = share + 1 if helps else share
    stats.extra["draft_helps"] = helps
    target_side = _Side(target, share)
    host_post = [False] * batch  # the mode on the host: the target's width needs no sync
    outputs: list[list[int]] = [[] for _ in prompts]
    done = [max_new_tokens <= 0] * batch

    gate = speculation_gate(target, draft, batch, "pearl", backend,
                            gate if one_call and greedy else False)  # fmt: skip
    after_plain = False  # plain steps ran since the last round
    guest_chunks = torch.ops.pearlmoe.cpu_pool_guest_chunks() if one_call else 0
    # The target's pool stops keeping parts for the draft when the decode ends, even on an error.
    closing = contextlib.closing(rounds) if one_call else contextlib.nullcontext()
    with pool, num_threads(loop_threads), closing:
        stops = torch.tensor(sorted(eos), dtype=torch.long)  # [E]
        queued: list[tuple] = []  # rounds the last C++ call ran past its first, in order
        spread = 0.0  # the last call's host work a round, past its rounds' walls
        while not all(done):
            round_top = time.perf_counter()
            in_call = 0.0  # seconds of this iteration inside a C++ call
            if queued:  # committed as if each had been its own call
                host, info, (width, drafted) = queued.pop(0)
            elif gate.plain:  # steps of the target alone, ~autoregressive decoding
                steps = min(gate.budget(), PLAIN_STEPS)
                step = [[] for _ in prompts]
                with num_threads(cores):
                    plain_rows = rounds.plain(steps).tolist()
                after_plain = True
                for b, (_, _, _, k, *tokens) in enumerate(plain_rows):
                    host_post[b] = False
                    if done[b]:
                        continue
                    done[b] = emit(tokens[:k], outputs[b], step[b], eos, max_new_tokens)
                    if done[b]:
                        rounds.finish(b)
                end_plain_steps(stats, gate, step, steps, callback, round_top)
                continue
            else:
                if policy.gamma != gamma and (one_call or not any(host_post)):
                    # The C++ rounds verify however many drafts a sequence holds; HostRounds
                    # takes a new γ only between rounds with nothing unverified.
                    gamma = policy.gamma
                    if not one_call:
                        rounds.set_gamma(gamma)
                drafted = gamma
                if one_call:
                    # With the lookup the draft runs on to max_gamma while it finds every next
                    # token: the next round verifies them all in one window (post-verify).
                    extend = policy.max_gamma - gamma if lookup else 0
                    # Several rounds a call (their Python host work paid once), but one where
                    # the gate times each round or the draft first catches up after plain
                    # steps; the call ends after a round in which a sequence finishes.
                    k = min(ROUNDS_PER_CALL, gate.budget() if gate.enabled else ROUNDS_PER_CALL)
                    k = 1 if after_plain else k
                    left = torch.tensor([max_new_tokens - len(o) for o in outputs])
                    called = time.perf_counter()
                    rows_k, seconds_k, sizes_k = rounds.rounds(k, gamma, extend, stops, left)
                    in_call = time.perf_counter() - called
                    # (from the lists: a tensor reduction here is an ATen OpenMP region, whose
                    # team then spins beside the draft's thread: measured 1.4 ms a call)
                    queued = list(
                        zip(rows_k.tolist(), seconds_k.tolist(), sizes_k.tolist(), strict=True)
                    )
                    # The call's host work past its rounds' own walls, spread evenly over them.
                    spread = (in_call - sum(i[6] for _, i, _ in queued)) / len(queued)
                    host, info, (width, drafted) = queued.pop(0)
            model_drafts = None  # (tested, accepted) of the model's drafts, where told apart
            if one_call:
                # The sides' seconds, the draft job's hand-off, and the model's own drafts (the
                # policy prices those: the lookup's come nearly free, and almost always right).
                t_draft, t_target, handoff, model_steps, tested, model_accepted, wall = info
                round_times["wall"] += wall
                round_times["draft_start"] += handoff
                model_drafts = (int(tested), int(model_accepted))
            else:
                rounds.begin()
                width = gamma if any(host_post) else 1
                round_start = time.perf_counter()
                drf.submit(rounds.first(), gamma)
                (p, target_tokens), t_target = target_side.run(lambda w=width: tgt(rounds.feed(w)))
                xs, qs, t_draft = drf.result()
                round_times["wall"] += time.perf_counter() - round_start
            round_times["draft"] += t_draft
            round_times["target"] += t_target
            seen = by_width.setdefault(width, [0, 0.0])  # the target's side per window width
            seen[0] += 1
            seen[1] += t_target
            round_times["slower"] += max(t_draft, t_target)
            steps = int(model_steps) if one_call else drafted  # the draft's costly steps
            if policy.curve is not None:  # the sides as fast as each runs alone
                curve = policy.curve
                round_times["alone"] += curve.side_time(steps * curve.draft, width)
            # Joined, both times are real; but not a round that first filled the draft's cache
            # with the tokens plain steps committed (its draft side, and the fill as host work).
            resumed, after_plain = after_plain, False
            if not resumed:
                policy.observe(width, t_target, steps, t_draft)
            stats.draft_calls += drafted
            stats.target_calls += 1
            if not one_call:
                host = rounds.commit(xs, qs, p, target_tokens)
            step: list[list[int]] = [[] for _ in prompts]
            proposed, round_accepted = 0, 0
            for b, (was_post, verified, a, k, *tokens) in enumerate(host):
                if done[b]:
                    continue
                proposed += verified  # the drafts this round checked for b
                round_accepted += a
                stats.extra["post_rounds" if was_post else "pre_rounds"] += 1
                done[b] = emit(tokens[:k], outputs[b], step[b], eos, max_new_tokens)
                host_post[b] = not done[b] and a == verified
                if done[b]:
                    rounds.finish(b)
            end_round(stats, policy, step, proposed, round_accepted, callback, model_drafts)
            round_end = time.perf_counter()
            if one_call:  # the round's own seconds: its wall, its Python, its share of the call
                seconds = round_end - round_top - in_call + spread + wall
            else:
                seconds = round_end - round_top
            gate.record(sum(map(len, step)), seconds)
            if device.type == "cpu" and not resumed:  # the round's host work past its sides
                policy.observe_host(seconds - max(t_draft, t_target))
    end_decode(stats, policy, start)
    stats.extra["gate"] = gate.summary()
    gate.remember()
    if one_call:  # chunks of the target's steps its draft's thread ran (process-wide count)
        helped = torch.ops.pearlmoe.cpu_pool_guest_chunks() - guest_chunks
        stats.extra["draft_helped_chunks"] = helped
        stats.extra["lookahead_tokens"] = rounds.ahead_tokens()
    stats.extra["overlap"] = round_times["wall"] / max(round_times["slower"], 1e-12)
    if round_times["alone"]:  # against the measured cost curve: what contention costs the sides
        stats.extra["overlap_vs_alone"] = round_times["wall"] / round_times["alone"]
    stats.extra["round_seconds"] = {k: round(v, 6) for k, v in round_times.items()}
    stats.extra["target_by_width"] = {w: (n, round(t, 6)) for w, (n, t) in sorted(by_width.items())}
    return outputs, stats
