"""Pieces shared by the speculative decoding loops: ragged feeding of a batch, the statistics,
and the choice of the draft length from measured step times.

Invariant the loops keep for every sequence: the model caches hold everything committed except
the last committed token, which is fed at the start of the next step.
"""

import contextlib
import dataclasses
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..model.transformer import Transformer


@dataclass
class DecodeStats:
    """target_calls: target forwards (verification rounds); draft_calls: draft forwards;
    proposed / accepted: draft tokens offered to and accepted by verification; emitted: tokens
    produced. mean_accepted_tokens = emitted / target_calls (tokens per target forward)."""

    target_calls: int = 0
    draft_calls: int = 0
    proposed: int = 0
    accepted: int = 0
    emitted: int = 0
    seconds: float = 0.0
    gamma: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def mean_accepted_tokens(self) -> float:
        return self.emitted / self.target_calls if self.target_calls else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.emitted / self.seconds if self.seconds else 0.0


class CachedModel:
    """A model, its KV cache, and the token ids that cache holds (per sequence, in order), so a
    ragged batch can still run as one forward: a sequence bringing fewer new tokens is
    left-extended with its own newest cached tokens, which are dropped from the cache and
    recomputed in place (same positions, same keys and values)."""

    def __init__(self, model: Transformer, prompts: list[list[int]], capacity: int) -> None:
        self.model = model
        self.cache = model.new_cache(len(prompts), capacity)
        self.tokens = [list(p[:-1]) for p in prompts]  # cached: every prompt token but the last
        for b, prompt in enumerate(prompts):
            if len(prompt) > 1:
                model(torch.tensor([prompt[:-1]], device=model.device), self.cache.sequence(b))

    def feed(self, new: list[list[int]]) -> list[Tensor]:
        """Append each sequence's new tokens; returns its logits [n_b, V] (fp32)."""
        model, device = self.model, self.model.device
        width = max(len(t) for t in new)
        if width == 0:
            return [torch.empty(0, model.config.vocab_size, device=device) for _ in new]
        pad = [width - len(t) for t in new]
        if all(p <= len(cached) for p, cached in zip(pad, self.tokens, strict=True)):
            rows = [
                cached[len(cached) - p :] + t
                for p, cached, t in zip(pad, self.tokens, new, strict=True)
            ]
            self.truncate([len(cached) - p for p, cached in zip(pad, self.tokens, strict=True)])
            logits = model(torch.tensor(rows, device=device), self.cache)  # [B, width, V]
            for cached, row in zip(self.tokens, rows, strict=True):
                cached.extend(row)
            return [logits[b, p:] for b, p in enumerate(pad)]
        out = []  # too little history to pad with: one sequence at a time
        for b, t in enumerate(new):
            logits = model(torch.tensor([t], device=device), self.cache.sequence(b)) if t else None
            self.tokens[b].extend(t)
            out.append(logits[0] if t else torch.empty(0, model.config.vocab_size, device=device))
        return out

    def truncate(self, lens: list[int]) -> None:
        self.cache.truncate(lens)
        for cached, n in zip(self.tokens, lens, strict=True):
            del cached[n:]


@contextlib.contextmanager
def num_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count for this thread, for the duration of the block."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def side_threads() -> int:
    """Threads each side of PEARL gets on a CPU: half the cores, so the sides run at once
    instead of taking turns."""
    return max(1, torch.get_num_threads() // 2)


def measured_curve(
    target: Transformer, draft: Transformer, batch: int, mode: str, backend: str = "eager",
    helped: bool = False,
):  # fmt: skip
    """The cost curve (pearlmoe.decode.cost_model) as this mode runs: PEARL's sides with half
    the CPU threads each; ``helped``: with the target's steps also on one more thread (the
    draft's, lent to the target once it has drafted: the fused CPU rounds)."""
    from .cost_model import measure

    if mode != "pearl" or target.device.type != "cpu":
        return measure(target, draft, batch, backend)
    with num_threads(side_threads()):
        curve = measure(target, draft, batch, backend)
    if not helped:
        return curve
    with num_threads(side_threads() + 1):
        plus = measure(target, draft, batch, backend)
    return dataclasses.replace(curve, helped=list(plus.target))


# The longest draft: a window of up to 16 tokens is computed row by row as a decode step is (the
# CPU attention's exact per-row path; csrc/cpu/attention.cpp), so greedy speculative and PEARL
# decoding stay equal to autoregressive decoding bit for bit at any context length.
MAX_GAMMA = 15


def check_gamma(gamma: int) -> None:
    """A draft length every loop accepts: 1..MAX_GAMMA."""
    if not 1 <= gamma <= MAX_GAMMA:
        raise ValueError(f"gamma must be in [1, {MAX_GAMMA}], got {gamma}")


def gamma_policy(
    target: Transformer, draft: Transformer, batch: int, mode: str, backend: str,
    gamma: int | None, max_gamma: int = 8, helped: bool = False,
):  # fmt: skip
    """A fixed γ when given, else one chosen (and re-chosen as acceptance is measured) from the
    measured cost curve (``helped``: see measured_curve)."""
    from .cost_model import GammaPolicy

    if gamma is not None:
        check_gamma(gamma)
    curve = None if gamma else measured_curve(target, draft, batch, mode, backend, helped)
    # Start from what the last decode of this pair in this mode learned (α, the sides' costs in
    # the loop), and leave what this one learns for the next (``GammaPolicy.remember``).
    memory = _learned.setdefault(target, {})
    key = (id(draft), batch, mode, backend, torch.get_num_threads(), helped)
    return GammaPolicy(curve, mode, gamma, max(max_gamma, gamma or 0), memory=(memory, key))


_learned: "weakref.WeakKeyDictionary[Transformer, dict]" = weakref.WeakKeyDictionary()


# The CLI's --gate: the loops' ``gate`` argument.
GATES = {"auto": None, "on": True, "off": False}


def speculation_gate(
    target: Transformer, draft: Transformer, batch: int, mode: str, backend: str, enabled
):  # fmt: skip
    """The loop's SpeculationGate (pearlmoe.decode.cost_model), starting from what the last
    decode of this pair, batch and mode measured; ``enabled``: a bool, None for PEARL at batches
    of more than one sequence only, or a gate to use as it is (the caller's own schedule).

    Measured on the embedded pair (2-core VM, paired runs, bench/NOTES.md v15): at batch 4 and
    8 PEARL's rounds ran at 0.66-0.75x AR and gated at 0.76-1.02x (+6% to +39%); speculative
    decoding's rounds there ran at 0.95-1.24x AR, which plain steps cannot beat, and the gate's
    probes and misjudgements cost it 1-5%. At batch 1 a window costs little more than a step,
    while a round's yield swings with the text (the lookup's runs) and the VM's noise: gated,
    plain steps took 65-84% of some decodes' tokens at about 0.9x speculating throughout."""
    from .cost_model import SpeculationGate

    if isinstance(enabled, SpeculationGate):
        return enabled
    if enabled is None:
        enabled = batch > 1 and mode == "pearl"
    memory = _learned.setdefault(target, {})
    key = ("gate", id(draft), batch, mode, backend, torch.get_num_threads())
    return SpeculationGate(enabled, memory=(memory, key))


def pick_gamma(
    target: Transformer, draft: Transformer, batch: int, mode: str, backend: str = "eager",
    alpha: float = 0.6,
) -> int:  # fmt: skip
    """The draft length with the highest expected rate for this mode on the measured cost curve,
    at an acceptance rate alpha."""
    from .cost_model import best_gamma

    return best_gamma(measured_curve(target, draft, batch, mode, backend), alpha, mode)


def auto_gamma(target: Transformer, draft: Transformer, batch: int = 1, max_gamma: int = 8) -> int:
    """PEARL's draft length from the measured cost curve (not just the step-time ratio)."""
    return min(max_gamma, pick_gamma(target, draft, batch, "pearl"))


_rounds: dict[str, Callable] = {}


def round_fn(fn: Callable, device: torch.device, backend: str) -> Callable:
    """A loop's round bookkeeping, compiled (one graph per batch size) with the CPU compile
    backend: ~40-60 small eager ops become one call. Eager elsewhere (on a GPU they queue
    asynchronously behind the steps anyway)."""
    if backend != "compile" or device.type != "cpu":
        return fn
    key = f"{fn.__module__}.{fn.__name__}"
    if key not in _rounds:
        _rounds[key] = torch.compile(fn, fullgraph=True, dynamic=False,
                                     options={"cpp_wrapper": True})  # fmt: skip
    return _rounds[key]


def stand_ins(batch: int, width: int, device: torch.device) -> tuple[Callable[[], Tensor], ...]:
    """Makers of fresh zero tensors shaped like a round's: a row [B] of token ids, a window
    [B, width] of them, and lengths [B] int32, for compiling a round's bookkeeping ahead."""
    return (
        lambda: torch.zeros(batch, dtype=torch.long, device=device),
        lambda: torch.zeros(batch, width, dtype=torch.long, device=device),
        lambda: torch.zeros(batch, dtype=torch.int32, device=device),
    )


def pad(t: Tensor, width: int) -> Tensor:
    """t [B, w] right-padded with zeros to [B, width]."""
    return torch.nn.functional.pad(t, (0, width - t.shape[1]))


def end_round(
    stats: DecodeStats, policy, step: list[list[int]], proposed: int, accepted: int,
    callback: Callable[[list[list[int]]], None] | None,
    model_drafts: tuple[int, int] | None = None,
) -> None:  # fmt: skip
    """A round's bookkeeping on the host: the statistics, the γ policy, the streamed tokens.
    ``model_drafts``: (tested, accepted) of the draft model's own tokens (tested: up to the
    window's first rejection), for the policy and ``stats.extra["model_drafts"]``, where a round
    tells them apart from the prompt lookup's (the fused C++ rounds); else every draft counts."""
    stats.proposed += proposed
    stats.accepted += accepted
    tested, kept = (proposed, accepted) if model_drafts is None else model_drafts
    policy.update(kept, tested)
    totals = stats.extra.setdefault("model_drafts", [0, 0])  # [tested, accepted], whole decode
    totals[0] += tested
    totals[1] += kept
    stats.emitted += sum(len(s) for s in step)
    if callback is not None:
        callback(step)


def end_plain_steps(
    stats: DecodeStats, gate, step: list[list[int]], steps: int,
    callback: Callable[[list[list[int]]], None] | None, top: float,
) -> None:  # fmt: skip
    """The bookkeeping of ``steps`` plain steps (the speculation gate's arm, begun at ``top``):
    the statistics, the streamed tokens and the gate's measurement; no γ policy (no drafts)."""
    emitted = sum(map(len, step))
    stats.target_calls += steps
    stats.emitted += emitted
    if callback is not None:
        callback(step)
    gate.record(emitted, time.perf_counter() - top, units=steps)


def end_decode(stats: DecodeStats, policy, start: float) -> None:
    """A decode's closing statistics; the policy keeps what it learned for the next decode."""
    stats.seconds = time.perf_counter() - start
    stats.extra["gammas"] = policy.history
    stats.extra["side_scales"] = (policy.target_scale.value, policy.draft_scale.value)
    stats.extra["round_host_seconds"] = policy.host.value
    policy.remember()


def emit(tokens: list[int], output: list[int], step: list[int], eos: set[int], budget: int) -> bool:
    """Append verified tokens to a sequence's output and to this step's stream, stopping at its
    EOS or when it holds budget tokens; True once the sequence is finished."""
    for token in tokens:
        output.append(token)
        step.append(token)
        if token in eos or len(output) >= budget:
            return True
    return False


# Prompt lookup's n-gram length for greedy drafts on fused CPU steps (csrc/cpu/lookup.h): where a
# sequence's last LOOKUP tokens occurred before, the token after them is drafted instead of the
# draft model's argmax. On the embedded pair's greedy continuations of held-out prompts it covers
# ~79% of positions at 95% accuracy (the embedded draft model: 85% there), the rest stay the
# model's.
LOOKUP = 3


def token_history(
    prompts: list[list[int]], capacity: int, lookup: int = 1
) -> tuple[Tensor, Tensor]:
    """Each sequence's tokens for the lookup, its prompt to start with: ([B, capacity] int64,
    lengths [B] int64); the C++ rounds append what they commit. Empty when lookup is 0."""
    if lookup == 0:
        return torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64)
    history = torch.zeros(len(prompts), capacity, dtype=torch.int64)
    for b, p in enumerate(prompts):
        history[b, : len(p)] = torch.tensor(p)
    return history, torch.tensor([len(p) for p in prompts], dtype=torch.int64)


def check_pair(target: Transformer, draft: Transformer) -> None:
    if target.config.vocab_size != draft.config.vocab_size:
        raise ValueError(
            f"draft and target must share a vocabulary: {draft.config.vocab_size} vs "
            f"{target.config.vocab_size} tokens"
        )
