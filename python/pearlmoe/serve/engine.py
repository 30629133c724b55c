"""The serving engine: one thread owns the models and runs decode rounds over a fixed set of
batch slots; requests join at round boundaries and leave as soon as they finish or are cancelled
(continuous batching), in autoregressive, speculative or PEARL mode.

Slots, not pages: both models' KV caches are preallocated for ``max_batch`` sequences of
``context`` tokens (pearlmoe's static decode step, pearlmoe.decode.runner). On the models this
serves (the embedded pair, SmolLM2-135M) a slot's whole context is a few MB, so paging would add
an indirection to every attention read to save memory nobody is short of; the cost is that the
context is fixed at start. Active requests always hold slots 0..n-1 (a leaving request's slot
takes the last one's cache rows), so a round steps over the first n rows only, rounded up to a
power of two so the compiled steps (or CUDA graphs) come in a few batch sizes.

Every sequence's state lives on the host (a few ints and lists; one host sync per model call):
``committed`` tokens (prompt + output), L = len(committed). Invariants between rounds, as in the
decode loops: the target caches committed[:-1]. The speculative draft caches committed[:-2] and
re-feeds [prev, last] (committed[:-1] right after joining, fed [last] alone: a right-padded row).
PEARL's draft caches committed[:-1] in pre-verify and committed + unverified[:-1] in post-verify
(pearlmoe.decode.pearl explains the two modes).

Verification is per sequence: greedy rows compare argmaxes (so a greedy request gets exactly the
tokens ``pearlmoe generate`` gives it, whatever else is in the batch: each row of a step is
computed on its own), sampled rows go through ``ops.spec_verify`` with their own temperature,
top-p and seeded generator.

Shape letters: n active sequences, N the rows stepped (n rounded up), S tokens per row, V vocab.
"""

import contextlib
import itertools
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .. import ops
from ..decode.common import LOOKUP, emit, gamma_policy, num_threads, side_threads, token_history
from ..decode.cost_model import SpeculationGate
from ..decode.runner import Runner, Sampling
from ..decode.sampling import logits_to_probs, sample
from ..model.transformer import Transformer

MODES = ("ar", "speculative", "pearl")
PRE, POST = 0, 1
# Rounds one C++ call runs for a lone request (_fused_rounds): a request that arrives meanwhile
# waits for them (~0.3-0.6 ms a round on the embedded pair) before it is admitted.
FUSED_ROUNDS = 4


@dataclass(eq=False)
class Request:
    """One completion. ``on_tokens(tokens, finish_reason)`` is called on the engine's thread
    with each round's new tokens, and once more with the finish reason ("stop" at an EOS token,
    "length" at max_tokens, "cancelled") when the request leaves."""

    prompt: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    eos: frozenset[int] = frozenset()
    on_tokens: Callable[[list[int], str | None], None] | None = None
    id: int = field(default_factory=itertools.count().__next__)
    output: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    cancelled: bool = False
    cancel_reason: str = "cancelled"
    submitted: float = 0.0
    admitted: float = 0.0
    first_token: float = 0.0
    finished: float = 0.0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


@dataclass(eq=False)
class _Slot:
    """A running request's decode state (host ints and lists)."""

    req: Request
    committed: list[int]
    generator: torch.Generator | None
    d_len: int = 0  # tokens the draft caches
    mode: int = PRE  # PEARL
    unverified: list[int] = field(default_factory=list)  # PEARL post-verify: e_2..e_γ
    unverified_q: list[Tensor] = field(default_factory=list)  # their draft distributions

    @property
    def length(self) -> int:  # L
        return len(self.committed)


@dataclass
class Metrics:
    """Counters for /metrics (Prometheus names in the server)."""

    requests: int = 0
    finished: dict = field(default_factory=lambda: {"stop": 0, "length": 0, "cancelled": 0})
    prompt_tokens: int = 0
    generated_tokens: int = 0
    rounds: int = 0
    target_calls: int = 0
    draft_calls: int = 0
    proposed: int = 0
    accepted: int = 0
    batch_sum: int = 0  # sum over rounds of the sequences stepped
    plain_rounds: int = 0  # rounds the speculation gate ran as plain (autoregressive) steps
    queue_seconds: float = 0.0
    ttft_seconds: float = 0.0
    waiting: int = 0
    running: int = 0


class Engine:
    """Continuous batching over ``max_batch`` slots. ``submit`` queues a request (any thread);
    ``start`` runs the loop on its own thread (or call ``step`` yourself: one admission and one
    round). ``context`` bounds prompt + max_tokens per request."""

    def __init__(
        self,
        target: Transformer,
        draft: Transformer | None = None,
        mode: str = "ar",
        max_batch: int = 8,
        context: int = 1024,
        backend: str = "eager",
        gamma: int | None = None,
        max_prefill_tokens: int = 64,
        gate: bool = False,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"Engine: mode must be one of {MODES}, got {mode!r}")
        if mode != "ar" and draft is None:
            raise ValueError(f"Engine: mode {mode!r} needs a draft model")
        if max_batch < 1 or context < 2:
            raise ValueError(f"Engine: max_batch >= 1 and context >= 2, got {max_batch}, {context}")
        self.target, self.draft, self.mode = target, draft if mode != "ar" else None, mode
        self.max_batch, self.context, self.backend = max_batch, context, backend
        self.max_prefill_tokens = max_prefill_tokens
        # PEARL on a CPU: each side gets half the cores, on its own thread.
        self.share = side_threads() if mode == "pearl" and target.device.type == "cpu" else None
        with self._threads():
            self.policy = (
                gamma_policy(target, self.draft, 1, mode, backend, gamma) if self.draft else None
            )
        extra = 2 * self.policy.max_gamma + 2 if self.policy else 1
        raw = Sampling(logits=True)
        self.tgt = Runner(target, max_batch, context + extra, backend, raw)
        self.drf = None
        if self.draft is not None:
            self.drf = Runner(self.draft, max_batch, context + extra, backend, raw)
        self.gamma = self.policy.gamma if self.policy else 0
        self.slots: list[_Slot] = []
        self.queue: deque[Request] = deque()
        self.metrics = Metrics()
        self.device = target.device
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = False
        self._pool = None  # PEARL's draft side
        if mode == "pearl":
            init = (torch.set_num_threads, (self.share,)) if self.share else (None, ())
            self._pool = ThreadPoolExecutor(1, initializer=init[0], initargs=init[1])
        self.error: BaseException | None = None
        self._seen = (0, 0)  # proposed and accepted when γ was last re-picked
        # With ``gate``, a speculation gate per number of rows stepped past one (cost_model.
        # SpeculationGate): a round whose batch's windows cost more than they commit gives way
        # to a plain step, while every request is greedy. Off by default: with 4-16 clients on
        # the 2-core VM it measured no gain beyond the runs' noise (bench/NOTES.md v15).
        self.gate = gate and mode != "ar"
        self._gates: dict[int, SpeculationGate] = {}
        self.cores = torch.get_num_threads()  # plain steps take them all, as AR does
        self.lookup = LOOKUP  # the prompt lookup's n-gram length in _fused_rounds

    # ---- requests (any thread) ---------------------------------------------------------------

    def check(self, req: Request) -> None:
        """ValueError for a request this engine cannot run."""
        vocab = self.target.config.vocab_size
        if not req.prompt:
            raise ValueError("the prompt has no tokens")
        if any(not 0 <= t < vocab for t in req.prompt):
            raise ValueError(f"prompt token ids must lie in [0, {vocab})")
        if req.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {req.max_tokens}")
        if len(req.prompt) + req.max_tokens > self.context:
            raise ValueError(
                f"the prompt ({len(req.prompt)} tokens) plus max_tokens ({req.max_tokens}) is "
                f"longer than the context of {self.context} tokens"
            )

    def submit(self, req: Request) -> None:
        self.check(req)
        if self.error is not None:
            raise RuntimeError(f"the engine stopped: {self.error}")
        req.submitted = time.perf_counter()
        with self._cv:
            self.queue.append(req)
            self.metrics.requests += 1
            self.metrics.waiting = len(self.queue)
            self._cv.notify()

    def cancel(self, req: Request, reason: str = "cancelled") -> None:
        """The request leaves at the next round boundary (its slot and cache rows freed), with
        this finish reason (the server says "stop" when a stop string ended it)."""
        req.cancel_reason = reason
        req.cancelled = True
        with self._cv:
            self._cv.notify()

    # ---- the loop ----------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="pearlmoe-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join()
        if self._pool is not None:
            self._pool.shutdown()

    def _loop(self) -> None:
        try:
            with self._threads():
                while True:
                    with self._cv:
                        while not self._stop and not self.queue and not self.slots:
                            self._cv.wait()
                        if self._stop:
                            return
                    self.step()
        except BaseException as err:  # the server reports it; requests in flight end
            self.error = err
            with self._cv:
                waiting, self.queue = list(self.queue), deque()
            for req in [slot.req for slot in self.slots] + waiting:
                self._finish(req, "cancelled")
            self.slots.clear()
            print("pearlmoe: the serving engine stopped:", file=sys.stderr)
            traceback.print_exc()

    @torch.inference_mode()
    def step(self) -> None:
        """Admit queued requests into free slots, drop cancelled ones, run one round."""
        self._admit()
        for i in reversed(range(len(self.slots))):
            if self.slots[i].req.cancelled:
                self._release(i, self.slots[i].req.cancel_reason)
        if not self.slots:
            return
        n = len(self.slots)
        self.metrics.rounds += 1
        self.metrics.batch_sum += n
        self.metrics.running = n
        if self.mode == "ar":
            self._ar_round()
            return
        rows = self._rows(n)
        gate = self._gates.get(rows)
        if gate is None:
            gate = self._gates[rows] = SpeculationGate(self.gate and rows > 1)
        # Only while every request is greedy: a sampled one draws its tokens otherwise in a
        # plain step than in a round, and its seed gives the same text in any batch.
        gated = all(s.req.greedy for s in self.slots)
        start, before = time.perf_counter(), self.metrics.generated_tokens
        if gate.plain and gated:
            self.metrics.plain_rounds += 1
            with num_threads(self.cores):
                self._plain_round()
        elif self.mode == "speculative":
            if not self._fused_rounds():
                self._speculative_round()
        else:
            self._pearl_round()
        if gated:
            gate.record(self.metrics.generated_tokens - before, time.perf_counter() - start)

    def warmup(self) -> float:
        """Compile or capture the steps the rounds use at every batch size they step over
        (1, 2, 4, ... max_batch); returns the seconds it took."""
        start = time.perf_counter()
        sizes = sorted({self._rows(n) for n in range(1, self.max_batch + 1)})
        # Width 2 at least: the graph for every window wider than 1 is built once, so a γ the
        # policy picks later never compiles on the engine's thread while the draft's runs.
        wide = max(2, self.gamma)
        target_widths = {"ar": [1], "speculative": [wide + 1], "pearl": [1, wide]}
        with self._threads(), torch.inference_mode():
            for rows in sizes:
                for width in target_widths[self.mode]:
                    self._call(self.tgt, [[0] * width] * rows, [0] * rows)
                if self.drf is not None:
                    for width in (1, 2):
                        self._call(self.drf, [[0] * width] * rows, [0] * rows)
        return time.perf_counter() - start

    # ---- admission and release ---------------------------------------------------------------

    def _admit(self) -> None:
        budget = self.max_prefill_tokens
        while len(self.slots) < self.max_batch:
            with self._cv:
                if not self.queue:
                    break
                req = self.queue[0]
                if not req.cancelled and budget <= 0:
                    break  # this round's prefill budget is spent: running sequences go on
                self.queue.popleft()
                self.metrics.waiting = len(self.queue)
            if req.cancelled:
                self._finish(req, req.cancel_reason)
                continue
            budget -= len(req.prompt)
            self._join(req)

    def _join(self, req: Request) -> None:
        """Prefill a new request into the next free slot: the target caches prompt[:-1]; so does
        the draft (fed [last] alone on its first round)."""
        b = len(self.slots)
        generator = None
        if not req.greedy:
            generator = torch.Generator(device=self.device)
            if req.seed is not None:
                generator.manual_seed(req.seed)
            else:
                generator.seed()
        slot = _Slot(req, list(req.prompt), generator)
        prefix = req.prompt[:-1]
        for runner in (self.tgt, self.drf):
            if runner is None:
                continue
            row = runner.cache.sequence(b)
            row.set_lens(torch.zeros(1, dtype=torch.int32, device=runner.device))
            if prefix:
                runner.model(torch.tensor([prefix], device=runner.device), row)
        slot.d_len = len(prefix)
        self.slots.append(slot)
        req.admitted = time.perf_counter()
        self.metrics.queue_seconds += req.admitted - req.submitted
        self.metrics.prompt_tokens += len(req.prompt)

    def _release(self, i: int, reason: str) -> None:
        """Free slot i: the last slot's request moves into it (cache rows copied)."""
        req, last = self.slots[i].req, len(self.slots) - 1
        if i != last:
            moved = self.slots[last]
            for runner, used in ((self.tgt, moved.length - 1), (self.drf, moved.d_len)):
                if runner is None or used <= 0:
                    continue
                cache = runner.cache
                cache.k[:, i, :used] = cache.k[:, last, :used]
                cache.v[:, i, :used] = cache.v[:, last, :used]
            self.slots[i] = moved
        self.slots.pop()
        self.metrics.running = len(self.slots)
        self._finish(req, reason)

    def _finish(self, req: Request, reason: str) -> None:
        req.finish_reason = reason
        req.finished = time.perf_counter()
        self.metrics.finished[reason] = self.metrics.finished.get(reason, 0) + 1
        if req.on_tokens is not None:
            req.on_tokens([], reason)

    def _emit(self, slot: _Slot, tokens: list[int]) -> bool:
        """Commit verified tokens to a sequence and stream them; True once it is finished (at
        an EOS token or max_tokens: the tokens after it are dropped)."""
        req = slot.req
        new: list[int] = []
        reason = None
        if emit(tokens, req.output, new, req.eos, req.max_tokens):
            reason = "stop" if req.output[-1] in req.eos else "length"
        slot.committed.extend(new)
        if new and not req.first_token:
            req.first_token = time.perf_counter()
            self.metrics.ttft_seconds += req.first_token - req.submitted
        self.metrics.generated_tokens += len(new)
        if req.on_tokens is not None and new:
            req.on_tokens(new, None)
        req.finish_reason = reason
        return reason is not None

    def _end_round(self, finished: list[bool]) -> None:
        for i in reversed(range(len(self.slots))):
            if finished[i]:  # from the end: the slot moved into i has been seen
                self._release(i, self.slots[i].req.finish_reason)

    # ---- model calls -------------------------------------------------------------------------

    def _rows(self, n: int) -> int:
        """Rows stepped for n sequences: the next power of two, at most max_batch."""
        return min(self.max_batch, 1 << (n - 1).bit_length())

    def _call(self, runner: Runner, rows: list[list[int]], lens: list[int]) -> Tensor:
        """Logits [N, S, V] (fp32) for rows of token ids written at lens: the n real rows, then
        idle rows up to N (token 0 at length 0: written and ignored)."""
        n, width = len(rows), len(rows[0])
        stepped = self._rows(n)
        ids = rows + [[0] * width] * (stepped - n)
        view = runner.rows(stepped)
        view.cache.set_lens(torch.tensor(lens + [0] * (stepped - n), dtype=torch.int32))
        logits, _ = view(torch.tensor(ids, device=runner.device))
        return logits.clone() if runner.backend == "cudagraph" else logits

    def _pick(self, logits: Tensor, slots: list[_Slot]) -> tuple[list[int], list[Tensor | None]]:
        """One token per sequence from its row of logits [n, V]: the argmax for greedy
        requests, else a draw from its distribution (returned too, for verification)."""
        greedy = logits.argmax(-1).tolist()
        tokens, dists = [], []
        # On the calling thread alone: a row's softmax in ATen's OpenMP team left a team thread
        # spinning on the core the next fused step's pool wanted (bench/NOTES.md v19, v20).
        with num_threads(1):
            for i, slot in enumerate(slots):
                req = slot.req
                if req.greedy:
                    tokens.append(greedy[i])
                    dists.append(None)
                    continue
                q = logits_to_probs(logits[i], req.temperature, req.top_k, req.top_p)  # [V]
                tokens.append(int(sample(q[None], slot.generator)))
                dists.append(q)
        return tokens, dists

    def _verify(
        self, slot: _Slot, logits: Tensor, drafts: list[int], qs: list[Tensor | None]
    ) -> tuple[int, int | None]:
        """(accepted count a, the token after them: the correction, or the bonus when every
        draft is accepted and logits has a row for it, else None) for drafts scored by the
        target's rows logits [m, V] (m = len(drafts) or len(drafts) + 1)."""
        req = slot.req
        if req.greedy:
            scored = logits.argmax(-1).tolist()
            a = 0
            while a < len(drafts) and drafts[a] == scored[a]:
                a += 1
            return a, scored[a] if a < len(scored) else None
        with num_threads(1):  # as in _pick
            p = logits_to_probs(logits, req.temperature, req.top_k, req.top_p)  # [m, V]
            bonus = p.shape[0] > len(drafts)
            if not bonus:  # spec_verify wants a bonus row: a copy, whose token is dropped
                p = torch.cat([p, p[-1:]], 0)
            ids = torch.tensor([drafts], device=p.device)
            q = torch.stack(qs)[None]
            tokens, accepted = ops.spec_verify(p[None], ids, q, slot.generator)
        a = int(accepted[0])
        if a == len(drafts) and not bonus:
            return a, None
        return a, int(tokens[0, a])

    # ---- rounds ------------------------------------------------------------------------------

    def _ar_round(self) -> None:
        slots = self.slots
        logits = self._call(self.tgt, [[s.committed[-1]] for s in slots],
                            [s.length - 1 for s in slots])  # fmt: skip
        tokens, _ = self._pick(logits[: len(slots), 0], slots)
        self.metrics.target_calls += 1
        self._end_round([self._emit(s, [t]) for s, t in zip(slots, tokens, strict=True)])

    def _plain_round(self) -> None:
        """A step of the target alone (the gate's plain arm): PEARL's unverified drafts are
        dropped; the draft caches fall behind and catch up at the next round (its feed is every
        committed token it does not cache: ``_feed``)."""
        for s in self.slots:
            if s.mode == POST:
                s.mode, s.unverified, s.unverified_q = PRE, [], []
                s.d_len = min(s.d_len, s.length - 1)
        self._ar_round()

    @staticmethod
    def _feed(slot: _Slot) -> list[int]:
        """The committed tokens the draft does not cache, its newest last: [prev, last] in a
        steady speculative round, [last] in pre-verify or just after joining, more after plain
        steps."""
        return slot.committed[slot.d_len :]

    @staticmethod
    def _padded(feeds: list[list[int]], least: int = 1) -> tuple[list[list[int]], list[int]]:
        """Feeds right-padded with token 0 to one width (at least ``least``), and how many of
        each row's tokens are real (``_draft``'s ``real``)."""
        width = max(least, *map(len, feeds))
        return [f + [0] * (width - len(f)) for f in feeds], [len(f) for f in feeds]

    def _draft(
        self, slots: list[_Slot], feeds: list[list[int]], real: list[int], gamma: int
    ) -> tuple[list[list[int]], list[list[Tensor | None]]]:
        """γ draft tokens per sequence after its feed (right-padded to one width; real[i] of
        its tokens are real): tokens [n][γ] and their distributions. Moves each slot's d_len
        by real + γ - 1 (the fed tokens: all but the last drafted one)."""
        xs: list[list[int]] = [[] for _ in slots]
        qs: list[list[Tensor | None]] = [[] for _ in slots]
        rows, lens = feeds, [s.d_len for s in slots]
        for i in range(gamma):
            logits = self._call(self.drf, rows, lens)  # [N, S, V]
            if i == 0:  # each row's last real token
                at = torch.tensor(real, device=logits.device) - 1
                picked = logits[torch.arange(len(slots), device=logits.device), at]
            else:
                picked = logits[: len(slots), -1]
            tokens, dists = self._pick(picked, slots)
            for j, (t, q) in enumerate(zip(tokens, dists, strict=True)):
                xs[j].append(t)
                qs[j].append(q)
            lens = [n + (r if i == 0 else 1) for n, r in zip(lens, real, strict=True)]
            rows = [[t] for t in tokens]
            self.metrics.draft_calls += 1
        for slot, n in zip(slots, lens, strict=True):
            slot.d_len = n
        return xs, qs

    def _speculative_round(self) -> None:
        slots, gamma = self.slots, self.gamma
        # Right-padded to one width, 2 at least: the warmed-up graph.
        feeds, real = self._padded([self._feed(s) for s in slots], 2)
        xs, qs = self._draft(slots, feeds, real, gamma)
        windows = [[s.committed[-1], *x] for s, x in zip(slots, xs, strict=True)]
        logits = self._call(self.tgt, windows, [s.length - 1 for s in slots])  # [N, γ+1, V]
        self.metrics.target_calls += 1
        finished = []
        for i, s in enumerate(slots):
            a, after = self._verify(s, logits[i], xs[i], qs[i])
            self.metrics.proposed += gamma
            self.metrics.accepted += a
            finished.append(self._emit(s, [*xs[i][:a], after]))
            s.d_len = s.length - 2  # steady: prev and last are re-fed next round
        self._end_round(finished)
        self._adapt()

    def _fused_rounds(self) -> bool:
        """Up to FUSED_ROUNDS speculative rounds of a lone greedy request in one C++ call, as
        `pearlmoe generate` runs them on fused CPU steps (the draft with the prompt lookup, the
        target's window, verification and commit; bench/NOTES.md v21: one client's speculative
        decoding served at 0.78-0.81x AR by the Python rounds). False (nothing done) where they
        do not apply: another request running, or one waiting for a free slot (their rounds go
        on batched), a sampled request, steps that are not fused, a draft behind by more than a
        round's feed."""
        if len(self.slots) != 1 or (self.queue and self.max_batch > 1):
            return False
        s = self.slots[0]
        tgt, drf = self.tgt, self.drf
        if not s.req.greedy or tgt.fused_step is None or drf.fused_step is None:
            return False
        length = s.length
        if s.d_len not in (length - 1, length - 2):
            return False
        c = s.committed
        feed = torch.tensor([c[s.d_len :]])  # [1, w]: [last], or [prev, last] in steady rounds
        prev, last = torch.tensor([c[-2] if length > 1 else c[-1]]), torch.tensor([c[-1]])
        t_lens = torch.tensor([length - 1], dtype=torch.int32)  # moved in place by the call
        d_lens = torch.tensor([s.d_len], dtype=torch.int32)
        left = s.req.max_tokens - len(s.req.output)
        room = length + left + 2 * self.policy.max_gamma + 2
        history, history_lens = token_history([c], room, self.lookup)
        gamma = self.gamma
        extend = self.policy.max_gamma - gamma
        stops = torch.tensor(sorted(s.req.eos), dtype=torch.long)
        # A request's first round alone in its call: its first tokens stream without waiting
        # for three more rounds.
        k = 1 if s.d_len == length - 1 else FUSED_ROUNDS
        rows, info, drafted = tgt.fused_step.speculative_rounds(
            drf.fused_step, feed, prev, last, gamma, tgt.cache.k[:, :1], tgt.cache.v[:, :1],
            t_lens, drf.cache.k[:, :1], drf.cache.v[:, :1], d_lens,
            torch.ones(1, dtype=torch.bool), history, history_lens, self.lookup, extend,
            k, stops, torch.tensor([left]),
        )  # fmt: skip
        finished = False
        self.metrics.rounds += len(drafted) - 1  # step() counted one
        self.metrics.batch_sum += len(drafted) - 1
        for (a, *tokens), (_, _, steps, tested, accepted) in zip(
            (r[0] for r in rows.tolist()), info.tolist(), strict=True
        ):
            self.metrics.target_calls += 1
            self.metrics.draft_calls += int(steps)
            # The γ policy prices the draft model's own drafts, not the lookup's (nearly free and
            # nearly always right), as the decode loops' policy does: proposed and accepted
            # count the model's drafts up to the window's first rejection here.
            self.metrics.proposed += int(tested)
            self.metrics.accepted += int(accepted)
            self._adapt()
            finished = self._emit(s, tokens[: a + 1])
            if finished:
                break
        s.d_len = int(d_lens[0])  # length - 2: the next round feeds [prev, last]
        self._end_round([finished])
        return True

    def _pearl_round(self) -> None:
        slots, gamma = self.slots, self.gamma
        post = any(s.mode == POST for s in slots)
        # Draft side (worker thread): γ tokens after each sequence's newest token.
        # (In pre-verify after plain steps: every committed token the draft does not cache.)
        firsts, real = self._padded(
            [[s.unverified[-1]] if s.mode == POST else self._feed(s) for s in slots]
        )
        future = self._pool.submit(self._side, self._draft, slots, firsts, real, gamma)
        # Target side (this thread): [last] in pre-verify, [last, e_2..e_γ] in post-verify.
        width = gamma if post else 1
        rows = [[s.committed[-1], *s.unverified] if s.mode == POST
                else [s.committed[-1]] + [0] * (width - 1) for s in slots]  # fmt: skip
        logits = self._call(self.tgt, rows, [s.length - 1 for s in slots])
        xs, qs = future.result()
        self.metrics.target_calls += 1
        finished = []
        for i, s in enumerate(slots):
            if s.mode == PRE:
                a, after = self._verify(s, logits[i, :1], xs[i][:1], qs[i][:1])
                self.metrics.proposed += 1
                if a == 1:  # e_1 is committed; e_2..e_γ wait for the next round
                    finished.append(self._emit(s, [xs[i][0]]))
                    if gamma > 1:
                        s.mode, s.unverified, s.unverified_q = POST, xs[i][1:], qs[i][1:]
                        s.d_len = s.length + len(s.unverified) - 1
                    else:
                        s.d_len = s.length - 1
                else:
                    finished.append(self._emit(s, [after]))
                    s.d_len = s.length - 1
            else:
                cands, cand_q = [*s.unverified, xs[i][0]], [*s.unverified_q, qs[i][0]]
                a, after = self._verify(s, logits[i, :gamma], cands, cand_q)
                self.metrics.proposed += gamma
                if a == gamma:  # the window and f_1 hold: f_2..f_γ wait
                    finished.append(self._emit(s, cands))
                    s.unverified, s.unverified_q = xs[i][1:], qs[i][1:]
                    s.d_len = s.length + len(s.unverified) - 1
                else:
                    finished.append(self._emit(s, [*cands[:a], after]))
                    s.mode, s.unverified, s.unverified_q = PRE, [], []
                    s.d_len = s.length - 1
            self.metrics.accepted += a
        self._end_round(finished)
        if not any(s.mode == POST for s in self.slots):
            self._adapt()

    def _adapt(self) -> None:
        if self.policy is None:
            return
        proposed, accepted = self.metrics.proposed, self.metrics.accepted
        self.policy.update(accepted - self._seen[1], proposed - self._seen[0])
        self._seen = (proposed, accepted)
        self.gamma = self.policy.gamma

    @staticmethod
    def _side(fn: Callable, *args):
        """fn(*args) on the draft's thread (inference mode is per thread)."""
        with torch.inference_mode():
            return fn(*args)

    @contextlib.contextmanager
    def _threads(self):
        if self.share is None:
            yield
        else:
            with num_threads(self.share):
                yield
