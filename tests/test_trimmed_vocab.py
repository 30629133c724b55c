"""A draft with a trimmed vocabulary (FR-Spec: its head scores only some of the target's tokens):
its logits are -inf outside them, it saves and loads with its token ids, and decoding with it
stays lossless: greedy output equals autoregressive, sampled output follows the target."""

import pytest
import torch

import pearlmoe
from conftest import tiny_pair
from pearlmoe.decode import pearl_generate, speculative_generate
from pearlmoe.model import ModelConfig, Transformer, from_pretrained, save_pretrained
from pearlmoe.model.config import estimate

LOOPS = {"speculative": speculative_generate, "pearl": pearl_generate}
PROMPTS = [[1, 2, 3, 4], [5, 6, 7, 8, 9, 10], [11, 12, 13]]


def trimmed_copy(draft: Transformer, kept: list[int]) -> Transformer:
    """The draft with only the kept tokens in its head; the others share one input row."""
    c = draft.config
    config = ModelConfig(**{**{f: getattr(c, f) for f in c.__dataclass_fields__},
                            "trimmed_vocab_size": len(kept)})  # fmt: skip
    out = Transformer(config, dtype=draft.dtype)
    state = {k: v for k, v in draft.state_dict().items() if k != "embed_tokens"}
    rows = draft.embed_tokens.detach()
    state["embed_tokens"] = torch.cat([rows[kept], rows.mean(0, keepdim=True)])
    state["vocab_ids"] = torch.tensor(kept, dtype=torch.int32)
    out.load_state_dict(state)
    out.set_vocab(torch.tensor(kept))
    return out.eval()


@pytest.fixture(scope="module")
def trimmed_pair():
    target, draft = tiny_pair()
    kept = torch.randperm(64, generator=torch.Generator().manual_seed(3))[:40].tolist()
    return target, trimmed_copy(draft, kept), kept


def test_logits_outside_the_kept_tokens_are_minus_inf(trimmed_pair):
    _, draft, kept = trimmed_pair
    logits = draft(torch.tensor([[1, 2, 60, 5]]))  # [1, 4, 64]
    mask = torch.zeros(64, dtype=torch.bool)
    mask[kept] = True
    assert torch.isinf(logits[..., ~mask]).all() and (logits[..., ~mask] < 0).all()
    assert torch.isfinite(logits[..., mask]).all()
    train_logits, _ = draft.forward_train(torch.tensor([[1, 2, 60, 5]]))
    assert torch.allclose(train_logits[..., mask], logits[..., mask], atol=1e-9)
    small, _ = draft.forward_train(torch.tensor([[1, 2, 60, 5]]), full_vocab=False)
    assert small.shape == (1, 4, 40)


def test_tokens_outside_share_one_input_row(trimmed_pair):
    _, draft, kept = trimmed_pair
    outside = [t for t in range(64) if t not in kept][:2]
    a = draft(torch.tensor([[1, outside[0]]]))
    b = draft(torch.tensor([[1, outside[1]]]))
    assert torch.equal(a, b)


def test_save_load_round_trip(trimmed_pair, tmp_path):
    _, draft, _ = trimmed_pair
    save_pretrained(draft, tmp_path)
    loaded = from_pretrained(tmp_path, dtype=torch.float64)
    ids = torch.tensor([[3, 9, 27, 63, 0]])
    assert torch.equal(loaded(ids), draft(ids))
    assert torch.equal(loaded.vocab_rows, draft.vocab_rows)
    assert estimate(loaded.config).total_params == sum(p.numel() for p in draft.parameters())


@pytest.mark.parametrize(
    "size, match",
    [(0, "trimmed_vocab_size"), (65, "trimmed_vocab_size"), (2.5, "trimmed_vocab_size")],
)
def test_bad_config(size, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(vocab_size=64, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                    num_key_value_heads=1, intermediate_size=8, model_type="llama",
                    trimmed_vocab_size=size)  # fmt: skip


def test_bad_vocab_ids(trimmed_pair):
    _, draft, _ = trimmed_pair
    with pytest.raises(ValueError, match="set_vocab: vocab_ids must be 40 token ids"):
        draft.set_vocab(torch.arange(39))
    with pytest.raises(ValueError, match="set_vocab: vocab_ids must be 40 token ids"):
        draft.set_vocab(torch.arange(25, 65))
    with pytest.raises(ValueError, match="distinct"):
        draft.set_vocab(torch.zeros(40, dtype=torch.long))


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("bookkeeping", ["host", "device"])
def test_greedy_equals_autoregressive(trimmed_pair, loop, bookkeeping):
    target, draft, _ = trimmed_pair
    want = pearlmoe.generate(target, PROMPTS, 24)
    got, stats = LOOPS[loop](target, draft, PROMPTS, 24, gamma=3, bookkeeping=bookkeeping)
    assert got == want
    assert 0 < stats.acceptance_rate < 1


@pytest.mark.parametrize("loop", LOOPS)
def test_sampling_follows_the_target(loop):
    """The draft never proposes the tokens it does not score; those come from the residual, so
    the sampled marginal is still the target's."""
    target, full_draft = tiny_pair(vocab=16, noise=0.6, seed=1)
    draft = trimmed_copy(full_draft, list(range(10)))
    prompt, n = [1, 2, 3, 4, 5, 6], 4000
    with torch.no_grad():
        p1 = torch.softmax(target(torch.tensor([prompt]))[0, -1], -1)  # [V]
    assert p1[10:].sum() > 0.05  # the target does want the untrimmed tokens
    out, _ = LOOPS[loop](target, draft, [prompt] * n, 1, gamma=2, temperature=1.0,
                         generator=torch.Generator().manual_seed(0))  # fmt: skip
    freq = torch.bincount(torch.tensor(out)[:, 0], minlength=16).double() / n
    assert (freq - p1).abs().sum() < 0.07, (freq, p1)
