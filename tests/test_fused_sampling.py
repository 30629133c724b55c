"""Sampling inside the fused CPU loops (csrc/cpu/sampler.h, ModelStep.sample_steps and
sampled_rounds, PearlRounds.sample_with): the sampler's distributions are pearlmoe.decode.
sampling's (temperature, top-k, top-p) and its draws follow them; sampled autoregressive,
speculative and PEARL decoding on fused steps (with the prompt lookup's proposals and a
trimmed-vocabulary draft) follow the target's distribution exactly; a seeded decode repeats;
bad arguments get a clear error. Speed is
measured by `pearlmoe bench --temperature` (bench/NOTES.md), not here."""

import math

import pytest
import torch
from test_trimmed_vocab import trimmed_copy

import pearlmoe
from conftest import tiny_pair
from pearlmoe.decode import fused, pearl_generate, speculative_generate
from pearlmoe.decode.sampling import logits_to_probs
from pearlmoe.model import ModelConfig, Transformer

LOOPS = {"speculative": speculative_generate, "pearl": pearl_generate}


def _sampler(temperature=1.0, top_k=0, top_p=1.0, seed=0):
    return torch.classes.pearlmoe.CpuSampler(temperature, top_k, top_p, seed)


@pytest.mark.parametrize("vocab", [1, 17, 4097])
def test_sampler_distributions_equal_logits_to_probs(vocab):
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(6, vocab, generator=g) * 3  # [R, V]
    logits[1, : vocab // 2] = float("-inf")  # a trimmed vocabulary's unscored tokens
    logits[2] = 0.5  # all tied
    for temperature in (0.5, 1.0, 1.7):
        for top_k in (0, 1, 5, vocab):
            for top_p in (1.0, 0.9, 0.3):
                got = _sampler(temperature, top_k, top_p).probs(logits)
                want = logits_to_probs(logits.double(), temperature, top_k or None, top_p).float()
                # Which of tied tokens top-p drops is the sort's choice (torch's is not stable):
                # the tied row keeps as many, each with the same mass.
                got[2], want[2] = got[2].sort().values, want[2].sort().values
                assert torch.allclose(got, want, atol=2e-6, rtol=1e-5), (temperature, top_k, top_p)
                assert torch.allclose(got.sum(-1), torch.ones(6), atol=1e-5)


def test_sampler_draws_follow_the_distribution():
    probs = torch.tensor([0.5, 0.0, 0.2, 0.25, 0.0, 0.05])  # [V], with zero-mass tokens
    n = 40000
    tokens = _sampler(seed=3).draw(probs.expand(n, -1).contiguous())  # [n]
    freq = torch.bincount(tokens, minlength=6).double() / n
    assert freq[1] == 0 and freq[4] == 0  # never a token without mass
    # Within ~5 standard errors of every frequency.
    assert ((freq - probs).abs() <= 5 * (probs * (1 - probs) / n).sqrt() + 1e-9).all(), freq
    again = _sampler(seed=3).draw(probs.expand(n, -1).contiguous())
    assert torch.equal(tokens, again)  # a seed repeats its draws
    assert not torch.equal(tokens, _sampler(seed=4).draw(probs.expand(n, -1).contiguous()))


def test_sampler_refuses_bad_arguments():
    for args, what in [
        ((0.0, 0, 1.0, 0), "temperature must be a finite number > 0"),
        ((math.nan, 0, 1.0, 0), "temperature must be a finite number > 0"),
        ((1.0, -1, 1.0, 0), "top_k must be >= 0"),
        ((1.0, 0, 0.0, 0), r"top_p must be in \(0, 1\]"),
        ((1.0, 0, 1.5, 0), r"top_p must be in \(0, 1\]"),
    ]:
        with pytest.raises(RuntimeError, match=what):
            torch.classes.pearlmoe.CpuSampler(*args)
    s = _sampler()
    with pytest.raises(RuntimeError, match="row 1 of the logits has no finite maximum"):
        s.probs(torch.tensor([[0.0, 1.0], [math.nan, 0.0]]))
    with pytest.raises(RuntimeError, match="row 0 of the logits has no finite maximum"):
        s.probs(torch.full((1, 3), float("-inf")))
    with pytest.raises(RuntimeError, match="logits must be fp32 CPU"):
        s.probs(torch.zeros(2, 3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"probs\[0, 1\] = -0.5 is not a probability"):
        s.draw(torch.tensor([[1.0, -0.5]]))
    with pytest.raises(RuntimeError, match="probs row 0 has no mass"):
        s.draw(torch.zeros(1, 4))


def _pair32(seed: int = 1):
    """conftest's decoding pair (vocab 16, a noisy draft) in fp32, which the fused step runs."""
    target, draft = tiny_pair(vocab=16, noise=0.6, seed=seed)
    return target, draft, target.float(), draft.float()


def _marginals(target, prompt: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact distributions [V] of the first and second sampled token after prompt (fp64)."""
    vocab = target.config.vocab_size
    with torch.no_grad():
        p1 = torch.softmax(target(torch.tensor([prompt]))[0, -1], -1)  # [V]
        nxt = torch.tensor([[*prompt, x] for x in range(vocab)])
        p2_given = torch.softmax(target(nxt)[:, -1], -1)  # [V, V]
    return p1, p1 @ p2_given


def _check(out: list[list[int]], wants, vocab: int, slack: float) -> None:
    tokens = torch.tensor(out)  # [n, 2]
    for i, want in enumerate(wants):
        freq = torch.bincount(tokens[:, i], minlength=vocab).double() / len(out)
        assert (freq - want).abs().sum() < slack, (i, freq, want)


# A prompt whose last 3-gram occurred before: the lookup proposes the token that followed it.
LOOPY = [1, 2, 3, 4, 1, 2, 3, 4, 1, 2]


def test_fused_sampled_autoregressive_follows_the_target():
    target64, _, target, _ = _pair32()
    assert fused.unsupported(target) is None
    n = 6000
    out = pearlmoe.generate(target, [LOOPY] * n, 2, temperature=1.0, backend="fused",
                            generator=torch.Generator().manual_seed(0))  # fmt: skip
    _check(out, _marginals(target64, LOOPY), 16, 0.06)


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("lookup", [0, 3])
@pytest.mark.parametrize("trimmed", [False, True])
def test_fused_sampled_speculation_follows_the_target(loop, lookup, trimmed):
    """The draft's proposals (its own distributions, the lookup's tokens with all their mass,
    a trimmed draft that never proposes the tokens it does not score) are corrected by
    rejection sampling: the marginals of both sampled tokens are the target's, not the
    draft's."""
    target64, draft64, target, draft = _pair32()
    if trimmed:
        draft = trimmed_copy(draft, list(range(10)))
    p1, p2 = _marginals(target64, LOOPY)
    with torch.no_grad():
        q1 = torch.softmax(draft64(torch.tensor([LOOPY]))[0, -1], -1)
    assert (q1 - p1).abs().sum() > 0.2  # a sampler that trusted the draft would fail below
    n = 6000
    out, stats = LOOPS[loop](target, draft, [LOOPY] * n, 2, gamma=2, temperature=1.0,
                             backend="fused", lookup=lookup,
                             generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert stats.extra["round"] == "C++" and stats.extra["lookup"] == lookup
    assert 0 < stats.acceptance_rate < 1
    _check(out, (p1, p2), 16, 0.06)


def test_fused_sampled_decoding_repeats_with_its_seed():
    _, _, target, draft = _pair32()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]

    def run(seed, loop):
        g = torch.Generator().manual_seed(seed)
        if loop == "ar":
            return pearlmoe.generate(target, prompts, 20, temperature=0.9, top_k=8, top_p=0.9,
                                     backend="fused", generator=g)  # fmt: skip
        return LOOPS[loop](target, draft, prompts, 20, gamma=3, temperature=0.9, top_k=8,
                           top_p=0.9, backend="fused", generator=g)[0]  # fmt: skip

    for loop in ("ar", *LOOPS):
        first = run(5, loop)
        assert run(5, loop) == first, loop
        assert run(6, loop) != first, loop
        assert all(len(o) == 20 for o in first)


@pytest.mark.parametrize("loop", LOOPS)
def test_fused_sampled_speculation_stops_at_eos(loop):
    """Sequences stop at their EOS mid-round and their budgets; the rest go on."""
    _, _, target, draft = _pair32()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9], [10, 11]]
    eos = 3
    out, stats = LOOPS[loop](target, draft, prompts, 40, gamma=3, temperature=1.0,
                             eos_token_id=eos, backend="fused",
                             generator=torch.Generator().manual_seed(1))  # fmt: skip
    assert stats.extra["round"] == "C++"
    for row in out:
        assert eos not in row[:-1]
        assert len(row) == 40 or row[-1] == eos
    assert any(row and row[-1] == eos and len(row) < 40 for row in out)


def test_sampled_steps_and_rounds_refuse_bad_calls():
    from pearlmoe.decode.runner import Runner, Sampling

    _, _, target, _ = _pair32()
    sampling = Sampling(temperature=1.0)
    tgt = Runner(target, 1, 8, "fused", sampling)
    tgt.prefill([[1, 2]])
    c, s = tgt.cache, tgt.sampler()
    stops, done = torch.empty(0, dtype=torch.long), torch.tensor([False])
    with pytest.raises(RuntimeError, match=r"sample_steps needs one token per sequence"):
        tgt.fused_step.sample_steps(torch.tensor([[1, 2]]), c.k, c.v, c.lens, 2, stops, done, s)
    with pytest.raises(RuntimeError, match=r"sample_steps' 9 more exceed the cache's capacity 8"):
        tgt.fused_step.sample_steps(torch.tensor([[1]]), c.k, c.v, c.lens, 9, stops, done, s)
    assert int(c.lens[0]) == 2  # refused before any step moved a length
    other = Transformer(ModelConfig(model_type="llama", vocab_size=20, hidden_size=16,
                                    num_hidden_layers=1, num_attention_heads=2,
                                    num_key_value_heads=2, intermediate_size=16))  # fmt: skip
    small = Runner(other, 1, 8, "fused", sampling)
    one = torch.tensor([1])
    with pytest.raises(RuntimeError, match=r"the draft's vocabulary \(20\) is not the target's"):
        tgt.fused_step.sampled_rounds(
            small.fused_step, one.view(1, 1), one, one, 2, c.k, c.v, c.lens, small.cache.k,
            small.cache.v, small.cache.lens, torch.tensor([True]), torch.empty(0, dtype=torch.long),
            torch.empty(0, dtype=torch.long), 0, 0, 1, stops, torch.tensor([4]), s,
        )  # fmt: skip


def test_near_greedy_sampling_emits_the_greedy_tokens_lookahead_included():
    """At T = 0.01 every distribution is a near one-hot of the argmax: sampled rounds must then
    emit the greedy tokens, which they do only if each window row scores the token it verifies
    (PEARL's lookahead rows included: the lookup drafts LOOPY's loop)."""
    _, _, target, draft = _pair32()
    want = pearlmoe.generate(target, [LOOPY], 40, backend="fused")
    for loop in LOOPS.values():
        got, stats = loop(target, draft, [LOOPY], 40, temperature=0.01, backend="fused",
                          generator=torch.Generator().manual_seed(0))  # fmt: skip
        assert got == want, loop.__name__
        if loop is pearl_generate:
            assert stats.extra["lookahead_tokens"] > 0
