"""The serving engine without HTTP: requests joining and leaving a running batch emit exactly
what greedy autoregressive decoding gives each alone, in every mode; sampled requests follow
the target distribution; cancellation, queueing and slot reuse."""

import copy

import pytest
import torch

import pearlmoe
from conftest import tiny_pair
from pearlmoe.decode.cost_model import SpeculationGate
from pearlmoe.serve import Engine, Request
from pearlmoe.serve import engine as serve_engine

MODES = ["ar", "speculative", "pearl"]
PROMPTS = [[1], [2, 3], [4, 5, 6, 7, 8, 9, 10], [11] * 17, [12, 13, 14, 15, 16], [17, 18, 19]]
BUDGETS = [20, 9, 33, 1, 15, 26]


@pytest.fixture(scope="module")
def pair():
    return tiny_pair()


@pytest.fixture(scope="module")
def pair_fp32(pair):  # the fused C++ steps take fp32 and bf16 models
    return tuple(copy.deepcopy(m).to(torch.float32) for m in pair)


def _run(engine: Engine, requests: list[Request], joins: list[int]) -> None:
    """Submit requests[i] after joins[i] engine steps, then run until all are done."""
    steps = 0
    pending = sorted(zip(joins, range(len(requests)), strict=True))
    while pending or engine.slots or engine.queue:
        while pending and pending[0][0] <= steps:
            engine.submit(requests[pending.pop(0)[1]])
        engine.step()
        steps += 1
        assert steps < 1000


@pytest.mark.parametrize(("mode", "gamma"), [("ar", None)] + [
    (mode, gamma) for mode in ("speculative", "pearl") for gamma in (1, 3, 5)
])  # fmt: skip
@pytest.mark.parametrize("max_batch", [1, 3, 8])
def test_greedy_requests_joining_mid_flight_equal_autoregressive(pair, mode, gamma, max_batch):
    target, draft = pair
    want = [pearlmoe.generate(target, [p], n)[0] for p, n in zip(PROMPTS, BUDGETS, strict=True)]
    engine = Engine(target, draft, mode, max_batch=max_batch, context=64, gamma=gamma)
    requests = [Request(p, n) for p, n in zip(PROMPTS, BUDGETS, strict=True)]
    _run(engine, requests, joins=[0, 0, 2, 3, 3, 7])
    assert [r.output for r in requests] == want
    assert all(r.finish_reason == "length" for r in requests)
    m = engine.metrics
    assert m.generated_tokens == sum(BUDGETS) and m.finished["length"] == len(PROMPTS)
    assert engine.slots == [] and m.batch_sum <= m.rounds * max_batch
    if mode != "ar":
        assert 0 < m.accepted < m.proposed  # the draft is wrong sometimes, right sometimes
        assert m.target_calls < m.rounds + 1


@pytest.mark.parametrize("max_batch", [1, 3])
def test_a_lone_greedy_request_runs_the_fused_cpu_rounds(pair_fp32, monkeypatch, max_batch):
    """On fused CPU steps a lone greedy speculative request runs `pearlmoe generate`'s C++
    rounds (the lookup, the draft, verification and commit in one call); while another request
    runs or waits the batched rounds go on. Every output equals autoregressive decoding: alone
    (a one-token prompt included), joining mid-flight, and ending at an EOS token."""
    target, draft = pair_fp32
    ran = []
    fused = Engine._fused_rounds
    monkeypatch.setattr(Engine, "_fused_rounds", lambda self: ran.append(fused(self)) or ran[-1])
    want = [pearlmoe.generate(target, [p], n)[0] for p, n in zip(PROMPTS, BUDGETS, strict=True)]
    engine = Engine(target, draft, "speculative", max_batch=max_batch, context=64, backend="fused")
    for p, n, w in zip(PROMPTS, BUDGETS, want, strict=True):  # one at a time
        request = Request(p, n)
        _run(engine, [request], joins=[0])
        assert request.output == w and request.finish_reason == "length"
    assert all(ran) and len(ran) >= len(PROMPTS)
    ran.clear()
    requests = [Request(p, n) for p, n in zip(PROMPTS, BUDGETS, strict=True)]
    _run(engine, requests, joins=[0, 0, 2, 3, 3, 7])
    assert [r.output for r in requests] == want
    # Both kinds of round ran; with one slot the waiting requests cannot join, so a running one
    # keeps its C++ rounds.
    assert True in ran and (False in ran) == (max_batch > 1)
    stop = want[2][5]  # an EOS token inside a C++ call's rounds
    request = Request(PROMPTS[2], BUDGETS[2], eos=frozenset({stop}))
    _run(engine, [request], joins=[0])
    assert request.output == want[2][: want[2].index(stop) + 1]
    assert request.finish_reason == "stop" and engine.slots == []
    m = engine.metrics
    assert 0 < m.accepted <= m.proposed and m.batch_sum <= m.rounds * max_batch


def test_the_lone_requests_rounds_hand_over_to_the_batched_ones(pair_fp32, monkeypatch):
    """The target as its own draft: every draft the model proposes is accepted, on both kinds of
    round, only if each leaves the draft's cache where the other expects it (a wrong feed or
    length after a C++ call would draft from the wrong context). A request runs alone (C++
    rounds), a second joins (batched rounds), the first leaves (C++ rounds again)."""
    target, _ = pair_fp32
    ran = []
    fused = Engine._fused_rounds
    monkeypatch.setattr(Engine, "_fused_rounds", lambda self: ran.append(fused(self)) or ran[-1])
    engine = Engine(target, target, "speculative", max_batch=2, context=64, gamma=2,
                    backend="fused")  # fmt: skip
    engine.lookup = 0  # the lookup's drafts may be wrong; the model's are not
    requests = [Request(PROMPTS[2], 33), Request(PROMPTS[4], 9)]
    _run(engine, requests, joins=[0, 3])
    want = [pearlmoe.generate(target, [r.prompt], r.max_tokens)[0] for r in requests]
    assert [r.output for r in requests] == want
    assert ran[:3] == [True] * 3 and False in ran and ran[-1]  # alone, together, alone
    m = engine.metrics
    assert 0 < m.accepted == m.proposed


def _alternate(engine: Engine) -> None:
    """Every batch size's speculation gate on a fixed schedule, whatever the rates: 2 rounds,
    3 plain steps, 4 rounds, 3 plain steps, 4 rounds... (one sequence too)."""
    for rows in (1, 2, 4, 8, 16):
        engine._gates[rows] = SpeculationGate(probe=3, first=2, longest=4, margin=float("inf"))


@pytest.mark.parametrize("mode", ["speculative", "pearl"])
@pytest.mark.parametrize("max_batch", [1, 3])
def test_the_gates_plain_steps_keep_requests_autoregressive(pair, mode, max_batch):
    """Rounds and plain steps of the target alone in turns, requests joining and leaving
    (EOS, budgets) meanwhile: the draft catches up on what it missed (PEARL's unverified
    drafts dropped) and every request gets its autoregressive tokens."""
    target, draft = pair
    eos = pearlmoe.generate(target, [PROMPTS[2]], 30)[0][5]
    want = [pearlmoe.generate(target, [p], n, eos_token_id=eos)[0]
            for p, n in zip(PROMPTS, BUDGETS, strict=True)]  # fmt: skip
    engine = Engine(target, draft, mode, max_batch=max_batch, context=64, gamma=3)
    _alternate(engine)
    requests = [Request(p, n, eos=frozenset([eos])) for p, n in zip(PROMPTS, BUDGETS, strict=True)]
    _run(engine, requests, joins=[0, 0, 2, 3, 3, 7])
    assert [r.output for r in requests] == want
    assert 0 < engine.metrics.plain_rounds < engine.metrics.rounds


def test_the_gate_is_off_by_default_and_for_one_sequence(pair):
    target, draft = pair
    engine = Engine(target, draft, "pearl", max_batch=4, context=64, gamma=2, gate=True)
    _run(engine, [Request([1, 2], 6)], joins=[0])
    assert not engine._gates[1].enabled and engine._gates[1].units["plain"] == 0
    _run(engine, [Request([1, 2], 6), Request([3], 6)], joins=[0, 0])
    assert engine._gates[2].enabled
    off = Engine(target, draft, "speculative", max_batch=4, context=64, gamma=2)
    _run(off, [Request([1, 2], 6), Request([3], 6)], joins=[0, 0])
    assert not off._gates[2].enabled and off.metrics.plain_rounds == 0


@pytest.mark.parametrize("mode", MODES)
def test_eos_ends_a_request_and_its_slot_is_reused(pair, mode):
    target, draft = pair
    full = pearlmoe.generate(target, [PROMPTS[2]], 30)[0]
    eos = full[5]
    want = pearlmoe.generate(target, PROMPTS, 30, eos_token_id=eos)
    engine = Engine(target, draft, mode, max_batch=2, context=64, gamma=3)
    requests = [Request(p, 30, eos=frozenset([eos])) for p in PROMPTS]
    _run(engine, requests, joins=[0] * len(PROMPTS))
    assert [r.output for r in requests] == want
    assert requests[2].finish_reason == "stop" and requests[2].output[-1] == eos


@pytest.mark.parametrize("mode", MODES)
def test_cancel_frees_the_slot_and_others_go_on(pair, mode):
    target, draft = pair
    engine = Engine(target, draft, mode, max_batch=2, context=64, gamma=2)
    seen: list[tuple[list[int], str | None]] = []
    first = Request(PROMPTS[0], 40, on_tokens=lambda t, r: seen.append((t, r)))
    others = [Request(p, 12) for p in PROMPTS[1:4]]
    engine.submit(first)
    for r in others:
        engine.submit(r)
    for _ in range(3):
        engine.step()
    assert len(engine.slots) == 2 and len(engine.queue) == 2  # full: the rest wait
    engine.cancel(first)
    engine.step()
    assert first.finish_reason == "cancelled" and seen[-1] == ([], "cancelled")
    assert all(s.req is not first for s in engine.slots)
    while engine.slots or engine.queue:
        engine.step()
    want = [pearlmoe.generate(target, [r.prompt], 12)[0] for r in others]
    assert [r.output for r in others] == want
    assert engine.metrics.finished["cancelled"] == 1


def test_bad_requests_are_refused(pair):
    target, draft = pair
    engine = Engine(target, draft, "speculative", max_batch=2, context=16, gamma=2)
    for req, match in [
        (Request([], 4), "no tokens"),
        (Request([1, 2], 0), "max_tokens"),
        (Request([1] * 10, 7), "longer than the context"),
        (Request([1, 64], 2), r"\[0, 64\)"),
    ]:
        with pytest.raises(ValueError, match=match):
            engine.submit(req)
    with pytest.raises(ValueError, match="needs a draft"):
        Engine(target, None, "pearl")
    with pytest.raises(ValueError, match="mode"):
        Engine(target, draft, "beam")


@pytest.mark.parametrize("scheduled", [False, True])
@pytest.mark.parametrize("mode", ["speculative", "pearl"])
def test_sampled_requests_follow_the_target_distribution(mode, scheduled):
    """2 sampled tokens for 3000 requests at temperature 1, each with its own seed, 16 at a
    time: both positions' marginals match the exact target distribution. The speculation gate
    yields to sampled requests (a plain step would draw their tokens another way), so even a
    gate scheduled to take plain steps runs rounds and the same seed gives the same text."""
    target, draft = tiny_pair(vocab=16, noise=0.6, seed=1)
    prompt, n = [1, 2, 3, 4, 5, 6], 3000
    with torch.no_grad():
        p1 = torch.softmax(target(torch.tensor([prompt]))[0, -1], -1)  # [V]
        nxt = torch.tensor([[*prompt, x] for x in range(16)])
        p2 = p1 @ torch.softmax(target(nxt)[:, -1], -1)  # marginal of the second token
        q1 = torch.softmax(draft(torch.tensor([prompt]))[0, -1], -1)
    assert (q1 - p1).abs().sum() > 0.2
    engine = Engine(target, draft, mode, max_batch=16, context=16, gamma=2)
    if scheduled:
        _alternate(engine)
    requests = [Request(prompt, 2, temperature=1.0, seed=i) for i in range(n)]
    _run(engine, requests, joins=[0] * n)
    tokens = torch.tensor([r.output for r in requests])  # [n, 2]
    for i, want in enumerate((p1, p2)):
        freq = torch.bincount(tokens[:, i], minlength=16).double() / n
        assert (freq - want).abs().sum() < 0.08, (i, freq, want)
    assert engine.metrics.plain_rounds == 0
    # The same seed gives the same tokens whatever else shares the batch.
    again = Request(prompt, 2, temperature=1.0, seed=5)
    _run(engine, [again, Request(prompt, 2, temperature=1.0, seed=99)], joins=[0, 0])
    assert again.output == requests[5].output


@pytest.mark.parametrize("mode", ["ar", "speculative", "pearl"])
def test_sampling_runs_on_the_calling_thread_alone_and_gives_its_thread_count_back(mode):
    """The rows' sampling runs with the caller's OpenMP count at 1 (an idle ATen team would
    spin beside the next fused step's pool: PEARL's sampled requests ran 1.39x faster without
    it, bench/NOTES.md v20), and the caller's count is back after every step."""
    from pearlmoe.decode.common import num_threads

    target, draft = tiny_pair(vocab=16, noise=0.6, seed=1)
    engine = Engine(target, draft if mode != "ar" else None, mode, max_batch=2, context=32,
                    gamma=2)  # fmt: skip
    seen: list[int] = []  # the thread count each row's distribution was computed with
    real = serve_engine.logits_to_probs

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    requests = [Request([1, 2, 3], 6, temperature=1.0, seed=i) for i in range(2)]
    with num_threads(2), pytest.MonkeyPatch.context() as patch:
        patch.setattr(serve_engine, "logits_to_probs", spy)
        _run(engine, requests, joins=[0, 0])
        assert torch.get_num_threads() == 2
    assert seen and set(seen) == {1}  # inside: one thread
    assert all(len(r.output) == 6 for r in requests)


@pytest.mark.parametrize("mode", ["speculative", "pearl"])
def test_a_full_bf16_batch_equals_each_request_alone(mode):
    """The embedded pair in bf16, 16 held-out prompts in 16 slots at once: verification steps
    of up to 64 rows (more than BLAS would have been left to before the kernels kept every row
    on its own path) still give each request exactly its greedy autoregressive tokens. Found by
    bench/bench_serve.py: one of 64 PEARL responses differed at its 38th token."""
    from pearlmoe.cli import DRAFT, TARGET, held_out_prompts, load_tokenizer
    from pearlmoe.model import from_pretrained

    target = from_pretrained(TARGET, dtype=torch.bfloat16)
    draft = from_pretrained(DRAFT, dtype=torch.bfloat16)
    prompts = held_out_prompts(load_tokenizer(TARGET), 8, 48)
    budgets = [64, 128, 32, 96, 64, 128, 48, 80]
    eos = target.config.eos_token_id
    want = [pearlmoe.generate(target, [p], n, eos_token_id=eos)[0]
            for p, n in zip(prompts, budgets, strict=True)]  # fmt: skip
    engine = Engine(target, draft, mode, max_batch=16, context=256, gamma=3)
    requests = [Request(prompts[k % 8], budgets[k % 8], eos=frozenset([eos])) for k in range(16)]
    _run(engine, requests, joins=[0] * 16)
    assert [r.output for r in requests] == [want[k % 8] for k in range(16)]


def test_an_engine_failure_ends_every_request_and_refuses_new_ones(pair):
    """A round that raises (out of memory, a bug): the requests running and queued end as
    cancelled instead of waiting forever, later submits are refused, the error is kept."""
    import threading

    target, draft = pair
    engine = Engine(target, draft, "ar", max_batch=1, context=64)
    ended = threading.Event()
    reasons: list[str | None] = []

    def boom() -> None:
        raise MemoryError("no memory left")

    engine._ar_round = boom
    requests = [Request(p, 8, on_tokens=lambda t, r: (reasons.append(r), r and len(reasons) == 3
                                                       and ended.set())) for p in PROMPTS[:3]]  # fmt: skip
    for r in requests:
        engine.submit(r)
    engine.start()
    assert ended.wait(30)
    engine._thread.join(30)
    assert [r.finish_reason for r in requests] == ["cancelled"] * 3
    assert isinstance(engine.error, MemoryError)
    with pytest.raises(RuntimeError, match="engine stopped: no memory left"):
        engine.submit(Request([1, 2], 4))
