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

Verification is greedy argmax comparison or ``ops.spec_verify``'s rejection sampling with the
draft probabilities kept for the unverified tokens, so the output is lossless; no token ids travel
through floating point. The caches obey: target = committed[:-1]; draft = committed[:-1] (pre) or
committed + unverified[:-1] (post). The state is tensors; the round syncs with the host once.

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
from .common import (
    DecodeStats,
    check_pair,
    emit,
    gamma_policy,
    num_threads,
    side_threads,
)
from .draft_process import DraftProcess
from .runner import Runner, Sampling
from .speculative import draft_tokens

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


def _verify_windows(
    mode: Tensor,
    window: Tensor,
    p: Tensor | None,
    target_tokens: Tensor | None,
    q: Tensor | None,
    gamma: int,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor]:
    """Accepted counts [B] and correction tokens [B] for windows [B, γ] whose sequence b has
    n_b = 1 (pre-verify) or γ (post-verify) real tokens, scored by target rows [B, ≥n_b].
    There is no bonus token in PEARL: when all n_b are accepted the correction is unused."""
    batch = window.shape[0]
    n = torch.where(mode == POST, gamma, 1)  # [B]
    if target_tokens is not None:
        width = target_tokens.shape[1]  # γ, or 1 when every sequence is in pre-verify
        cols = torch.arange(width, device=window.device)
        match = (window[:, :width] == target_tokens) & (cols < n.unsqueeze(1))
        accepted = match.long().cumprod(1).sum(1)  # [B]
        corr = target_tokens.gather(1, accepted.clamp(max=width - 1).unsqueeze(1)).squeeze(1)
        return accepted, corr
    # Sampling: spec_verify over each mode's sequences (their windows have one length); the last
    # row duplicated gives the op its n+1 rows, and a bonus it samples is dropped.
    accepted = torch.zeros(batch, dtype=torch.long, device=window.device)
    corr = torch.zeros(batch, dtype=torch.long, device=window.device)
    for m, width in ((PRE, 1), (POST, gamma)):
        idx = (mode == m).nonzero().squeeze(1)
        if idx.numel() == 0:
            continue
        rows = p[idx, :width]  # [b, n, V]
        tokens, acc = ops.spec_verify(
            torch.cat([rows, rows[:, -1:]], 1), window[idx, :width], q[idx, :width], generator
        )
        accepted[idx] = acc.long()
        corr[idx] = tokens.gather(1, acc.long().clamp(max=width - 1).unsqueeze(1)).squeeze(1)
    return accepted, corr


def _windows(mode: Tensor, unverified: Tensor, xs: Tensor, gamma: int) -> Tensor:
    """The tokens each sequence's round verifies, [B, γ]: e_2..e_γ, f_1 (post-verify) or e_1
    (pre-verify, repeated as padding)."""
    post = (mode == POST).unsqueeze(1)
    return torch.where(post, torch.cat([unverified, xs[:, :1]], 1), xs[:, :1].expand(-1, gamma))


def _commit(
    mode: Tensor, unverified: Tensor, last: Tensor, committed: Tensor, active: Tensor,
    window: Tensor, xs: Tensor, accepted: Tensor, corr: Tensor, t0: Tensor, d_now: Tensor,
    d0: Tensor, gamma: int,
) -> tuple[Tensor, ...]:  # fmt: skip
    """A verified round's new state: mode, unverified, last, committed [B], both sides' cache
    lengths [B] int32, and the rows the host reads, [B, 3 + γ]: was-post, accepted, tokens kept,
    emitted tokens. Sequences not active keep their state."""
    post = mode == POST
    n = torch.where(post, gamma, 1)
    all_in = accepted == n
    # Commit the accepted window tokens, then the correction unless all were accepted.
    kept = torch.where(all_in, n, accepted + 1)
    cols = torch.arange(gamma, device=window.device)
    emitted = torch.where(cols < accepted.unsqueeze(1), window, corr.unsqueeze(1))
    new_last = torch.where(all_in, window.gather(1, (n - 1).unsqueeze(1)).squeeze(1), corr)
    new_committed = committed + kept
    # All accepted: the target keeps what it fed (its cache = committed[:-1]) and the draft all
    # it drafted (committed + unverified[:-1]); else both roll back to the new committed[:-1].
    t_lens = torch.where(active & all_in, t0 + n, torch.where(active, new_committed - 1, t0))
    d_lens = torch.where(active & all_in, d_now, torch.where(active, new_committed - 1, d0))
    if gamma > 1:
        unverified = torch.where((active & all_in).unsqueeze(1), xs[:, 1:], unverified)
    last = torch.where(active, new_last, last)
    committed = torch.where(active, new_committed, committed)
    mode = torch.where(active, torch.where(all_in, POST, PRE), mode)
    host = torch.cat(
        [post.long().unsqueeze(1), accepted.unsqueeze(1), kept.unsqueeze(1), emitted], 1
    )
    return mode, unverified, last, committed, t_lens.int(), d_lens.int(), host


def _greedy_round(
    mode: Tensor, unverified: Tensor, last: Tensor, committed: Tensor, active: Tensor,
    xs: Tensor, target_tokens: Tensor, t0: Tensor, d_now: Tensor, d0: Tensor, gamma: Tensor,
) -> tuple[Tensor, ...]:  # fmt: skip
    """Greedy verification and commit of a round, on buffers of a fixed width G (the policy's
    largest γ) with γ a 0-d tensor: the shapes never change within a decode, so the compile
    backend runs the round's ~60 small ops as one call that never recompiles when γ does.

    unverified [B, G] (e_2..e_γ in its first γ-1 columns), xs [B, G] (the draft's γ tokens
    first), target_tokens [B, G] (the target's argmax over the window, ≥ 1 real column); the
    rest as in ``_commit``, whose host rows this returns at width 3 + G."""
    cols = torch.arange(xs.shape[1], device=xs.device)
    post = mode == POST
    n = torch.where(post, gamma, 1)  # [B] real tokens in each window
    # e_2..e_γ, f_1 (post-verify) or e_1 (pre-verify; only its first column is read).
    window = torch.where(post.unsqueeze(1) & (cols < gamma - 1), unverified, xs[:, :1])
    match = (window == target_tokens) & (cols < n.unsqueeze(1))
    accepted = match.long().cumprod(1).sum(1)  # [B]
    corr = target_tokens.gather(1, torch.minimum(accepted, n - 1).unsqueeze(1)).squeeze(1)
    all_in = accepted == n
    kept = torch.where(all_in, n, accepted + 1)
    emitted = torch.where(cols < accepted.unsqueeze(1), window, corr.unsqueeze(1))
    new_last = torch.where(all_in, window.gather(1, (n - 1).unsqueeze(1)).squeeze(1), corr)
    new_committed = committed + kept
    stay = active & all_in
    t_lens = torch.where(stay, t0 + n, torch.where(active, new_committed - 1, t0))
    d_lens = torch.where(stay, d_now, torch.where(active, new_committed - 1, d0))
    # f_2..f_γ become the unverified tokens (shifted left; the last column is never read).
    unverified = torch.where(stay.unsqueeze(1), torch.roll(xs, -1, 1), unverified)
    last = torch.where(active, new_last, last)
    committed = torch.where(active, new_committed, committed)
    mode = torch.where(active, torch.where(all_in, POST, PRE), mode)
    host = torch.cat(
        [post.long().unsqueeze(1), accepted.unsqueeze(1), kept.unsqueeze(1), emitted], 1
    )
    return mode, unverified, last, committed, t_lens.int(), d_lens.int(), host


_rounds: dict[str, Callable] = {}


def _round_fn(device: torch.device, backend: str) -> Callable:
    """_greedy_round, compiled (one graph per batch size and G) with the CPU compile backend."""
    if backend != "compile" or device.type != "cpu":
        return _greedy_round
    if "cpu" not in _rounds:
        _rounds["cpu"] = torch.compile(
            _greedy_round, fullgraph=True, dynamic=False, options={"cpp_wrapper": True}
        )
    return _rounds["cpu"]


def _pad(t: Tensor, width: int) -> Tensor:
    """t [B, w] right-padded with zeros to [B, width]."""
    return torch.nn.functional.pad(t, (0, width - t.shape[1]))


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
) -> tuple[list[list[int]], DecodeStats]:
    """Each sequence's new tokens (up to and including its EOS) and the run's statistics.
    ``gamma=None`` picks the window from the measured cost curve and the acceptance rate seen so
    far, and re-picks it between rounds with nothing unverified (pearlmoe.decode.cost_model).
    ``draft_process``: draft in a child process (pearlmoe.decode.draft_process) instead of a
    thread; by default when both models are on the CPU with the compile backend."""
    check_pair(target, draft)
    prompts = _prompts(input_ids)
    batch, eos = len(prompts), _eos_set(eos_token_id)
    sampling = Sampling(temperature, top_k, top_p)
    policy = gamma_policy(target, draft, batch, "pearl", backend, gamma)
    gamma = policy.gamma
    greedy = sampling.greedy
    stats = DecodeStats(gamma=gamma, extra={"pre_rounds": 0, "post_rounds": 0})
    round_times = {"wall": 0.0, "draft": 0.0, "target": 0.0, "slower": 0.0, "alone": 0.0}
    capacity = max(map(len, prompts)) + max_new_tokens + 2 * policy.max_gamma + 2
    tgt = Runner(target, batch, capacity, backend, sampling)
    # On a CPU the two sides split the cores: each step's intra-op pool would otherwise take
    # them all and the sides would only take turns.
    share = side_threads()
    if draft_process is None:  # a child process where the GIL would make the sides take turns
        draft_process = target.device.type == draft.device.type == "cpu" and backend == "compile"
    pool = ThreadPoolExecutor(1, initializer=torch.set_num_threads, initargs=(share,))
    device = target.device
    width_g = policy.max_gamma  # G: the state's fixed width, so γ can change without new shapes
    bookkeep = _round_fn(device, backend)
    draft_prompts = [p[:-1] for p in prompts]
    with num_threads(share):  # compiled code is specialised to its thread count
        stats.extra["warmup_seconds"] = tgt.warmup([1, gamma])
        began = time.perf_counter()
        if greedy and bookkeep is not _greedy_round:  # compile the round's bookkeeping now
            ids = torch.zeros(batch, width_g, dtype=torch.long, device=device)
            lens = torch.zeros(batch, dtype=torch.int32, device=device)
            bookkeep(ids[:, 0], ids, ids[:, 0], ids[:, 0], ids[:, 0] == 0, ids, ids, lens, lens,
                     lens, torch.tensor(gamma, device=device))  # fmt: skip
        if draft_process:
            drf = DraftProcess.get(draft, share)
            seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))\
                if generator is not None else 0  # fmt: skip
            drf.start(batch, capacity, backend, sampling, seed, policy.max_gamma,
                      draft.config.vocab_size)  # fmt: skip
        else:
            runner = Runner(draft, batch, capacity, backend, sampling)
            runner.warmup([1])
            drf = _ThreadDraft(runner, _Side(draft, share), pool, generator)
        stats.extra["warmup_seconds"] += time.perf_counter() - began
    stats.extra["draft_process"] = bool(draft_process)
    start = time.perf_counter()
    drf.prefill(draft_prompts)  # both sides prefill at once
    with num_threads(share):
        tgt.prefill(draft_prompts)
    drf.wait()
    target_side = _Side(target, share)

    last = torch.tensor([p[-1] for p in prompts], device=device)  # [B] committed[-1]
    committed = torch.tensor([len(p) for p in prompts], device=device)  # [B] lengths
    mode = torch.full((batch,), PRE, device=device)  # [B]
    unverified = torch.zeros(batch, width_g, dtype=torch.long, device=device)  # [B, G] e_2..e_γ
    unverified_q = None  # [B, γ-1, V]: their draft distributions, when sampling
    active = torch.ones(batch, dtype=torch.bool, device=device)
    host_post = [False] * batch  # the mode on the host too: the target's width needs no sync
    outputs: list[list[int]] = [[] for _ in prompts]
    done = [max_new_tokens <= 0] * batch
    gamma_t = torch.tensor(gamma, device=device)

    def draft_first() -> Tensor:
        # The draft's cache lacks e_γ (post) or the last committed token (pre, or post at γ=1).
        post = (mode == POST) & (gamma > 1)
        return torch.where(post, unverified[:, max(gamma - 2, 0)], last)  # [B]

    def target_round(width: int) -> tuple[Tensor | None, Tensor | None]:
        # Post-verify sequences feed [last, e_2..e_γ]; pre-verify ones [last] (right-padded).
        feed = torch.cat([last.unsqueeze(1), unverified], 1)[:, :width]  # [B, width]
        return tgt(feed)

    with pool, num_threads(share):
        while not all(done):
            if policy.gamma != gamma and not any(host_post):
                # A new window only between rounds with nothing unverified.
                gamma = policy.gamma
                gamma_t = torch.tensor(gamma, device=device)
                unverified_q = None
            t0, d0 = tgt.lens.clone(), drf.lens.clone()
            width = gamma if any(host_post) else 1
            round_start = time.perf_counter()
            drf.submit(draft_first(), gamma)
            (p, target_tokens), t_target = target_side.run(lambda w=width: target_round(w))
            xs, qs, t_draft = drf.result()
            round_times["wall"] += time.perf_counter() - round_start
            round_times["draft"] += t_draft
            round_times["target"] += t_target
            round_times["slower"] += max(t_draft, t_target)
            if policy.curve is not None:  # the sides as fast as each runs alone
                curve = policy.curve
                round_times["alone"] += max(gamma * curve.draft, curve.target_time(width))
            xs = xs.to(device)  # [B, γ]
            stats.draft_calls += gamma
            stats.target_calls += 1
            d_now, d0 = drf.lens.to(device), d0.to(device)
            if greedy:
                mode, unverified, last, committed, t_lens, d_lens, host = bookkeep(
                    mode, unverified, last, committed, active, _pad(xs, width_g),
                    _pad(target_tokens, width_g), t0, d_now, d0, gamma_t,
                )  # fmt: skip
            else:
                window = _windows(mode, unverified[:, : gamma - 1], xs, gamma)
                qs = qs.to(device)
                first_q = qs[:, :1]
                pre_q = first_q.expand(-1, gamma, -1)
                post_q = pre_q if unverified_q is None else torch.cat([unverified_q, first_q], 1)
                q = torch.where((mode == POST).view(-1, 1, 1), post_q, pre_q)  # [B, γ, V]
                accepted, corr = _verify_windows(mode, window, p, None, q, gamma, generator)
                go_post = active & (accepted == torch.where(mode == POST, gamma, 1))
                if gamma > 1:
                    keep_q = unverified_q if unverified_q is not None else qs[:, 1:]
                    unverified_q = torch.where(go_post.view(-1, 1, 1), qs[:, 1:], keep_q)
                mode, kept_unverified, last, committed, t_lens, d_lens, host = _commit(
                    mode, unverified[:, : gamma - 1], last, committed, active, window, xs,
                    accepted, corr, t0, d_now, d0, gamma,
                )  # fmt: skip
                unverified = _pad(kept_unverified, width_g)
            tgt.lens.copy_(t_lens)
            drf.lens.copy_(d_lens.to(drf.device))
            host = host.tolist()  # the round's one host sync: modes, counts, emitted tokens
            step: list[list[int]] = [[] for _ in prompts]
            proposed, round_accepted = 0, 0
            for b, (was_post, a, k, *tokens) in enumerate(host):
                if done[b]:
                    continue
                proposed += gamma if was_post else 1
                round_accepted += a
                stats.extra["post_rounds" if was_post else "pre_rounds"] += 1
                done[b] = emit(tokens[:k], outputs[b], step[b], eos, max_new_tokens)
                host_post[b] = not done[b] and a == (gamma if was_post else 1)
                if done[b]:  # finished: frozen in pre-verify on what is committed
                    active[b] = False
                    mode[b] = PRE
                    tgt.lens[b] = committed[b] - 1
                    drf.lens[b] = committed[b] - 1
            stats.proposed += proposed
            stats.accepted += round_accepted
            policy.update(round_accepted, proposed)
            stats.emitted += sum(len(s) for s in step)
            if callback is not None:
                callback(step)
    stats.seconds = time.perf_counter() - start
    stats.extra["gammas"] = policy.history
    stats.extra["overlap"] = round_times["wall"] / max(round_times["slower"], 1e-12)
    if round_times["alone"]:  # against the measured cost curve: what contention costs the sides
        stats.extra["overlap_vs_alone"] = round_times["wall"] / round_times["alone"]
    stats.extra["round_seconds"] = {k: round(v, 6) for k, v in round_times.items()}
    return outputs, stats
