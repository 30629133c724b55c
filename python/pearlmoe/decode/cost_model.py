"""Choosing the draft length (and whether to speculate at all) from measured costs.

PEARL's Theorem 1 (γ = c, the target/draft step-time ratio) assumes that verifying a window
costs one target step. For a MoE target it does not: a window's tokens route to different
experts, each of whose weights is read (at batch 1 on Hunyuan-Large every extra distinct expert
is ~22.5 B parameters), and on a CPU a window is also more arithmetic. So the target's cost is a
curve over the window width, measured, and γ maximises the expected tokens per second:

  autoregressive  1 token per T(1)
  speculative     E = (1 − α^(γ+1)) / (1 − α) tokens per γ·t_d + T(γ+1)      (Leviathan et al.)
  PEARL           a two-state chain per round, each round max(γ·t_d, T(window)), or, where the
                  draft's thread runs the target's work once it has drafted (the fused CPU
                  rounds), γ·t_d + (1 − γ·t_d / T(window)) · T⁺(window) with T⁺ the target's
                  step on its threads and the draft's:
                    pre-verify   window 1: always 1 token; to post-verify with probability α
                    post-verify  window γ: (1 − α^γ) / (1 − α) tokens on average; stays in
                                 post-verify with probability α^γ
                  (its tokens per round reduce to pearl.md's (1−α^γ)/((1−α)(1+α−α^γ)))

with α the per-token acceptance rate (re-estimated as decoding goes) and t_d the draft's time
per token; a round also pays h, the host work outside both sides (the loop's Python, the
hand-offs), observed as decoding goes. ``pearlmoe bench`` prints the curve and the choice.
"""

import time
from dataclasses import dataclass, field

import torch

from ..model.transformer import Transformer

MODES = ("ar", "speculative", "pearl")


def monotone_fit(values: list[float]) -> list[float]:
    """The non-decreasing sequence closest to values in least squares (pool adjacent
    violators: a run that decreases is replaced by its mean)."""
    pools: list[list[float]] = []  # [sum, count]
    for v in values:
        pools.append([v, 1])
        while len(pools) > 1 and pools[-2][0] / pools[-2][1] > pools[-1][0] / pools[-1][1]:
            total, count = pools.pop()
            pools[-1][0] += total
            pools[-1][1] += count
    return [total / count for total, count in pools for _ in range(int(count))]


@dataclass
class CostCurve:
    """Measured step times in seconds: ``target[n - 1]`` for a window of n tokens per sequence,
    ``draft`` per drafted token (a one-token draft step), at ``batch`` sequences; ``host`` the
    seconds a speculative or PEARL round spends outside both sides (0 until observed: with the
    fused CPU step a round's Python is a fifth of a round on the embedded pair). ``helped``:
    PEARL's target window times with the draft's thread taking part (the fused CPU rounds lend
    it to the target once it has drafted), or None where the sides keep their threads."""

    target: list[float]
    draft: float
    batch: int = 1
    extra: dict = field(default_factory=dict)
    host: float = 0.0
    helped: list[float] | None = None

    def __post_init__(self) -> None:
        # A wider window never costs less than a narrower one: timing noise that says otherwise
        # (seen on a busy VM) would pull γ towards the noise. The closest non-decreasing curve
        # (least squares: adjacent violators pooled into their mean) rather than a running
        # maximum, which let one slow sample at a narrow width raise every wider one.
        self.target = monotone_fit(self.target)
        if self.helped is not None:
            self.helped = monotone_fit(self.helped)

    def scaled(self, target: float, draft: float, host: float | None = None) -> "CostCurve":
        """The same curve with every target time times ``target``, the draft's times ``draft``
        and a round's host work ``host`` seconds (unchanged when None): what the sides and the
        loop cost inside the decode loop, as observed."""
        helped = None if self.helped is None else [t * target for t in self.helped]
        return CostCurve([t * target for t in self.target], self.draft * draft, self.batch,
                         dict(self.extra), self.host if host is None else host,
                         helped)  # fmt: skip

    def target_time(self, width: int) -> float:
        """T(width), extrapolated linearly past the measured widths."""
        return _at(self.target, width)

    def side_time(self, drafting: float, width: int) -> float:
        """A PEARL round's sides: γ draft steps taking ``drafting`` seconds beside the target's
        window; with ``helped``, the target runs alone while the draft drafts, then with the
        draft's thread too."""
        alone = self.target_time(width)
        if self.helped is None or drafting >= alone:
            return max(drafting, alone)
        return drafting + (1 - drafting / alone) * min(alone, _at(self.helped, width))


def _at(times: list[float], width: int) -> float:
    """times[width - 1], extrapolated linearly past the measured widths."""
    if width <= len(times):
        return times[width - 1]
    slope = times[-1] - times[-2] if len(times) > 1 else times[-1]
    return times[-1] + slope * (width - len(times))


def speculative_rate(curve: CostCurve, alpha: float, gamma: int) -> float:
    """Expected tokens per second (per sequence) of vanilla speculative decoding."""
    tokens = (gamma + 1) if alpha >= 1 else (1 - alpha ** (gamma + 1)) / (1 - alpha)
    return tokens / (gamma * curve.draft + curve.target_time(gamma + 1) + curve.host)


def pearl_rate(curve: CostCurve, alpha: float, gamma: int) -> float:
    """Expected tokens per second (per sequence) of PEARL's pre/post-verify chain, a round's
    sides costing ``curve.side_time`` (the slower of γ draft steps and the target's window, or
    less where the draft's thread helps the target)."""
    drafting = gamma * curve.draft
    pre_cost = curve.side_time(drafting, 1) + curve.host
    post_cost = curve.side_time(drafting, gamma) + curve.host
    if alpha >= 1:
        return gamma / post_cost
    stay_post = alpha**gamma
    post_tokens = (1 - stay_post) / (1 - alpha)
    pre_share, post_share = 1 - stay_post, alpha  # stationary weights, unnormalised
    tokens = pre_share * 1 + post_share * post_tokens
    return tokens / (pre_share * pre_cost + post_share * post_cost)


def ar_rate(curve: CostCurve) -> float:
    return 1 / curve.target_time(1)


def rate(curve: CostCurve, alpha: float, mode: str, gamma: int) -> float:
    if mode == "ar":
        return ar_rate(curve)
    return (speculative_rate if mode == "speculative" else pearl_rate)(curve, alpha, gamma)


def best_gamma(curve: CostCurve, alpha: float, mode: str, max_gamma: int = 8) -> int:
    """The γ in 1..max_gamma with the highest expected rate for this mode."""
    return max(range(1, max_gamma + 1), key=lambda g: rate(curve, alpha, mode, g))


def ceiling(curve: CostCurve, mode: str, max_gamma: int = 8) -> tuple[int, float]:
    """(γ, tokens/s per sequence): the most a mode can reach on this curve whatever its drafts,
    with every draft accepted, drafting free and no host work between the sides. A speed-up
    target above it is out of reach for this target model on this machine."""
    free = CostCurve(curve.target, 0.0, curve.batch, dict(curve.extra), helped=curve.helped)
    g = best_gamma(free, 1.0, mode, max_gamma)
    return g, rate(free, 1.0, mode, g)


def flat(curve: CostCurve) -> CostCurve:
    """The same curve with every window costing one step (T(n) = T(1), PEARL's helped window
    likewise): the verification a dense model's step nearly has where its weights dominate, and
    PEARL's Theorem 1 assumes. Against the measured curve it isolates what a MoE target's rising
    window costs a mode: the tokens of a window route to more experts, whose weights are read."""
    helped = None if curve.helped is None else [curve.helped[0]] * len(curve.helped)
    return CostCurve([curve.target[0]] * len(curve.target), curve.draft, curve.batch,
                     dict(curve.extra), curve.host, helped)  # fmt: skip


def best_ratio(curve: CostCurve, alpha: float, mode: str, base: float,
               max_gamma: int = 8) -> tuple[int, float]:  # fmt: skip
    """(γ, rate / base): the best this mode can do at acceptance rate alpha on the curve,
    ``base`` the rate it is compared with (autoregressive decoding's)."""
    g = best_gamma(curve, alpha, mode, max_gamma)
    return g, rate(curve, alpha, mode, g) / base


def alpha_needed(curve: CostCurve, mode: str, ratio: float, base: float,
                 max_gamma: int = 8) -> float | None:  # fmt: skip
    """The least acceptance rate (to 0.005) at which this mode, at its best γ, reaches ``ratio``
    times ``base`` on the curve; None where even drafts always accepted cannot. The rate rises
    with alpha at every γ, so the answer is found by bisection."""
    reaches = lambda a: best_ratio(curve, a, mode, base, max_gamma)[1] >= ratio  # noqa: E731
    if not reaches(1.0):
        return None
    lo, hi = 0.0, 1.0  # reaches(hi) holds; reaches(lo) may
    if reaches(lo):
        return 0.0
    while hi - lo > 0.005:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if reaches(mid) else (mid, hi)
    return round(hi, 3)


@dataclass
class Plan:
    """The fastest mode and its γ, with every mode's predicted tokens/s (at its best γ)."""

    mode: str
    gamma: int
    predicted: dict[str, tuple[int, float]]  # mode -> (γ, tokens/s)


def plan(
    curve: CostCurve, alpha: float, max_gamma: int = 8, pearl_curve: CostCurve | None = None
) -> Plan:
    """The fastest of AR, speculative and PEARL on ``curve``; PEARL's prediction on
    ``pearl_curve`` when given (its sides' costs as PEARL runs them: on a CPU each side has half
    the cores, which slows a target bound by arithmetic, and a quantised one is)."""
    predicted = {"ar": (0, ar_rate(curve))}
    for mode in ("speculative", "pearl"):
        c = pearl_curve if mode == "pearl" and pearl_curve is not None else curve
        g = best_gamma(c, alpha, mode, max_gamma)
        predicted[mode] = (g, rate(c, alpha, mode, g))
    mode = max(predicted, key=lambda m: predicted[m][1])
    return Plan(mode, predicted[mode][0], predicted)


class AcceptanceEstimate:
    """A running per-token acceptance rate: a prior worth ``weight`` tokens, then what decoding
    accepts (an exponential moving average over about ``window`` proposed tokens)."""

    def __init__(self, prior: float = 0.6, weight: float = 8.0, window: float = 256.0) -> None:
        self.accepted, self.proposed, self.window = prior * weight, weight, window

    def update(self, accepted: int, proposed: int) -> None:
        if self.proposed + proposed > self.window:
            keep = max(0.0, (self.window - proposed) / self.proposed)
            self.accepted, self.proposed = self.accepted * keep, self.proposed * keep
        self.accepted += accepted
        self.proposed += proposed

    @property
    def alpha(self) -> float:
        return min(0.99, max(0.01, self.accepted / self.proposed)) if self.proposed else 0.5


class RunningRatio:
    """An exponential moving average of ratios (weight 1/16 per sample), 1.0 before any."""

    def __init__(self, weight: float = 1 / 16, value: float = 1.0, count: int = 0) -> None:
        self.value, self.weight, self.count = value, weight, count

    def add(self, ratio: float) -> None:
        self.count += 1
        w = max(self.weight, 1 / self.count)  # the plain mean over the first samples
        self.value += w * (ratio - self.value)


class GammaPolicy:
    """A loop's draft length: fixed when the caller gave one; otherwise the best γ on the measured
    cost curve at the running acceptance estimate, chosen again every ``every`` rounds."""

    def __init__(
        self, curve: CostCurve | None, mode: str, gamma: int | None = None, max_gamma: int = 8,
        every: int = 8, memory: tuple[dict, object] | None = None,
    ) -> None:  # fmt: skip
        """``memory``: (a dict, this pair's key in it) holding the (α, target scale, draft scale)
        an earlier decode of the same pair ended with (``learned()``, stored by ``remember``),
        the starting point instead of the defaults."""
        if gamma is None and curve is None:
            raise ValueError("GammaPolicy: give a gamma or a cost curve to choose it from")
        self.curve, self.mode, self.max_gamma, self.every = curve, mode, max_gamma, every
        self.fixed = gamma is not None
        self.memory = memory
        learned = memory[0].get(memory[1]) if memory is not None else None
        alpha, target_scale, draft_scale, host = learned or (0.6, 1.0, 1.0, 0.0)
        self.estimate = AcceptanceEstimate(prior=alpha, weight=8.0 if learned is None else 32.0)
        # Observed / measured time of each side inside the loop (caches cold from the other
        # side's work, the sides contending for memory): running means, 1.0 until observed.
        seen = 0 if learned is None else 16
        self.target_scale = RunningRatio(value=target_scale, count=seen)
        self.draft_scale = RunningRatio(value=draft_scale, count=seen)
        self.host = RunningRatio(value=host, count=seen)  # seconds a round outside the sides
        self.gamma = gamma if gamma is not None else best_gamma(self.live_curve,
                                                                self.estimate.alpha, mode,
                                                                max_gamma)  # fmt: skip
        self.history = [self.gamma]
        self._rounds = 0

    def learned(self) -> tuple[float, float, float, float]:
        """What this decode learned of the pair: (α, target scale, draft scale, host seconds a
        round)."""
        return self.estimate.alpha, self.target_scale.value, self.draft_scale.value, self.host.value

    def remember(self) -> None:
        """Leave what was learned in ``memory`` for the next decode of the pair."""
        if self.memory is not None:
            self.memory[0][self.memory[1]] = self.learned()

    def observe(self, width: int, target_s: float, drafted: int, draft_s: float) -> None:
        """A round's measured sides: the target's step over ``width`` tokens took target_s
        seconds, ``drafted`` draft steps draft_s (wall times where they are the sides' own:
        PEARL's joined sides, a CPU's sequential phases)."""
        if self.curve is None:
            return
        self.target_scale.add(target_s / self.curve.target_time(width))
        if drafted:
            self.draft_scale.add(draft_s / (drafted * self.curve.draft))

    def observe_host(self, seconds: float) -> None:
        """A round's wall time outside its two sides (the loop's host work, the hand-offs)."""
        if self.curve is not None:
            self.host.add(max(0.0, seconds))

    @property
    def live_curve(self) -> "CostCurve | None":
        """The measured curve scaled by what the loop has observed, with its host work."""
        if self.curve is None:
            return None
        return self.curve.scaled(self.target_scale.value, self.draft_scale.value,
                                 self.host.value)  # fmt: skip

    def update(self, accepted: int, proposed: int) -> int:
        """Record a round's acceptance; returns the γ for the next rounds."""
        self.estimate.update(accepted, proposed)
        self._rounds += 1
        if not self.fixed and self._rounds % self.every == 0:
            best = best_gamma(self.live_curve, self.estimate.alpha, self.mode, self.max_gamma)
            if best != self.gamma:
                self.gamma = best
                self.history.append(best)
        return self.gamma


class SpeculationGate:
    """Whether a loop's next units speculate (rounds) or step plainly (autoregressive steps of
    the target alone): whichever this decode has measured faster, in committed tokens a second.

    Speculation pays only where a window costs less than the tokens it commits; where it does
    not (a batch whose windows are arithmetic on a CPU: 0.66-0.90x AR at batch 4 on the 2-core
    VM, bench/NOTES.md) the loop should not speculate at all, as vLLM turns speculation off
    above a batch size. The cost model prices this but not the prompt lookup's free drafts, so
    the gate measures instead: it runs phases of one arm, the faster arm in phases that double
    while it stays ahead, up to ``longest`` units, and the other in probes of ``probe`` units
    between them. The leader changes only where the other arm is faster by ``margin``: a
    round's yield depends on the text (the lookup's runs where the output repeats itself), so
    rounds measured over one stretch of text and plain steps over another differ by more than
    noise (at batch 1 on the embedded pair, where a round beats a plain step by 10-20% on
    average, plain steps still made 58-84% of some decodes' tokens with a 5% or a 15% margin:
    common.speculation_gate leaves batch 1 ungated). Each arm's rate sums its phases'
    tokens and seconds, older phases weighted ``decay`` at each of its new ones, without a
    phase's first unit: a switch costs the first unit (the draft catching up on the tokens it
    missed, cold caches, a pool helper waking), which long phases amortise and which would
    otherwise make a short probe of the other arm read slow. ``memory``: (a dict, a key) where
    the decode leaves its rates and phase for the next decode of the same pair and batch.
    """

    SPEC, PLAIN = "speculate", "plain"

    def __init__(
        self, enabled: bool = True, probe: int = 12, first: int = 16, longest: int = 64,
        margin: float = 1.15, decay: float = 0.75, memory: tuple[dict, object] | None = None,
    ) -> None:  # fmt: skip
        self.enabled, self.probe, self.first, self.longest = enabled, probe, first, longest
        self.margin, self.decay, self.memory = margin, decay, memory
        self.sums = {self.SPEC: [0.0, 0.0], self.PLAIN: [0.0, 0.0]}  # arm -> [tokens, seconds]
        self.arm, self.best, self.phase = self.SPEC, self.SPEC, first
        learned = memory[0].get(memory[1]) if memory is not None and enabled else None
        if learned is not None:
            self.sums = {arm: list(s) for arm, s in learned["sums"].items()}
            self.arm = self.best = learned["best"]
            self.phase = learned["phase"]
        self.left = self.phase
        self.fresh = [0.0, 0.0]  # this phase's tokens and seconds, but its first unit's
        self.warming = True  # the next unit is a phase's first
        self.units = {self.SPEC: 0, self.PLAIN: 0}  # this decode's units of each arm
        self.tokens = {self.SPEC: 0, self.PLAIN: 0}

    @property
    def plain(self) -> bool:
        """The next unit steps plainly."""
        return self.enabled and self.arm == self.PLAIN

    def budget(self) -> int:
        """Units left in this phase (a loop may run several plain steps in one call)."""
        return max(1, self.left)

    def rate(self, arm: str) -> float | None:
        tokens, seconds = self.sums[arm]
        return tokens / seconds if seconds > 0 else None

    def record(self, tokens: int, seconds: float, units: int = 1) -> None:
        """``units`` units of the current arm committed ``tokens`` tokens (over the whole batch)
        in ``seconds`` of wall time, the loop's host work included."""
        self.units[self.arm] += units
        self.tokens[self.arm] += tokens
        if not self.enabled:
            return
        if not self.warming:
            self.fresh[0] += tokens
            self.fresh[1] += seconds
        self.warming = False
        self.left -= units
        if self.left <= 0:
            self._next_phase()

    def _next_phase(self) -> None:
        done = self.sums[self.arm]
        if self.fresh[1] > 0:
            done[0] = done[0] * self.decay + self.fresh[0]
            done[1] = done[1] * self.decay + self.fresh[1]
        self.fresh = [0.0, 0.0]
        was = self.arm
        other = self.PLAIN if self.best == self.SPEC else self.SPEC
        if self.arm == self.best:  # the leader's phase is over: probe the other
            self.arm, self.left = other, self.probe
            self.warming = True
            return
        # A probe is over: the leader changes only where the other is clearly faster.
        best_rate, other_rate = self.rate(self.best), self.rate(other)
        if best_rate and other_rate and other_rate > best_rate * self.margin:
            self.best, self.phase = other, self.first
        else:
            self.phase = min(self.phase * 2, self.longest)
        self.arm, self.left = self.best, self.phase
        self.warming = self.arm != was

    def remember(self) -> None:
        if self.memory is not None and self.enabled:
            self.memory[0][self.memory[1]] = {
                "sums": {arm: list(s) for arm, s in self.sums.items()},
                "best": self.best,
                "phase": self.phase,
            }

    def summary(self) -> dict:
        """This decode's units and tokens per arm and each arm's rate (tokens/s) as measured."""
        return {
            "enabled": self.enabled,
            "units": dict(self.units),
            "tokens": dict(self.tokens),
            "rates": {arm: self.rate(arm) for arm in self.sums},
            "leader": self.best,
        }


# ---- measuring ---------------------------------------------------------------------------------

_curves: dict[tuple, CostCurve] = {}


# Cached tokens a cost curve is timed after, unless told (pearlmoe bench times its CPU curve at
# a decode's midpoint instead: decode_bench.curve_context).
CURVE_CONTEXT = 64


def _median_seconds(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of fn(i) over repeats calls (i = 0, 1, ...), after two warm-up calls."""
    times = []
    for i in range(repeats + 2):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn(i)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    times = sorted(times[2:])  # the first two warm up
    return times[len(times) // 2]


@torch.inference_mode()
def step_seconds(
    model: Transformer,
    widths: list[int],
    batch: int = 1,
    backend: str = "eager",
    context: int = CURVE_CONTEXT,
    repeats: int = 7,
    passes: int = 3,
) -> list[float]:
    """Seconds of one step of each window width, after a context of random tokens: the fastest
    of ``passes`` passes over the widths, each the median of ``repeats`` steps. Every repeat
    scores a different random window (fixed seed): its tokens route to experts as varied text
    does. Repeating one window would keep its experts' weights in cache and understate a MoE's
    window cost (measured: 0.71 vs 0.92 ms for 3 tokens on the embedded target). The passes
    interleave the widths, so a shared machine's slow seconds (±10-25% on the CI kind's VMs,
    within a run) land on one pass, not on one width."""
    from .runner import Runner

    runner = Runner(model, batch, context + max(widths) + 1, backend)
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    runner.prefill(torch.randint(0, vocab, (batch, context), generator=g).tolist())
    best = [float("inf")] * len(widths)
    for _ in range(passes):
        for i, width in enumerate(widths):
            ids = torch.randint(0, vocab, (repeats + 2, batch, width), generator=g).to(model.device)
            seconds = _median_seconds(lambda i, ids=ids: runner(ids[i]), model.device, repeats)
            best[i] = min(best[i], seconds)
    return best


def measure(
    target: Transformer,
    draft: Transformer,
    batch: int = 1,
    backend: str = "eager",
    max_width: int = 9,
) -> CostCurve:
    """The target's cost curve over widths 1..max_width and the draft's step time, with this
    thread's torch thread count (cached per pair of models, batch, backend and thread count)."""
    threads = torch.get_num_threads()
    key = _curve_key(target, draft, batch, backend, max_width, threads)
    if key not in _curves:
        measure_interleaved(target, draft, [threads], batch, backend, 1, max_width)
    return _curves[key]


def _curve_key(target, draft, batch: int, backend: str, max_width: int, threads: int) -> tuple:
    return (id(target), id(draft), batch, backend, max_width, threads)


def measure_interleaved(
    target: Transformer,
    draft: Transformer,
    thread_counts: list[int],
    batch: int = 1,
    backend: str = "eager",
    rounds: int = 3,
    max_width: int = 9,
    context: int = CURVE_CONTEXT,
) -> dict[int, CostCurve]:
    """measure() at several thread counts in alternating rounds, each width's and the draft's
    fastest over the rounds, after ``context`` cached tokens; cached where measure() looks.
    Measured one after the other, the curves of one and two threads came from different minutes
    of a shared VM, and PEARL's prediction and ceiling turn on their ratio: quick curves put the
    ceiling at 1.38-1.92x AR in three runs of an hour whose careful curve gave 1.59x."""
    widths = list(range(1, max_width + 1))
    best: dict[int, tuple[list[float], float]] = {}
    before = torch.get_num_threads()
    try:
        for _ in range(rounds):
            for threads in thread_counts:
                torch.set_num_threads(threads)
                t = step_seconds(target, widths, batch, backend, context)
                d = step_seconds(draft, [1], batch, backend, context)[0]
                if threads in best:
                    t = [min(a, b) for a, b in zip(best[threads][0], t, strict=True)]
                    d = min(best[threads][1], d)
                best[threads] = (t, d)
    finally:
        torch.set_num_threads(before)
    curves = {}
    for threads, (t, d) in best.items():
        key = _curve_key(target, draft, batch, backend, max_width, threads)
        _curves[key] = curves[threads] = CostCurve(t, d, batch, {"threads": threads})
    return curves
