"""PEARL's draft side in a process of its own, for CPUs.

In one process the draft's and the target's Python take turns on the GIL: measured on the
embedded pair (2-core x86, compiled bf16 steps), the target's step went from 0.63 to 1.21 ms
while a thread drafted beside it, and to 0.61 ms (no change) with the draft in another process.
So on a CPU PEARL drafts in a child process:

- the draft's weights are shared with the child (torch's shared memory: no copy);
- its KV-cache lengths live in shared memory: the child moves them while drafting, the parent's
  bookkeeping between rounds, never both at once;
- a round's handoff is a counter in shared memory that the waiting side polls (spinning briefly,
  then sleeping in short steps): tens of microseconds, against about a millisecond for a
  torch.distributed message on loopback.

    worker = DraftProcess.get(draft, threads)
    worker.start(batch, capacity, backend, sampling, seed, ...)  # build (compile) the runner
    worker.prefill(prompts); ...; worker.wait()  # cache the prompts while the parent works
    worker.submit(first)         # [B] tokens, returns at once; the child drafts γ after them
    ...                          # the target's step, meanwhile
    xs, qs = worker.result()     # [B, γ] tokens, [B, γ, V] distributions or None
    worker.lens                  # [B] int32, shared: set it only between result() and submit()

The child lives as long as the draft model (or the process) and serves one decode at a time.

Shape letters: B sequences, γ window, V vocabulary.
"""

from __future__ import annotations

import atexit
import gc
import time
import traceback
import weakref
from typing import ClassVar

import numpy as np
import torch
import torch.multiprocessing as mp
from torch import Tensor

from ..model.transformer import Transformer
from .runner import Runner, Sampling

# ctl slots (int64, shared): the parent bumps ISSUED to give a command; the child sets DONE to it
# (and NANOS to the nanoseconds the command took).
ISSUED, DONE, COMMAND, GAMMA, FAILED, NANOS = range(6)
DRAFT, START, STOP, PREFILL = 1, 2, 3, 4


def _wait(ctl: np.ndarray, slot: int, value: int, alive, deadline: float) -> None:
    """Until ctl[slot] == value: spin ~1 ms (a round's handoff), then sleep in 50 us steps (so an
    idle side leaves its core to the other), checking now and then that the child lives."""
    spins = 0
    while int(ctl[slot]) != value:
        spins += 1
        if spins > 2000:
            time.sleep(5e-5)
            if spins % 1000 == 0 and (not alive() or time.monotonic() > deadline):
                if not alive():
                    raise RuntimeError(
                        "PEARL draft process died (a script that starts it must guard its "
                        "entry point with `if __name__ == '__main__':`, as multiprocessing's "
                        "spawn requires)"
                    )
                raise TimeoutError("PEARL draft process: no answer")


def _serve(draft: Transformer, ctl: Tensor, conn, threads: int) -> None:
    """The child: waits for commands in ctl, drafts with its own Runner."""
    from .speculative import draft_tokens  # the same drafting code as in one process

    torch.set_num_threads(threads)
    ctl = ctl.numpy()  # plain loads and stores: indexing the tensor allocates one per spin
    runner = buffers = generator = None
    seen = 0
    with torch.inference_mode():
        while True:
            _wait_for_change(ctl, seen)
            seen = int(ctl[ISSUED])
            command = int(ctl[COMMAND])
            began = time.perf_counter_ns()
            try:
                if command == STOP:
                    ctl[DONE] = seen
                    return
                if command == START:
                    batch, capacity, backend, sampling, seed, buffers = conn.recv()
                    runner = Runner(draft, batch, capacity, backend, sampling)
                    runner.cache.lens = buffers["lens"]  # shared with the parent
                    runner.cache.lens.zero_()
                    runner.cache._lens = [0] * batch
                    runner.warmup([1])
                    generator = torch.Generator().manual_seed(seed)
                    # What exists now lives as long as the child: out of the collector's sight,
                    # whose full passes over torch's objects took ~8% of the child's time.
                    gc.collect()
                    gc.freeze()
                elif command == PREFILL:
                    runner.prefill(conn.recv())
                elif command == DRAFT:
                    gamma = int(ctl[GAMMA])
                    first = buffers["first"].unsqueeze(1)  # [B, 1]
                    xs, qs = draft_tokens(runner, first, gamma, generator)
                    buffers["xs"][:, :gamma] = xs
                    if qs is not None:
                        buffers["qs"][:, :gamma] = qs
            except Exception:  # reported to the parent, which raises it
                conn.send(traceback.format_exc())
                ctl[FAILED] = 1
            ctl[NANOS] = time.perf_counter_ns() - began
            ctl[DONE] = seen


def _wait_for_change(ctl: np.ndarray, seen: int) -> None:
    """The child between commands: a short spin, then 50 us sleeps (it drafts faster than the
    target verifies, so spinning would only take CPU time from the target's process), and once
    idle for a while (between decodes) longer sleeps, so that waking up does not disturb what
    the parent runs meanwhile."""
    spins, idle_since = 0, None
    while int(ctl[ISSUED]) == seen:
        spins += 1
        if spins <= 2000:
            continue
        now = time.monotonic()
        idle_since = idle_since or now
        idle = now - idle_since
        time.sleep(5e-5 if idle < 0.02 else 1e-3 if idle < 1.0 else 1e-2)


class DraftProcess:
    """The parent's handle on a draft model's child process."""

    _workers: ClassVar[weakref.WeakKeyDictionary] = weakref.WeakKeyDictionary()  # model -> child

    @classmethod
    def get(cls, draft: Transformer, threads: int) -> DraftProcess:
        """The child for this draft model and thread count, started on first use."""
        worker = cls._workers.get(draft)
        if worker is None or worker.threads != threads or not worker.proc.is_alive():
            if worker is not None:
                worker.close()
            worker = cls._workers[draft] = cls(draft, threads)
        return worker

    def __init__(self, draft: Transformer, threads: int) -> None:
        if draft.device.type != "cpu":
            raise ValueError("DraftProcess serves a draft on the CPU")
        ctx = mp.get_context("spawn")
        self.threads, self.device = threads, torch.device("cpu")
        with torch.inference_mode(False):  # updated in and out of inference mode
            self.ctl = torch.zeros(8, dtype=torch.int64).share_memory_()
        self._ctl = self.ctl.numpy()  # the parent's view: plain loads and stores
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(draft, self.ctl, child, threads), daemon=True)
        self.proc.start()
        self._issued = 0
        self.buffers: dict[str, Tensor] = {}
        self.lens = torch.zeros(0, dtype=torch.int32)
        self._gamma = 0
        self._closer = weakref.finalize(self, DraftProcess._shutdown, self.ctl, self.proc)
        atexit.register(self._closer)

    def _command(self, command: int, gamma: int = 0) -> None:
        self._ctl[COMMAND] = command
        self._ctl[GAMMA] = gamma
        self._issued += 1
        self._ctl[ISSUED] = self._issued

    def _finish(self, timeout: float) -> None:
        _wait(self._ctl, DONE, self._issued, self.proc.is_alive, time.monotonic() + timeout)
        if int(self._ctl[FAILED]):
            self._ctl[FAILED] = 0
            raise RuntimeError("PEARL draft process failed:\n" + self.conn.recv())

    def start(
        self, batch: int, capacity: int, backend: str, sampling: Sampling, seed: int,
        max_gamma: int, vocab: int,
    ) -> None:  # fmt: skip
        """A new decode: the child builds its runner (compiling on first use); draft
        distributions are kept when sampling."""
        self.buffers = {
            "first": torch.zeros(batch, dtype=torch.int64).share_memory_(),
            "lens": torch.zeros(batch, dtype=torch.int32).share_memory_(),
            "xs": torch.zeros(batch, max_gamma, dtype=torch.int64).share_memory_(),
        }
        if not sampling.greedy:
            self.buffers["qs"] = torch.zeros(batch, max_gamma, vocab).share_memory_()
        self._command(START)
        self.conn.send((batch, capacity, backend, sampling, seed, self.buffers))
        self._finish(timeout=600)  # the first compile of the draft's step takes a while
        self.lens = self.buffers["lens"]

    def prefill(self, prompts: list[list[int]]) -> None:
        """Start caching the prompts in the child (it runs while the parent works: ``wait``)."""
        self._command(PREFILL)
        self.conn.send(prompts)

    def wait(self) -> None:
        self._finish(timeout=600)

    def submit(self, first: Tensor, gamma: int) -> None:
        """Draft γ tokens after first [B] (the draft caches first, then γ - 1 of its tokens)."""
        self.buffers["first"].copy_(first)
        self._gamma = gamma
        self._command(DRAFT, gamma)

    def result(self) -> tuple[Tensor, Tensor | None, float]:
        """The submitted round's tokens [B, γ], distributions [B, γ, V] (None when greedy) and
        the seconds the child spent drafting them."""
        self._finish(timeout=600)
        xs = self.buffers["xs"][:, : self._gamma].clone()
        qs = self.buffers.get("qs")
        qs = None if qs is None else qs[:, : self._gamma].clone()
        return xs, qs, int(self._ctl[NANOS]) * 1e-9

    def close(self) -> None:
        self._closer()

    @staticmethod
    def _shutdown(ctl: Tensor, proc) -> None:
        if proc.is_alive():
            ctl[COMMAND] = STOP
            ctl[ISSUED] = int(ctl[ISSUED]) + 1
            proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()
