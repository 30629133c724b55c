"""Prompt lookup in greedy drafting (csrc/cpu/lookup.h): drafts follow an earlier occurrence of
the context's last n tokens where there is one and the draft model elsewhere, the rounds keep
each sequence's tokens for it, decoding stays lossless, and bad histories are refused."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_static_decode import _pair

from pearlmoe.decode import generate, pearl_generate, speculative_generate
from pearlmoe.decode.common import token_history
from pearlmoe.decode.cost_model import SpeculationGate
from pearlmoe.decode.runner import Runner


def lookup_next(ctx: list[int], n: int) -> int | None:
    """The reference: the token after the latest earlier occurrence of ctx's last n tokens."""
    for s in range(len(ctx) - n - 1, -1, -1):
        if ctx[s : s + n] == ctx[-n:]:
            return ctx[s + n]
    return None


MIXED = [[3, 4, 5, 6, 3, 4, 5], [9, 10, 11, 12, 13, 14], [7, 8, 7, 8, 7], [2]]
REPEATS = [[3, 4, 5, 6, 3, 4, 5, 6, 3], [7, 8, 7, 8, 7, 8, 7]]  # every step found: K/V-only steps


@pytest.mark.parametrize("extend", [0, 3])
@pytest.mark.parametrize("contexts", [MIXED, REPEATS], ids=["mixed", "repeats"])
@pytest.mark.parametrize("ngram", [1, 2, 3])
def test_drafts_take_the_lookup_where_it_matches_and_the_model_elsewhere(ngram, contexts, extend):
    """Contexts ending in a repeat (the lookup decides), in nothing seen before (the model
    decides) and in a pattern the drafts themselves continue; where every sequence's next token
    is found the step only writes the cache, which must hold what full steps write; after the
    5 tokens asked for, up to `extend` more while every sequence's next token is found."""
    _, draft = _pair(torch.float32)
    batch = len(contexts)
    fused, eager = Runner(draft, batch, 64, "fused"), Runner(draft, batch, 64, "eager")
    for r in (fused, eager):
        r.prefill([c[:-1] for c in contexts])
    history, lens = token_history(contexts, 24)
    feed = torch.tensor([[c[-1]] for c in contexts])  # [B, 1]
    got = fused.fused_step.draft_history(feed, fused.cache.k, fused.cache.v, fused.lens, 5,
                                         history, lens, ngram, extend)  # fmt: skip
    want, ctx, ids, from_lookup = [], [list(c) for c in contexts], feed, 0
    for i in range(5 + extend):  # the reference: eager greedy steps, overridden by lookup_next
        if i >= 5 and any(lookup_next(c, ngram) is None for c in ctx):
            break
        _, tokens = eager(ids)
        with torch.inference_mode():
            eager.lens.add_(1)
        step = []
        for b, model_token in enumerate(tokens[:, -1].tolist()):
            found = lookup_next(ctx[b], ngram)
            from_lookup += found is not None and found != model_token
            step.append(model_token if found is None else found)
            ctx[b].append(step[-1])
        want.append(step)
        ids = torch.tensor(step).unsqueeze(1)
    assert got.tolist() == torch.tensor(want).T.tolist()
    assert from_lookup > 0  # the lookup changed some drafts, so this checks it
    assert torch.equal(fused.cache.k, eager.cache.k) and torch.equal(fused.cache.v, eager.cache.v)
    assert history.tolist() == token_history(contexts, 24)[0].tolist()  # read, not written
    assert fused.lens.tolist() == [len(c) - 1 + len(want) for c in contexts]  # as draft() does
    if contexts is REPEATS:  # every step found: all the extension is drafted
        assert len(want) == 5 + extend


def test_lookup_raises_acceptance_on_the_embedded_pairs_loops():
    """The embedded pair's greedy continuations of held-out prompts repeat themselves; drafts
    that look up the context are accepted more often, and every output stays AR's."""
    from pearlmoe.cli import DRAFT, TARGET, load_tokenizer
    from pearlmoe.model import from_pretrained
    from pearlmoe.train.data import held_out_prompts

    target, draft = (from_pretrained(d, dtype=torch.bfloat16) for d in (TARGET, DRAFT))
    prompts = held_out_prompts(load_tokenizer(TARGET), 3, 48)
    ref = generate(target, prompts, 64, backend="fused")
    for loop in (speculative_generate, pearl_generate):
        rates, yields = {}, {}
        for n in (0, 3):
            # gate=False: every round speculates (plain steps would draft nothing)
            outs, stats = loop(target, draft, prompts, 64, gamma=3, backend="fused", lookup=n,
                               gate=False)  # fmt: skip
            assert outs == ref, (loop.__name__, n)
            assert stats.extra["lookup"] == n
            rates[n] = stats.accepted / stats.proposed
            yields[n] = stats.emitted / stats.target_calls  # tokens per target call
            # loops drafted past γ = 3 where the lookup runs
            assert (stats.draft_calls > 3 * stats.target_calls) == (n > 0), stats
            # The draft model's own tokens the target tested (a window's up to its first
            # rejection: per-token acceptance, the cost model's alpha) and accepted.
            tested, kept = stats.extra["model_drafts"]
            if n == 0:
                assert kept == stats.accepted < tested < stats.proposed
            else:  # some drafts were the lookup's, accepted more often than the model's
                assert 0 < tested < stats.proposed and kept < stats.accepted
            if loop is speculative_generate:  # the C++ rounds' sides, timed apart
                draft_s, target_s = stats.extra["side_seconds"]
                assert draft_s > 0 and target_s > 0 and draft_s + target_s < stats.seconds
        # The shipped draft, distilled on the target's own continuations, copies many loops
        # itself (acceptance without the lookup 0.57, with it 0.61 / 0.70); the lookup's drafts
        # still raise both the acceptance and the tokens a target call commits (+16% / +24%).
        assert rates[3] > rates[0], (loop.__name__, rates)
        assert yields[3] > 1.1 * yields[0], (loop.__name__, yields)


@pytest.mark.parametrize("loop", [speculative_generate, pearl_generate])
def test_lossless_with_lookup_at_batch_4_with_eos_mid_window(loop):
    target, draft = _pair(torch.float32)
    prompts = [[5, 6, 7, 5, 6, 7, 5, 6], [9, 10], [3, 3, 3, 3], [1, 2, 3, 4, 5, 1, 2, 3]]
    ref = generate(target, prompts, 24, backend="fused")
    eos = next(t for row in ref for t in row[3:])  # a token that stops a sequence mid-stream
    ref = generate(target, prompts, 24, backend="fused", eos_token_id=eos)
    for n in (1, 2, 4):
        outs, _ = loop(target, draft, prompts, 24, gamma=4, backend="fused", eos_token_id=eos,
                       lookup=n)  # fmt: skip
        assert outs == ref, n


def test_bad_lookups_and_histories_are_refused():
    target, draft = _pair(torch.float32)
    for loop in (speculative_generate, pearl_generate):
        with pytest.raises(ValueError, match=f"{loop.__name__}: lookup must be >= 0, got -1"):
            loop(target, draft, [[1, 2]], 4, backend="fused", lookup=-1)
    runner = Runner(draft, 2, 16, "fused")
    runner.prefill([[1], [2]])
    step, c, feed = runner.fused_step, runner.cache, torch.tensor([[3], [4]])
    history, lens = token_history([[1, 3], [2, 4]], 8)
    call = lambda h, hl, n=2, e=0: step.draft_history(feed, c.k, c.v, c.lens, 2, h, hl, n, e)  # noqa: E731
    with pytest.raises(RuntimeError, match="history must be contiguous int64 CPU"):
        call(history.int(), lens)
    with pytest.raises(RuntimeError, match="history must be contiguous int64 CPU"):
        call(history[:1], lens)
    with pytest.raises(RuntimeError, match=r"history_lens\[1\] = 9 must be in \[1, 8\]"):
        call(history, torch.tensor([2, 9]))
    with pytest.raises(RuntimeError, match=r"history_lens\[0\] = 0 must be in \[1, 8\]"):
        call(history, torch.tensor([0, 2]))
    with pytest.raises(RuntimeError, match="draft_history's ngram must be >= 0, got -1"):
        call(history, lens, -1)
    with pytest.raises(RuntimeError, match="draft's extend must be >= 0, got -2"):
        call(history, lens, 2, -2)
    assert runner.lens.tolist() == [1, 1]  # refused calls leave the cache as it was
    worker = torch.classes.pearlmoe.CpuDraftWorker(step, 1)
    t = Runner(target, 2, 16, "fused")
    with pytest.raises(RuntimeError, match=r"PearlRounds.*history_lens\[0\] = 5 must be in"):
        torch.classes.pearlmoe.CpuPearlRounds(
            t.fused_step, worker, t.cache.k, t.cache.v, t.lens, c.k, c.v, c.lens, [3, 4], [2, 2],
            history[:, :4].contiguous(), torch.tensor([5, 2]), 3, True, True,
        )  # fmt: skip


def test_batch_of_loops_where_sequences_finish_at_different_rounds():
    """The embedded pair at batch 4 (pearlmoe bench's batch run): sequences that finish keep
    drafting and scoring windows up to max_gamma long while the others go on, so the caches need
    room for that past the budget (a capacity error in speculative decoding before the fix);
    outputs stay AR's."""
    from pearlmoe.cli import DRAFT, TARGET, load_tokenizer
    from pearlmoe.model import from_pretrained
    from pearlmoe.train.data import held_out_prompts

    target, draft = (from_pretrained(d, dtype=torch.bfloat16) for d in (TARGET, DRAFT))
    prompts = held_out_prompts(load_tokenizer(TARGET), 4, 64)
    eos = target.config.eos_token_id
    ref = generate(target, prompts, 128, backend="fused", eos_token_id=eos)
    for loop in (speculative_generate, pearl_generate):
        outs, stats = loop(target, draft, prompts, 128, gamma=3, backend="fused", eos_token_id=eos,
                           gate=False)  # fmt: skip
        assert outs == ref, loop.__name__
        assert stats.draft_calls > 3 * stats.target_calls, loop.__name__  # drafts ran past γ


@pytest.mark.parametrize("lookahead", [False, True])
def test_pearl_rounds_lookahead_scores_the_lookups_drafts_in_the_same_round(lookahead):
    """With the lookahead a round's target window also scores the drafts the lookup already
    knows the draft will draft: a pre-verify round then commits a run of them (and the target's
    next token) instead of only its first draft. The rounds' model counts leave the lookup's
    drafts out. The embedded pair's greedy continuations loop, so the lookup finds runs; the
    committed tokens are AR's either way."""
    from pearlmoe.cli import DRAFT, TARGET, load_tokenizer
    from pearlmoe.decode.common import num_threads
    from pearlmoe.model import from_pretrained
    from pearlmoe.train.data import held_out_prompts

    target, draft = (from_pretrained(d, dtype=torch.bfloat16) for d in (TARGET, DRAFT))
    prompt = held_out_prompts(load_tokenizer(TARGET), 1, 48)[0]
    want = generate(target, [prompt], 96, backend="fused")[0]
    tgt, drf = Runner(target, 1, 256, "fused"), Runner(draft, 1, 256, "fused")
    rows, emitted, model_tested, verified_all = [], [], 0, 0
    with num_threads(1):
        tgt.prefill([prompt[:-1]])
        drf.prefill([prompt[:-1]])
        worker = torch.classes.pearlmoe.CpuDraftWorker(drf.fused_step, 1)
        history, lens = token_history([prompt], len(prompt), 3)
        rounds = torch.classes.pearlmoe.CpuPearlRounds(
            tgt.fused_step, worker, tgt.cache.k, tgt.cache.v, tgt.lens, drf.cache.k, drf.cache.v,
            drf.lens, [prompt[-1]], [len(prompt)], history, lens, 3, False, lookahead,
        )  # fmt: skip
        while len(emitted) < 96:
            out, info, width, drafted = rounds.round(2, 6)
            was_post, verified, accepted, kept = out[0, :4].tolist()
            assert info.shape == (6,)
            assert info[0] > 0 and info[1] > 0 and info[2] >= 0  # draft, target, hand-off seconds
            steps, tested, model_accepted = map(int, info[3:].tolist())  # the model's drafts
            assert 1 <= verified <= width and accepted <= verified and kept <= verified
            assert model_accepted <= tested <= min(accepted + 1, verified)
            assert steps <= drafted
            rows.append((was_post, verified, kept, width))
            model_tested += tested
            verified_all += min(accepted + 1, verified)
            emitted += out[0, 4 : 4 + kept].tolist()
    assert emitted[:96] == want
    pre = [r for r in rows if not r[0]]
    if lookahead:
        assert rounds.ahead_tokens() > 0
        assert any(kept > 1 for _, _, kept, _ in pre)  # a pre-verify round committed a run
        assert model_tested < verified_all  # the lookup's drafts are not the model's
    else:
        assert rounds.ahead_tokens() == 0
        assert all(verified == kept == width == 1 for _, verified, kept, width in pre)


def test_pearl_rounds_lookahead_in_a_batch_fills_only_the_padding():
    """Alone, a pre-verify round's window grows by the lookup's run; in a batch the lookahead
    only fills the padding the longest window leaves (every row is scored at the batch's width):
    a first round, all pre-verify, keeps width 1."""
    from pearlmoe.decode.common import num_threads

    target, draft = _pair(torch.float32)
    prompt = [5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7]  # the lookup continues 8, 5, 6, ...
    widths = {}
    for batch in (1, 2):
        prompts = [prompt] * batch
        tgt, drf = Runner(target, batch, 64, "fused"), Runner(draft, batch, 64, "fused")
        with num_threads(1):
            tgt.prefill([p[:-1] for p in prompts])
            drf.prefill([p[:-1] for p in prompts])
            worker = torch.classes.pearlmoe.CpuDraftWorker(drf.fused_step, 1)
            history, lens = token_history(prompts, len(prompt), 3)
            rounds = torch.classes.pearlmoe.CpuPearlRounds(
                tgt.fused_step, worker, tgt.cache.k, tgt.cache.v, tgt.lens, drf.cache.k,
                drf.cache.v, drf.lens, [p[-1] for p in prompts], [len(p) for p in prompts],
                history, lens, 3, False, True,
            )  # fmt: skip
            _, _, widths[batch], _ = rounds.round(2, 4)
            assert rounds.ahead_tokens() == (5 if batch == 1 else 0)
    assert widths == {1: 6, 2: 1}


_PAIR32 = None


def _pair32():
    global _PAIR32
    if _PAIR32 is None:
        _PAIR32 = _pair(torch.float32)
    return _PAIR32


@settings(max_examples=40)
@given(
    prompts=st.lists(st.lists(st.integers(2, 7), min_size=1, max_size=14), min_size=1, max_size=3),
    gamma=st.integers(1, 4),
    ngram=st.integers(1, 3),
    lookahead=st.booleans(),
    helps=st.booleans(),
    eos=st.sampled_from([None, 3, 5]),
)
def test_pearl_lossless_whatever_the_lookup_finds(prompts, gamma, ngram, lookahead, helps, eos):
    """Fuzzed: prompts over a few tokens (so the lookup finds runs of every length, in some
    sequences and not others), any γ and n-gram, the lookahead and the draft's help on or off,
    EOS anywhere: PEARL's greedy tokens are AR's."""
    target, draft = _pair32()
    want = generate(target, prompts, 20, backend="fused", eos_token_id=eos)
    got, _ = pearl_generate(target, draft, prompts, 20, gamma=gamma, backend="fused",
                            eos_token_id=eos, lookup=ngram, lookahead=lookahead,
                            draft_helps=helps)  # fmt: skip
    assert got == want


class _Schedule(SpeculationGate):
    """A gate that follows a fixed list of (plain?, units) phases, then speculates: the loops
    must stay lossless whatever the order and lengths of the arms."""

    def __init__(self, phases: list[tuple[bool, int]]) -> None:
        super().__init__()
        self.phases = list(phases)
        self._next_phase()

    def _next_phase(self) -> None:
        plain, units = self.phases.pop(0) if self.phases else (False, 10**9)
        self.arm, self.left = (self.PLAIN if plain else self.SPEC), units


@settings(max_examples=40)
@given(
    prompts=st.lists(st.lists(st.integers(2, 7), min_size=1, max_size=14), min_size=1, max_size=3),
    phases=st.lists(st.tuples(st.booleans(), st.integers(1, 9)), max_size=8),
    pearl=st.booleans(),
    gamma=st.integers(1, 4),
    ngram=st.integers(0, 3),
    eos=st.sampled_from([None, 3, 5]),
)
def test_gated_loops_lossless_whatever_the_schedule(prompts, phases, pearl, gamma, ngram, eos):
    """Fuzzed: the speculation gate's rounds and plain steps in any order and lengths (plain
    from the first unit, one-unit phases, sequences finishing mid-phase), with the lookup and
    EOS anywhere: speculative and PEARL greedy tokens are AR's."""
    target, draft = _pair32()
    want = generate(target, prompts, 20, backend="fused", eos_token_id=eos)
    loop = pearl_generate if pearl else speculative_generate
    got, _ = loop(target, draft, prompts, 20, gamma=gamma, backend="fused", eos_token_id=eos,
                  lookup=ngram, gate=_Schedule(phases))  # fmt: skip
    assert got == want


@pytest.mark.parametrize("contexts", [MIXED, REPEATS], ids=["mixed", "repeats"])
def test_speculative_rounds_count_the_models_drafts_apart_from_the_lookups(contexts):
    """A C++ speculative round returns, beside its sides' seconds, the draft model's own
    counts: the steps that ran its head and, of the drafts the target tested (up to the first
    rejected), those the model drafted and those it got accepted; the lookup's drafts are left
    out (with lookup 0 every draft is the model's). The γ policy gets these counts."""
    target, draft = _pair32()
    batch = len(contexts)
    for ngram in (0, 3):
        tgt, drf = Runner(target, batch, 64, "fused"), Runner(draft, batch, 64, "fused")
        tgt.prefill([c[:-1] for c in contexts])
        drf.prefill([c[:-1] for c in contexts])
        last = torch.tensor([c[-1] for c in contexts])
        prev, active = last.clone(), torch.ones(batch, dtype=torch.bool)
        history, lens = token_history(contexts, 64, max(ngram, 1))
        feed = last.unsqueeze(1).clone()
        rows, seconds, drafted = tgt.fused_step.speculative_round(
            drf.fused_step, feed, prev, last, 4, tgt.cache.k, tgt.cache.v, tgt.lens, drf.cache.k,
            drf.cache.v, drf.lens, active, history, lens, ngram, 0,
        )  # fmt: skip
        _, _, steps, tested, accepted = seconds.tolist()
        tried = sum(min(int(a) + 1, drafted) for a in rows[:, 0].tolist())  # tested, any origin
        took = int(rows[:, 0].sum())
        assert 0 <= accepted <= tested <= tried and accepted <= took
        if ngram == 0:  # the model drafted every token: its counts are all of them
            assert (steps, tested, accepted) == (drafted, tried, took)
        elif contexts is REPEATS:  # the lookup found every token: the model drafted none
            assert (steps, tested, accepted) == (0, 0, 0)


def _first_kept_late(kept: list[list[list[int]]]) -> tuple[int, int]:
    """(r, t): the first round r > 1 keeping a token t that no sequence kept before it, short
    of the last round (an EOS there would end the call where it ends anyway)."""
    for r in range(2, len(kept) - 1):
        seen = {t for earlier in kept[:r] for row in earlier for t in row}
        for row in kept[r]:
            for t in row:
                if t not in seen:
                    return r, t
    raise AssertionError("no round between the second and the last keeps a new token")


def _spec_state(target, draft, contexts, ngram):
    """Both sides' runners prefilled with contexts[:-1], and a speculative round's arguments."""
    batch = len(contexts)
    tgt, drf = Runner(target, batch, 160, "fused"), Runner(draft, batch, 160, "fused")
    tgt.prefill([c[:-1] for c in contexts])
    drf.prefill([c[:-1] for c in contexts])
    last = torch.tensor([c[-1] for c in contexts])
    history, lens = token_history(contexts, 160, max(ngram, 1))
    active = torch.ones(batch, dtype=torch.bool)
    return tgt, drf, last.clone(), last, active, history, lens


def _spec_args(state, feed, gamma, ngram, extend):
    tgt, drf, prev, last, active, history, lens = state
    return (drf.fused_step, feed, prev, last, gamma, tgt.cache.k, tgt.cache.v, tgt.lens,
            drf.cache.k, drf.cache.v, drf.lens, active, history, lens, ngram, extend)  # fmt: skip


@pytest.mark.parametrize("ngram", [0, 3])
def test_speculative_rounds_in_one_call_equal_round_by_round(ngram):
    """speculative_rounds: k rounds in one call, each later one fed [prev, last], are k calls
    of speculative_round (rows, drafts, both sides' caches and lengths, the lookup's history);
    the call stops after a round in which a sequence keeps an EOS or its budget."""
    target, draft = _pair32()
    contexts = MIXED[:3]
    one, steps = (_spec_state(target, draft, contexts, ngram) for _ in range(2))
    none, wide = torch.empty(0, dtype=torch.long), torch.full((3,), 10_000)
    first = one[3].unsqueeze(1).clone()
    rows_k, seconds_k, drafted_k = one[0].fused_step.speculative_rounds(
        *_spec_args(one, first, 2, ngram, 2), 6, none, wide
    )
    assert rows_k.shape[0] == seconds_k.shape[0] == drafted_k.shape[0] == 6
    feed = first
    for r in range(6):
        rows, _, drafted = steps[0].fused_step.speculative_round(*_spec_args(steps, feed, 2, ngram,
                                                                             2))  # fmt: skip
        assert torch.equal(rows_k[r], rows) and drafted_k[r] == drafted, r
        feed = torch.stack([steps[2], steps[3]], 1)
    for a, b in zip(one, steps, strict=True):
        if isinstance(a, Runner):
            assert torch.equal(a.lens, b.lens) and torch.equal(a.cache.k, b.cache.k)
        else:
            assert torch.equal(a, b)
    kept = [[row[1 : row[0] + 2] for row in rows_k[r].tolist()] for r in range(6)]

    def calls(eos: list[int], budget: list[int]) -> int:
        fresh = _spec_state(target, draft, contexts, ngram)
        out, _, _ = fresh[0].fused_step.speculative_rounds(
            *_spec_args(fresh, first, 2, ngram, 2), 6, torch.tensor(eos, dtype=torch.long),
            torch.tensor(budget),
        )  # fmt: skip
        return out.shape[0]

    # Sequence 1 reaches its budget in round 3 (it kept enough by then, not by round 2).
    need = sum(len(kept[r][1]) for r in range(3))
    assert calls([], [10_000, need, 10_000]) == 3
    # A token first kept in round r > 1 (by any sequence): the call ends after round r.
    r, token = _first_kept_late(kept)
    assert calls([token], [10_000] * 3) == r + 1
    assert calls([-7], [10_000] * 3) == 6
    # An inactive sequence does not end the call on its budget.
    idle = _spec_state(target, draft, contexts, ngram)
    idle[4][0] = False
    out, _, _ = idle[0].fused_step.speculative_rounds(
        *_spec_args(idle, first, 2, ngram, 2), 6, torch.tensor([-7]), torch.tensor([0, 10**4, 10**4])
    )  # fmt: skip
    assert out.shape[0] == 6
    step = one[0].fused_step
    with pytest.raises(RuntimeError, match="speculative_rounds needs rounds >= 1"):
        step.speculative_rounds(*_spec_args(one, first, 2, ngram, 2), 0, none, wide)
    with pytest.raises(RuntimeError, match=r"ModelStep: budget must be \[B=3\]"):
        step.speculative_rounds(*_spec_args(one, first, 2, ngram, 2), 1, none, wide[:2])
    with pytest.raises(RuntimeError, match="ModelStep: budget must be Long"):
        step.speculative_rounds(*_spec_args(one, first, 2, ngram, 2), 1, none, wide.int())
    with pytest.raises(RuntimeError, match="ModelStep: eos must be 1-D"):
        step.speculative_rounds(*_spec_args(one, first, 2, ngram, 2), 1, none[None], wide)


def _pearl_rounds(target, draft, contexts, ngram):
    from pearlmoe.decode.common import num_threads

    batch = len(contexts)
    tgt, drf = Runner(target, batch, 160, "fused"), Runner(draft, batch, 160, "fused")
    with num_threads(1):
        tgt.prefill([c[:-1] for c in contexts])
        drf.prefill([c[:-1] for c in contexts])
    worker = torch.classes.pearlmoe.CpuDraftWorker(drf.fused_step, 1)
    history, lens = token_history(contexts, 160, max(ngram, 1))
    rounds = torch.classes.pearlmoe.CpuPearlRounds(
        tgt.fused_step, worker, tgt.cache.k, tgt.cache.v, tgt.lens, drf.cache.k, drf.cache.v,
        drf.lens, [c[-1] for c in contexts], [len(c) for c in contexts], history, lens, ngram,
        False, True,
    )  # fmt: skip
    return rounds, (tgt, drf, worker)


@pytest.mark.parametrize("ngram", [0, 3])
def test_pearl_rounds_in_one_call_equal_round_by_round(ngram):
    """PearlRounds.rounds: k rounds in one call are k calls of round() (rows right-padded to
    the widest, each round's width and drafts, the sides' seconds and the round's wall), and
    the call stops after a round in which a sequence keeps an EOS or its budget."""
    target, draft = _pair32()
    contexts = MIXED[:3]
    (one, keep1), (steps, keep2) = (_pearl_rounds(target, draft, contexts, ngram) for _ in range(2))
    none, wide = torch.empty(0, dtype=torch.long), torch.full((3,), 10_000)
    rows_k, seconds_k, sizes_k = one.rounds(6, 2, 2, none, wide)
    assert rows_k.shape[:2] == (6, 3) and seconds_k.shape == (6, 7) and sizes_k.shape == (6, 2)
    assert (seconds_k[:, 6] >= seconds_k[:, :2].max(1).values).all()  # wall >= the slower side
    kept = []
    for r in range(6):
        rows, _, width, drafted = steps.round(2, 2)
        w = rows.shape[1]
        assert torch.equal(rows_k[r, :, :w], rows) and (rows_k[r, :, w:] == -1).all(), r
        assert sizes_k[r].tolist() == [width, drafted]
        kept.append([row[4 : 4 + row[3]] for row in rows.tolist()])
    assert torch.equal(keep1[0].lens, keep2[0].lens) and torch.equal(keep1[1].lens, keep2[1].lens)

    def calls(eos: list[int], budget: list[int]) -> int:
        fresh, _keep = _pearl_rounds(target, draft, contexts, ngram)
        out, _, _ = fresh.rounds(6, 2, 2, torch.tensor(eos, dtype=torch.long),
                                 torch.tensor(budget))  # fmt: skip
        return out.shape[0]

    need = sum(len(kept[r][0]) for r in range(2))
    assert calls([], [need, 10_000, 10_000]) == 2
    assert calls([-7], [10_000] * 3) == 6
    r, token = _first_kept_late(kept)
    assert calls([token], [10_000] * 3) == r + 1
    assert len(set(sizes_k[:, 0].tolist())) > 1  # windows of several widths: rows were padded
    # A finished sequence does not end the call on its budget.
    idle, _keep_idle = _pearl_rounds(target, draft, contexts, ngram)
    idle.finish(0)
    out, _, _ = idle.rounds(6, 2, 2, torch.tensor([-7]), torch.tensor([0, 10**4, 10**4]))
    assert out.shape[0] == 6
    with pytest.raises(RuntimeError, match="PearlRounds: rounds needs n >= 1"):
        one.rounds(0, 2, 2, none, wide)
    with pytest.raises(RuntimeError, match=r"PearlRounds: budget must be \[B=3\]"):
        one.rounds(1, 2, 2, none, wide[:1])
    with pytest.raises(RuntimeError, match="PearlRounds: eos must be Long"):
        one.rounds(1, 2, 2, none.int(), wide)
