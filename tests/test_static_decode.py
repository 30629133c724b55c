"""The static decode step and what rests on it: a step is window-invariant (a token's logits are
bitwise the same in a one-token step and in a verification window, eager and compiled), compiles
to one graph with no break, and the decode loops emit the same greedy tokens with every backend,
at batch 1 and 4, with ragged prompts and EOS inside a window. Also the KV cache's checks and the
cost model behind the choice of γ."""

import copy
import dataclasses
import itertools

import pytest
import torch

import pearlmoe
from conftest import requires_cuda
from pearlmoe.decode import cost_model, pearl_generate, speculative_generate
from pearlmoe.decode.common import num_threads
from pearlmoe.decode.runner import Runner, Sampling, _step
from pearlmoe.model import KVCache, ModelConfig, Transformer


def _pair(dtype: torch.dtype, seed: int = 0, noise: float = 0.2):
    """A MoE + CLA + QK-norm target (top-2 of 4 experts, so windows route to several experts)
    and a dense-MLP draft of another shape sharing its vocabulary."""
    torch.manual_seed(seed)
    config = ModelConfig(
        vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=48, num_experts=4, moe_topk=2,
        num_shared_expert=1, use_mixed_mlp_moe=True, use_cla=True, cla_share_factor=2,
        use_qk_norm=True, head_dim=16,
    )  # fmt: skip
    target = Transformer(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in target.parameters():
            if p.dim() >= 2:
                p.normal_(0, 1.5 * p.shape[-1] ** -0.5)
    draft = copy.deepcopy(target)
    with torch.no_grad():
        for p in draft.parameters():
            if p.dim() >= 2:
                p.add_(torch.randn_like(p) * p.std() * noise)
    return target.to(dtype), draft.to(dtype)


@pytest.fixture(scope="module")
def pair32():
    return _pair(torch.float32)


def _window_probs(model, backend, prompt, width, total):
    """Next-token distributions (temperature 1: the softmax of the logits) of prompt[4:4+total],
    computed `width` tokens per step."""
    runner = Runner(model, 1, 64, backend, Sampling(temperature=1.0))
    runner.prefill([prompt[:4]])
    rows = []
    for start in range(4, 4 + total, width):
        probs, _ = runner(torch.tensor([prompt[start : start + width]]))
        rows.append(probs.clone())
        with torch.inference_mode():
            runner.lens.add_(probs.shape[1])
    return torch.cat(rows, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["eager", "compile"])
def test_step_is_window_invariant(dtype, backend):
    target, _ = _pair(dtype)
    prompt = torch.randint(0, 96, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    one = _window_probs(target, backend, prompt, 1, 30)
    for width in (2, 5, 6, 10):
        windowed = _window_probs(target, backend, prompt, width, 30)
        assert torch.equal(one, windowed), f"width {width}: {(one - windowed).abs().max()}"


def test_compiled_step_has_no_graph_break(pair32):
    target, _ = pair32
    runner = Runner(target, 2, 32)
    runner.prefill([[1, 2, 3], [4, 5]])
    for width, sampling in ((1, Sampling()), (3, Sampling(0.8, top_k=5, top_p=0.9))):
        ids = torch.zeros(2, width, dtype=torch.long)
        explained = torch._dynamo.explain(_step)(target, ids, runner.cache, sampling)
        assert explained.graph_break_count == 0, explained.break_reasons
        assert explained.graph_count == 1


PROMPTS4 = [[1, 2, 3, 4], [5, 6, 7, 8, 9, 10, 11], [12], [13, 14, 15]]


@pytest.mark.parametrize("batch", [1, 4])
def test_every_backend_emits_the_autoregressive_tokens(pair32, batch):
    target, draft = pair32
    prompts = PROMPTS4[:batch]
    want = pearlmoe.generate(target, prompts, 24)
    assert pearlmoe.generate(target, prompts, 24, backend="compile") == want
    for loop in (speculative_generate, pearl_generate):
        for gamma in (1, 3, 5):
            for backend in ("eager", "compile"):
                got, stats = loop(target, draft, prompts, 24, gamma=gamma, backend=backend)
                assert got == want, (loop.__name__, gamma, backend)
                assert 0 < stats.acceptance_rate < 1
    # The round bookkeeping both ways: on the host (the CPU default) and as tensor ops on the
    # device (what a GPU runs; compiled on the CPU with the compile backend).
    for loop in (speculative_generate, pearl_generate):
        for gamma, backend in ((1, "eager"), (2, "compile"), (4, "eager"), (4, "compile")):
            runs = {}
            for bookkeeping in ("host", "device"):
                got, stats = loop(target, draft, prompts, 24, gamma=gamma, backend=backend,
                                  bookkeeping=bookkeeping)  # fmt: skip
                assert got == want, (loop.__name__, gamma, backend, bookkeeping)
                assert stats.extra["bookkeeping"] == bookkeeping
                runs[bookkeeping] = (stats.accepted, stats.proposed, stats.target_calls)
            assert runs["host"] == runs["device"]  # the same rounds, not just the same tokens


def test_eos_inside_a_window_compiled(pair32):
    target, draft = pair32
    free = pearlmoe.generate(target, PROMPTS4, 24)
    eos = free[1][6]
    want = pearlmoe.generate(target, PROMPTS4, 24, eos_token_id=eos)
    assert want[1][-1] == eos and len(want[1]) == 7
    for loop in (speculative_generate, pearl_generate):
        got, _ = loop(target, draft, PROMPTS4, 24, gamma=4, eos_token_id=eos, backend="compile")
        assert got == want
    for loop in (speculative_generate, pearl_generate):
        for bookkeeping in ("host", "device"):
            got, _ = loop(target, draft, PROMPTS4, 24, gamma=3, eos_token_id=eos,
                          bookkeeping=bookkeeping)  # fmt: skip
            assert got == want


def test_pearl_reports_its_overlap(pair32):
    target, draft = pair32
    _, stats = pearl_generate(target, draft, [[1, 2, 3]], 16, gamma=3)
    times = stats.extra["round_seconds"]
    assert times["slower"] <= times["wall"] + 1e-9
    assert stats.extra["overlap"] >= 1.0 - 1e-9


@pytest.mark.parametrize("batch", [1, 3])
def test_pearl_with_the_draft_in_a_child_process(pair32, batch):
    target, draft = pair32
    prompts = PROMPTS4[:batch]
    want = pearlmoe.generate(target, prompts, 20)
    for gamma in (1, 3):
        got, stats = pearl_generate(target, draft, prompts, 20, gamma=gamma, draft_process=True)
        assert got == want and stats.extra["draft_process"] is True
        assert stats.extra["post_rounds"] > 0 and 0 < stats.acceptance_rate < 1
    # Sampling: the child draws from its own generator, seeded from the caller's, so a seeded
    # run repeats exactly.
    runs = [
        pearl_generate(target, draft, prompts, 16, gamma=2, temperature=1.0, draft_process=True,
                       generator=torch.Generator().manual_seed(5))[0]
        for _ in range(2)
    ]  # fmt: skip
    assert runs[0] == runs[1]


def test_draft_process_reports_the_childs_errors(pair32):
    from pearlmoe.decode.draft_process import DraftProcess

    _, draft = pair32
    worker = DraftProcess.get(draft, 1)
    worker.start(1, 4, "eager", Sampling(), 0, 3, 96)  # capacity 4
    worker.prefill([[1, 2, 3, 4, 5, 6]])
    with pytest.raises(RuntimeError, match=r"(?s)PEARL draft process failed:.*past the cache"):
        worker.wait()
    worker.start(1, 16, "eager", Sampling(), 0, 3, 96)  # the child still serves
    worker.prefill([[1, 2, 3]])
    worker.wait()
    worker.submit(torch.tensor([4]), 3)
    xs, qs, seconds = worker.result()
    assert xs.shape == (1, 3) and qs is None and seconds > 0
    assert worker.lens.tolist() == [3 + 1 + 2]


def test_runner_checks_and_warmup(pair32):
    target, _ = pair32
    with pytest.raises(ValueError, match="backend must be one of"):
        Runner(target, 1, 8, "turbo")
    with pytest.raises(ValueError, match="cudagraph backend needs a model on a CUDA device"):
        Runner(target, 1, 8, "cudagraph")
    runner = Runner(target, 2, 16)
    runner.prefill([[1, 2, 3], []])
    assert runner.lens.tolist() == [3, 0]
    runner.warmup([1, 4])
    assert runner.lens.tolist() == [3, 0]
    with pytest.raises(ValueError, match="prefill: 1 prompts for a batch of 2"):
        runner.prefill([[1]])


# ---- KV cache checks -----------------------------------------------------------------------------


def test_kv_cache_rejects_bad_counts_and_shapes():
    cache = KVCache(num_layers=2, batch_size=2, capacity=6, kv_heads=1, head_dim=4,
                    dtype=torch.float32)  # fmt: skip
    with pytest.raises(ValueError, match=r"KVCache: num_new must give 0..6 new tokens"):
        cache.advance(-1)
    k = torch.zeros(2, 3, 1, 4)
    with pytest.raises(ValueError, match=r"KVCache: num_new must give 0..3 new tokens"):
        cache.write(0, k, k, num_new=4)
    with pytest.raises(TypeError, match=r"KVCache: num_new must be an int, a list or a tensor"):
        cache.advance(1.5)
    with pytest.raises(ValueError, match=r"KVCache: k_hat and v must both be \[B=2, S, Hkv, D\]"):
        cache.write(0, torch.zeros(1, 3, 1, 4), torch.zeros(1, 3, 1, 4))
    with pytest.raises(ValueError, match=r"KVCache: k_hat and v must have 1 heads of 4"):
        cache.write(0, torch.zeros(2, 3, 2, 4), torch.zeros(2, 3, 2, 4))
    with pytest.raises(ValueError, match=r"KVCache: every size must be a positive int"):
        KVCache(num_layers=2, batch_size=0, capacity=6, kv_heads=1, head_dim=4)
    assert cache.seq_lens() == [0, 0]  # nothing moved


def test_kv_cache_device_lengths_and_host_copy():
    cache = KVCache(num_layers=1, batch_size=2, capacity=8, kv_heads=1, head_dim=2,
                    dtype=torch.float32)  # fmt: skip
    cache.advance([2, 3])
    cache.set_lens(torch.tensor([5, 1], dtype=torch.int32))  # device update: host copy dropped
    assert cache.seq_lens() == [5, 1]
    with pytest.raises(RuntimeError, match="sequence 0 would hold 9 tokens"):
        cache.advance([4, 0])
    view = cache.sequence(1)
    view.advance(2)
    assert cache.seq_lens() == [5, 3] and cache.lens.tolist() == [5, 3]


# ---- cost model ----------------------------------------------------------------------------------


def _curve(target_ms: list[float], draft_ms: float) -> cost_model.CostCurve:
    return cost_model.CostCurve([t / 1e3 for t in target_ms], draft_ms / 1e3)


FLAT = _curve([1.0] * 12, 0.1)  # a dense target on a GPU: verifying a window costs one step
RISING = _curve([1.0 + 0.35 * n for n in range(12)], 0.1)  # a MoE target: more experts per window


def test_gamma_follows_the_cost_curve():
    for mode in ("speculative", "pearl"):
        flat = cost_model.best_gamma(FLAT, 0.8, mode, max_gamma=10)
        rising = cost_model.best_gamma(RISING, 0.8, mode, max_gamma=10)
        assert flat > rising, mode
    # Theorem 1's regime: a flat curve puts PEARL's window at about c = T_target / T_draft.
    assert cost_model.best_gamma(FLAT, 0.9, "pearl", max_gamma=12) in (9, 10, 11)


def test_ceiling_is_the_rate_with_perfect_free_drafts():
    """The ceiling a target speed-up is checked against: on a flat curve a window of 9 is 9
    tokens per step; on the rising (MoE) one the best window is shorter and the ceiling lower;
    PEARL on sides twice as slow (a CPU's half the cores) cannot reach what it does on the full
    curve, and no acceptance rate beats the ceiling."""
    assert cost_model.ceiling(FLAT, "speculative") == (8, pytest.approx(9 / FLAT.target[0]))
    assert cost_model.ceiling(FLAT, "pearl") == (8, pytest.approx(8 / FLAT.target[0]))
    g, top = cost_model.ceiling(RISING, "speculative")
    assert top == pytest.approx((g + 1) / RISING.target_time(g + 1)) and top < 9 / FLAT.target[0]
    halved = _curve([2.0 * t * 1e3 for t in RISING.target], 0.1)
    assert cost_model.ceiling(halved, "pearl")[1] == pytest.approx(
        cost_model.ceiling(RISING, "pearl")[1] / 2
    )
    for mode in ("speculative", "pearl"):
        for alpha in (0.5, 0.9, 0.99):
            best = max(cost_model.rate(RISING, alpha, mode, g) for g in range(1, 9))
            assert best < cost_model.ceiling(RISING, mode)[1]


def test_alpha_needed_is_the_least_acceptance_that_reaches_a_speed_up():
    """The acceptance rate the bench reports a goal would need: at it the best γ reaches the
    ratio and just below it none does; a rising (MoE) curve needs more than a flat one; a goal
    above the ceiling is out of reach (None), one that even rejected drafts reach needs 0."""
    for mode in ("speculative", "pearl"):
        base = cost_model.ar_rate(FLAT)
        need = cost_model.alpha_needed(FLAT, mode, 1.5, base)
        assert need is not None and 0 < need < 1
        assert cost_model.best_ratio(FLAT, need, mode, base)[1] >= 1.5
        assert cost_model.best_ratio(FLAT, need - 0.01, mode, base)[1] < 1.5
        rising = cost_model.alpha_needed(RISING, mode, 1.5, cost_model.ar_rate(RISING))
        assert rising is not None and rising > need
        top = cost_model.ceiling(FLAT, mode)[1] / base
        assert cost_model.alpha_needed(FLAT, mode, top * 1.01, base) is None
        assert cost_model.alpha_needed(FLAT, mode, 0.5, base) == 0.0
    g, ratio = cost_model.best_ratio(RISING, 0.8, "speculative", 1.0)
    assert g == cost_model.best_gamma(RISING, 0.8, "speculative")
    assert ratio == pytest.approx(cost_model.rate(RISING, 0.8, "speculative", g))


def test_flat_verification_isolates_a_rising_windows_cost():
    """The bench's counterfactual: the same curve with every window at one step's cost (PEARL's
    helped window too). A flat curve is its own; on the rising (MoE) curve the same acceptance
    rate allows more at a longer best γ, and the ratio is the rate on the flattened curve."""
    assert cost_model.flat(FLAT).target == FLAT.target
    helped_ms = [0.6 + 0.2 * n for n in range(12)]  # the target with the draft's thread too
    helped = cost_model.CostCurve(RISING.target, RISING.draft, helped=[t / 1e3 for t in helped_ms])
    flattened = cost_model.flat(helped)
    assert flattened.target == [RISING.target[0]] * 12
    assert flattened.helped == [0.6e-3] * 12
    assert (flattened.draft, flattened.batch) == (helped.draft, helped.batch)
    base = cost_model.ar_rate(RISING)  # T(1) is the same on both curves
    assert cost_model.ar_rate(flattened) == base
    for mode in ("speculative", "pearl"):
        g_rising, rising = cost_model.best_ratio(helped, 0.8, mode, base)
        g_flat, at_flat = cost_model.best_ratio(flattened, 0.8, mode, base)
        assert at_flat > rising and g_flat > g_rising
        assert at_flat == pytest.approx(cost_model.rate(flattened, 0.8, mode, g_flat) / base)


def test_plan_falls_back_to_autoregressive_when_speculation_cannot_win():
    assert cost_model.plan(RISING, 0.05).mode == "ar"
    good = cost_model.plan(FLAT, 0.8)
    assert good.mode == "pearl" and good.predicted["pearl"][1] > good.predicted["speculative"][1]
    assert good.predicted["speculative"][1] > good.predicted["ar"][1]


def test_plan_prices_pearl_on_its_own_sides():
    """On a CPU PEARL's sides get half the cores each: a target bound by arithmetic (a quantised
    one) then steps ~2x slower, which its prediction must see (measured on SmolLM2 Q4: PEARL
    predicted above AR on the full-thread curve, measured at 0.7x AR)."""
    halved = _curve([2.0 * t * 1e3 for t in FLAT.target], 0.1)
    assert cost_model.plan(FLAT, 0.8).mode == "pearl"
    slow = cost_model.plan(FLAT, 0.8, pearl_curve=halved)
    assert slow.mode == "speculative"
    assert slow.predicted["pearl"][1] < cost_model.plan(FLAT, 0.8).predicted["pearl"][1] / 1.5


def test_pearl_rounds_where_the_draft_helps_the_target():
    """The fused CPU rounds lend the draft's thread to the target once it has drafted: the
    target runs alone (its side's curve) while the draft drafts, then on the helped curve. A
    round costs the slower side when the draft is the slower one, and the ceiling (drafting
    free) is the helped curve's."""
    alone = _curve([2.0 * t * 1e3 for t in RISING.target], 0.2)  # one of two threads
    helped = dataclasses.replace(alone, helped=list(RISING.target))  # both
    for width in (1, 4, 9):
        t1, t2 = alone.target_time(width), RISING.target_time(width)
        assert helped.side_time(0.0, width) == pytest.approx(t2)
        # half the window's work alone while drafting, the other half at the helped speed
        assert helped.side_time(t1 / 2, width) == pytest.approx(t1 / 2 + t2 / 2)
        assert helped.side_time(3 * t1, width) == alone.side_time(3 * t1, width) == 3 * t1
        assert alone.side_time(t1 / 2, width) == t1
    assert cost_model.ceiling(helped, "pearl")[1] == pytest.approx(
        cost_model.ceiling(RISING, "pearl")[1]
    )
    for alpha in (0.5, 0.9):
        for gamma in (2, 5):
            assert cost_model.pearl_rate(helped, alpha, gamma) > cost_model.pearl_rate(
                alone, alpha, gamma
            )
    # scaled() scales both target curves alike (the loop's observed side cost)
    twice = helped.scaled(2.0, 1.0)
    assert twice.helped == pytest.approx([2 * t for t in helped.helped])


@pytest.mark.parametrize("alpha", [0.3, 0.6, 0.9])
@pytest.mark.parametrize("gamma", [1, 2, 5])
def test_pearl_chain_matches_the_closed_form(alpha, gamma):
    # With a flat curve and drafting no slower than the target, each round costs one target
    # step, so the rate is pearl.md's tokens-per-round (1-α^γ)/((1-α)(1+α-α^γ)) per step.
    curve = _curve([1.0] * 8, 1.0 / gamma)
    closed = (1 - alpha**gamma) / ((1 - alpha) * (1 + alpha - alpha**gamma))
    assert cost_model.pearl_rate(curve, alpha, gamma) * 1e-3 == pytest.approx(closed)
    leviathan = (1 - alpha ** (gamma + 1)) / (1 - alpha)
    spec = cost_model.speculative_rate(curve, alpha, gamma) * 1e-3 * 2  # γ·t_d + T = 2 steps
    assert spec == pytest.approx(leviathan)


def test_acceptance_estimate_tracks_recent_rounds():
    est = cost_model.AcceptanceEstimate(prior=0.5, weight=8, window=64)
    for _ in range(100):
        est.update(accepted=9, proposed=10)
    assert est.alpha == pytest.approx(0.9, abs=0.02)
    for _ in range(100):
        est.update(accepted=2, proposed=10)
    assert est.alpha == pytest.approx(0.2, abs=0.02)


def test_curve_is_levelled_and_scaled_by_what_the_loop_observes():
    noisy = _curve([1.0, 1.4, 1.2, 2.0], 0.1)  # a window cannot cost less than a narrower one
    assert [round(t * 1e3, 6) for t in noisy.target] == [1.0, 1.3, 1.3, 2.0]
    # One slow sample at width 1 no longer lifts the whole curve to it (a running maximum did).
    spike = _curve([1.6, 0.8, 0.9, 1.0, 1.1], 0.1)
    assert [round(t * 1e3, 6) for t in spike.target] == [1.075, 1.075, 1.075, 1.075, 1.1]
    assert cost_model.monotone_fit([3.0, 1.0, 2.0, 5.0, 4.0]) == [2.0, 2.0, 2.0, 4.5, 4.5]
    assert cost_model.monotone_fit([]) == []
    policy = cost_model.GammaPolicy(_curve([1.0] * 12, 0.1), "speculative", max_gamma=10)
    # Drafting seen 4x slower inside the loop than alone: the live curve says so, and γ drops.
    before = cost_model.best_gamma(policy.live_curve, 0.8, "speculative", 10)
    for _ in range(40):
        policy.observe(width=3, target_s=1e-3, drafted=2, draft_s=2 * 0.4e-3)
    assert policy.target_scale.value == pytest.approx(1.0)
    assert policy.draft_scale.value == pytest.approx(4.0)
    assert policy.live_curve.draft == pytest.approx(0.4e-3)
    assert cost_model.best_gamma(policy.live_curve, 0.8, "speculative", 10) < before
    for _ in range(8):
        policy.update(accepted=8, proposed=10)  # the re-pick uses the live curve
    assert policy.gamma == cost_model.best_gamma(policy.live_curve, policy.estimate.alpha,
                                                 "speculative", 10)  # fmt: skip


def test_a_rounds_model_drafts_feed_the_policy_apart_from_the_lookups():
    """end_round counts every verified draft in the statistics but gives the policy the model's
    own (the lookup's are near-free and nearly always right: counted in, α read 0.9 here where
    the model's drafts were accepted half the time)."""
    from pearlmoe.decode.common import DecodeStats, end_round

    stats, policy = DecodeStats(), cost_model.GammaPolicy(_curve([1.0] * 9, 0.1), "pearl")
    for _ in range(40):  # a round: 8 lookup drafts accepted, 2 model drafts of which 1 accepted
        end_round(stats, policy, [[1]], proposed=10, accepted=9, callback=None,
                  model_drafts=(2, 1))  # fmt: skip
    assert stats.accepted / stats.proposed == pytest.approx(0.9)
    assert policy.estimate.alpha == pytest.approx(0.5, abs=0.03)


def _drive(gate: cost_model.SpeculationGate, seconds: dict[str, float], units: int) -> list[str]:
    """Feed a gate units whose arms commit 1 token in seconds[arm] (a phase's first unit 10x
    slower: a switch's cost); returns the arm of each unit."""
    arms = []
    for _ in range(units):
        arm = gate.arm
        arms.append(arm)
        first = gate.warming
        gate.record(1, seconds[arm] * (10 if first else 1))
    return arms


def test_the_gate_keeps_speculating_where_it_pays():
    """Rounds twice as fast as plain steps: speculation leads throughout; the plain arm is only
    probed, for ``probe`` units between leader phases that double up to ``longest``; a phase's
    first unit (10x slower here) does not count in the rates."""
    S, P = cost_model.SpeculationGate.SPEC, cost_model.SpeculationGate.PLAIN
    gate = cost_model.SpeculationGate(probe=3, first=4, longest=16)
    arms = _drive(gate, {S: 1.0, P: 2.0}, 4 + 3 + 8 + 3 + 16 + 3 + 16)
    runs = [(arm, len(list(group))) for arm, group in itertools.groupby(arms)]
    assert runs == [(S, 4), (P, 3), (S, 8), (P, 3), (S, 16), (P, 3), (S, 16)]
    assert gate.rate(S) == pytest.approx(1.0) and gate.rate(P) == pytest.approx(0.5)
    assert gate.summary()["units"] == {S: 44, P: 9} and gate.summary()["leader"] == S


def test_the_gate_steps_plainly_where_speculation_loses():
    """Plain steps 1.5x as fast: after the first probe plain steps lead, speculation is probed;
    a small edge (< margin) does not move the leader; a disabled gate always speculates."""
    S, P = cost_model.SpeculationGate.SPEC, cost_model.SpeculationGate.PLAIN
    gate = cost_model.SpeculationGate(probe=2, first=4, longest=8)
    arms = _drive(gate, {S: 1.5, P: 1.0}, 4 + 2 + 4 + 2 + 7)
    runs = [(arm, len(list(group))) for arm, group in itertools.groupby(arms)]
    assert runs == [(S, 4), (P, 2 + 4), (S, 2), (P, 7)]
    assert gate.plain and gate.best == P
    close = cost_model.SpeculationGate(probe=2, first=4, margin=1.05)
    _drive(close, {S: 1.03, P: 1.0}, 40)  # plain 3% faster: within the margin
    assert close.best == S
    off = cost_model.SpeculationGate(enabled=False)
    assert set(_drive(off, {S: 9.0, P: 1.0}, 50)) == {S} and not off.plain


def test_the_gate_starts_from_what_the_last_decode_measured():
    S, P = cost_model.SpeculationGate.SPEC, cost_model.SpeculationGate.PLAIN
    memory: dict = {}
    gate = cost_model.SpeculationGate(probe=2, first=4, memory=(memory, "pair"))
    _drive(gate, {S: 2.0, P: 1.0}, 10)
    gate.remember()
    again = cost_model.SpeculationGate(probe=2, first=4, memory=(memory, "pair"))
    assert again.plain and again.rate(S) == pytest.approx(0.5)
    assert not cost_model.SpeculationGate(enabled=False, memory=(memory, "pair")).plain
    assert cost_model.SpeculationGate(memory=(memory, "other")).arm == S


def test_the_gate_is_on_by_default_for_pearls_batches_only(pair32):
    from pearlmoe.decode.common import speculation_gate

    target, draft = pair32
    assert not speculation_gate(target, draft, 1, "pearl", "fused", None).enabled
    assert speculation_gate(target, draft, 4, "pearl", "fused", None).enabled
    assert not speculation_gate(target, draft, 4, "speculative", "fused", None).enabled
    assert speculation_gate(target, draft, 1, "pearl", "fused", True).enabled
    assert not speculation_gate(target, draft, 4, "speculative", "fused", False).enabled
    mine = cost_model.SpeculationGate(probe=1)
    assert speculation_gate(target, draft, 4, "pearl", "fused", mine) is mine


def test_policy_starts_from_what_the_last_decode_learned(pair32):
    target, draft = pair32
    from pearlmoe.decode import common

    common._learned.pop(target, None)  # what earlier tests' decodes of this pair left
    gamma_policy = common.gamma_policy
    first = gamma_policy(target, draft, 1, "pearl", "eager", None)
    assert first.estimate.alpha == pytest.approx(0.6)
    for _ in range(30):
        first.update(accepted=9, proposed=10)
        first.observe(width=2, target_s=first.curve.target_time(2) * 1.5, drafted=2,
                      draft_s=2 * first.curve.draft * 2.0)  # fmt: skip
    first.remember()
    second = gamma_policy(target, draft, 1, "pearl", "eager", None)
    assert second.estimate.alpha == pytest.approx(first.estimate.alpha)
    assert second.learned() == pytest.approx(first.learned())
    assert second.gamma == cost_model.best_gamma(second.live_curve, second.estimate.alpha, "pearl")
    other_mode = gamma_policy(target, draft, 1, "speculative", "eager", None)
    assert other_mode.estimate.alpha == pytest.approx(0.6)  # learned per mode


def test_measured_curve_has_every_width(pair32):
    target, draft = pair32
    curve = cost_model.measure(target, draft, batch=1, max_width=4)
    assert len(curve.target) == 4 and all(t > 0 for t in curve.target) and curve.draft > 0
    assert curve.target_time(6) > 0


def test_interleaved_curves_are_what_measure_then_returns(pair32, monkeypatch):
    """Each thread count's curve is its fastest over alternating rounds (the rounds run one
    count, then the other), and measure() at that count returns it instead of measuring anew."""
    target, draft = pair32
    order = []
    real = cost_model.step_seconds
    # per call, a scale: round 1 threads 1 (target, draft), threads 2 (target, draft); round 2
    passes = iter([0.5, 0.2, 0.3, 0.1, 0.4, 0.25, 0.35, 0.05])

    def fake(model, widths, batch, backend, context):
        order.append((torch.get_num_threads(), model is target))
        assert context == 40  # both sides timed after the context asked for
        scale = next(passes)
        return [scale * w for w in widths] if model is target else [scale]

    monkeypatch.setattr(cost_model, "step_seconds", fake)
    monkeypatch.setattr(cost_model, "_curves", {})  # the fake curves stay in this test
    before = torch.get_num_threads()
    curves = cost_model.measure_interleaved(target, draft, [1, 2], backend="fused", rounds=2,
                                            max_width=3, context=40)  # fmt: skip
    assert torch.get_num_threads() == before
    assert [t for t, _ in order] == [1, 1, 2, 2, 1, 1, 2, 2]  # alternating rounds
    assert curves[1].target == pytest.approx([0.4, 0.8, 1.2]) and curves[1].draft == 0.2
    assert curves[2].target == pytest.approx([0.3, 0.6, 0.9]) and curves[2].draft == 0.05
    monkeypatch.setattr(cost_model, "step_seconds", real)
    for threads in (1, 2):
        with num_threads(threads):
            measured = cost_model.measure(target, draft, 1, "fused", max_width=3)
        assert measured is curves[threads] and measured.extra["threads"] == threads


# ---- CUDA (run by bench/device_check.sh on a lent GPU; skipped elsewhere) ------------------------


@pytest.fixture(scope="module")
def cuda_pair():
    target, draft = _pair(torch.float32)
    return target.to("cuda", torch.bfloat16), draft.to("cuda", torch.bfloat16)


@requires_cuda
@pytest.mark.cuda
def test_cuda_step_needs_no_host_sync(cuda_pair):
    target, _ = cuda_pair
    runner = Runner(target, 2, 32)
    runner.prefill([[1, 2, 3], [4, 5]])
    ids = torch.zeros(2, 4, dtype=torch.long, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any sync inside the step raises
    try:
        for width in (1, 4):
            runner(ids[:, :width])
            runner.lens.add_(width)
    finally:
        torch.cuda.set_sync_debug_mode(0)


@requires_cuda
@pytest.mark.cuda
def test_cuda_graph_backend_emits_the_eager_tokens(cuda_pair):
    # Graph replay runs the very kernels of the eager step: the same tokens, loop by loop. (On
    # CUDA cuBLAS may pick another kernel for another row count, so a window's logits are not
    # bitwise a step's as on the CPU: speculative == AR is checked by pearlmoe bench instead.)
    target, draft = cuda_pair
    want = pearlmoe.generate(target, PROMPTS4, 20)
    assert pearlmoe.generate(target, PROMPTS4, 20, backend="cudagraph") == want
    for loop in (speculative_generate, pearl_generate):
        eager, _ = loop(target, draft, PROMPTS4, 20, gamma=3)
        graph, _ = loop(target, draft, PROMPTS4, 20, gamma=3, backend="cudagraph")
        assert graph == eager, loop.__name__


@requires_cuda
@pytest.mark.cuda
def test_cuda_graph_replays_with_moving_lengths(cuda_pair):
    target, _ = cuda_pair
    graph = Runner(target, 1, 64, "cudagraph")
    eager = Runner(target, 1, 64)
    for runner in (graph, eager):
        runner.prefill([[1, 2, 3, 4, 5]])
    for token in (6, 7, 8, 9):
        ids = torch.tensor([[token]], device="cuda")
        got, want = graph(ids)[1].clone(), eager(ids)[1]
        assert torch.equal(got, want)
        graph.lens.add_(1)
        eager.lens.add_(1)


def test_pearl_bookkeeping_choices(pair32):
    target, draft = pair32
    with pytest.raises(ValueError, match="host bookkeeping is greedy only"):
        pearl_generate(target, draft, [[1, 2]], 4, gamma=2, temperature=1.0, bookkeeping="host")
    with pytest.raises(ValueError, match="bookkeeping must be auto, host or device"):
        pearl_generate(target, draft, [[1, 2]], 4, gamma=2, bookkeeping="gpu")
    with pytest.raises(ValueError, match="bookkeeping must be auto, device, or host when"):
        speculative_generate(target, draft, [[1, 2]], 4, gamma=2, temperature=1.0,
                             bookkeeping="host")  # fmt: skip
    _, stats = pearl_generate(target, draft, [[1, 2]], 4, gamma=2, temperature=1.0)
    assert stats.extra["bookkeeping"] == "device"  # sampling keeps its state on the device
    _, stats = pearl_generate(target, draft, [[1, 2]], 4, gamma=2)
    assert stats.extra["bookkeeping"] == "host"  # greedy on a CPU


def test_a_rounds_host_work_enters_the_rates_and_the_choice():
    """h seconds of host work a round (the loop's Python, hand-offs): every speculative and PEARL
    round pays it, so rates drop and longer windows (fewer rounds a token) win; the policy
    learns h from the rounds and hands it to the next decode."""
    curve = RISING
    heavy = curve.scaled(1.0, 1.0, 1.5e-3)
    assert heavy.host == 1.5e-3 and curve.host == 0.0
    for mode in ("speculative", "pearl"):
        for g in (1, 3):
            assert cost_model.rate(heavy, 0.8, mode, g) < cost_model.rate(curve, 0.8, mode, g)
        assert cost_model.best_gamma(heavy, 0.8, mode) > cost_model.best_gamma(curve, 0.8, mode)
    # speculative: E tokens over γ·t_d + T(γ+1) + h
    expected = (1 - 0.8**3) / (1 - 0.8) / (2 * 0.1e-3 + 1.7e-3 + 1.5e-3)
    assert cost_model.rate(heavy, 0.8, "speculative", 2) == pytest.approx(expected)
    policy = cost_model.GammaPolicy(curve, "pearl")
    for _ in range(40):
        policy.observe_host(0.5e-3)
    policy.observe_host(-1.0)  # clock noise is not negative work
    assert policy.live_curve.host == pytest.approx(0.5e-3, rel=0.1)
    assert policy.learned()[3] == policy.host.value
