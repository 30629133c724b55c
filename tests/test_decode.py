"""The decoding loops' invariants: greedy speculative and PEARL decoding emit exactly the tokens
of greedy autoregressive decoding; sampled decoding follows the target's distribution; the
statistics are consistent. Models are tiny and float64, so no argmax near-tie can flip between a
one-token step and a multi-token verification."""

import pytest
import torch

import pearlmoe
from conftest import tiny_pair
from pearlmoe.decode import auto_gamma, pearl_generate, speculative_generate
from pearlmoe.model import ModelConfig, Transformer

LOOPS = {"speculative": speculative_generate, "pearl": pearl_generate}
PROMPTS = [[1, 2, 3, 4], [5, 6, 7, 8, 9, 10], [11, 12, 13]]


_pair = tiny_pair


@pytest.fixture(scope="module")
def pair():
    return _pair()


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("gamma", [1, 2, 3, 5])
@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_equals_autoregressive(pair, loop, gamma, batch):
    target, draft = pair
    prompts = PROMPTS[:batch]
    want = pearlmoe.generate(target, prompts, 30)
    got, stats = LOOPS[loop](target, draft, prompts, 30, gamma=gamma)
    assert got == want
    assert all(len(o) == 30 for o in got)  # full-length stop
    assert 0 < stats.acceptance_rate < 1  # the draft really is wrong sometimes
    assert stats.emitted == sum(map(len, got))
    assert stats.accepted <= stats.proposed
    assert stats.mean_accepted_tokens == pytest.approx(stats.emitted / stats.target_calls)
    if loop == "pearl" and gamma > 1:
        assert stats.extra["post_rounds"] > 0  # both modes exercised


@pytest.mark.parametrize("loop", LOOPS)
def test_eos_mid_window(pair, loop):
    target, draft = pair
    want = pearlmoe.generate(target, PROMPTS, 30)
    eos = want[1][7]
    want = pearlmoe.generate(target, PROMPTS, 30, eos_token_id=eos)
    got, _ = LOOPS[loop](target, draft, PROMPTS, 30, gamma=3, eos_token_id=eos)
    assert got == want and got[1][-1] == eos


@pytest.mark.parametrize("loop", LOOPS)
def test_perfect_draft_accepts_everything(pair, loop):
    target, _ = pair
    got, stats = LOOPS[loop](target, target, PROMPTS, 24, gamma=3)
    assert got == pearlmoe.generate(target, PROMPTS, 24)
    assert stats.acceptance_rate == 1.0
    # Vanilla: γ drafts + a bonus per target pass; PEARL: γ per pass once in post-verify.
    assert stats.mean_accepted_tokens > 2.5


@pytest.mark.parametrize("loop", LOOPS)
def test_sampling_follows_the_target_distribution(loop):
    """2 sampled tokens for 6000 sequences at temperature 1: the marginals of both positions
    match the exact target distribution (and are far from the draft's)."""
    target, draft = _pair(vocab=16, noise=0.6, seed=1)
    prompt, n = [1, 2, 3, 4, 5, 6], 6000
    with torch.no_grad():
        p1 = torch.softmax(target(torch.tensor([prompt]))[0, -1], -1)  # [V]
        nxt = torch.tensor([[*prompt, x] for x in range(16)])
        p2_given = torch.softmax(target(nxt)[:, -1], -1)  # [V, V]
        q1 = torch.softmax(draft(torch.tensor([prompt]))[0, -1], -1)
    p2 = p1 @ p2_given  # marginal of the second token
    assert (q1 - p1).abs().sum() > 0.2  # a sampler that trusted the draft would fail below
    out, _ = LOOPS[loop](target, draft, [prompt] * n, 2, gamma=2, temperature=1.0,
                         generator=torch.Generator().manual_seed(0))  # fmt: skip
    tokens = torch.tensor(out)  # [n, 2]
    for i, want in enumerate((p1, p2)):
        freq = torch.bincount(tokens[:, i], minlength=16).double() / n
        assert (freq - want).abs().sum() < 0.06, (i, freq, want)


def test_auto_gamma_and_vocab_check(pair):
    target, draft = pair
    assert 1 <= auto_gamma(target, draft) <= 8
    small = Transformer(ModelConfig(model_type="llama", vocab_size=10, hidden_size=8,
                                    num_hidden_layers=1, num_attention_heads=2,
                                    num_key_value_heads=2, intermediate_size=8))  # fmt: skip
    with pytest.raises(ValueError, match="must share a vocabulary"):
        speculative_generate(target, small, PROMPTS, 4, gamma=2)
