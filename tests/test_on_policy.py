"""On-policy draft data: corpus prefixes continued by the target, mixed into training batches, and
the decode agreement that measures what they are for."""

import pytest
import torch

from pearlmoe.decode import generate
from pearlmoe.model import ModelConfig, Transformer
from pearlmoe.train import TrainConfig, train
from pearlmoe.train import on_policy as op
from pearlmoe.train.trainer import batches

CONFIG = dict(
    vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, intermediate_size=32, model_type="llama",
)  # fmt: skip


def _model(seed: int) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**CONFIG)).eval()


def _stream(n: int = 500) -> torch.Tensor:
    return torch.randint(2, 32, (n,), generator=torch.Generator().manual_seed(7))


def test_prefixes_are_seeded_slices_of_the_stream():
    stream = _stream()
    a = op.prefixes(stream, 9, 5, seed=3)
    assert a.shape == (9, 5) and torch.equal(a, op.prefixes(stream, 9, 5, seed=3))
    assert not torch.equal(a, op.prefixes(stream, 9, 5, seed=4))
    text = stream.tolist()
    for row in a.tolist():  # each row occurs in the stream as it is
        assert any(text[s : s + 5] == row for s in range(len(text) - 4))
    with pytest.raises(ValueError, match="prefixes: a stream of 4 tokens has no 5-token prefix"):
        op.prefixes(stream[:4], 1, 5, seed=0)


def test_greedy_continuations_are_the_targets_own_and_sampled_ones_are_seeded():
    target = _model(0)
    prompts = op.prefixes(_stream(), 5, 4, seed=1)  # [5, 4]
    greedy = op.continuations(target, prompts, 6, 0.0, seed=0, batch_size=2)  # [5, 10]
    assert greedy.shape == (5, 10) and torch.equal(greedy[:, :4], prompts)
    assert greedy[:, 4:].tolist() == generate(target, prompts.tolist(), 6)
    hot = op.continuations(target, prompts, 6, 1.0, seed=5, batch_size=2)
    assert torch.equal(hot, op.continuations(target, prompts, 6, 1.0, seed=5, batch_size=2))
    assert not torch.equal(hot, greedy)  # 30 tokens sampled at T=1 from a random model


def test_windows_split_over_temperatures_and_come_back_from_the_cache(tmp_path, monkeypatch):
    target, cache = _model(0), tmp_path / "on_policy.safetensors"
    w = op.on_policy_windows(target, _stream(), 6, 11, 4, (0.0, 1.0), seed=2, cache=cache)
    assert w.shape == (6, 12) and cache.exists()
    greedy = op.continuations(target, op.prefixes(_stream(), 6, 4, 2)[:3], 8, 0.0, seed=2)
    assert torch.equal(w[:3], greedy)  # the first half greedy, the second sampled

    def fail(*args, **kwargs):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(op, "continuations", fail)
    again = op.on_policy_windows(target, _stream(), 6, 11, 4, (0.0, 1.0), seed=2, cache=cache)
    assert torch.equal(again, w)
    with pytest.raises(AssertionError, match="decoded again"):  # another key is not a hit
        op.on_policy_windows(target, _stream(), 6, 11, 4, (0.0,), seed=2, cache=cache)


def test_batches_take_their_last_rows_from_the_extra_windows():
    stream = torch.arange(1000)
    extra = torch.arange(-90, 0).view(10, 9)  # [10, 9]: negative, so never a stream window
    plain = batches(stream, 4, 8, torch.Generator().manual_seed(0))
    mixed = batches(stream, 4, 8, torch.Generator().manual_seed(0), extra, 3)
    for _ in range(5):
        p, m = next(plain), next(mixed)
        assert p.shape == m.shape == (4, 9)
        assert (m[:1] >= 0).all() and (m[1:] < 0).all()
        assert all(any(torch.equal(r, e) for e in extra) for r in m[1:])
        assert all(torch.equal(r, torch.arange(r[0], r[0] + 9)) for r in p)
    # Without extra windows the batches are the ones the trainer always drew (same RNG use).
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(0, 1000 - 9, (4,), generator=g)
    first = next(batches(stream, 4, 8, torch.Generator().manual_seed(0), None, 3))
    assert first[:, 0].tolist() == starts.tolist()


def test_training_on_the_teachers_continuations_raises_decode_agreement():
    """Distilled on the teacher's greedy continuations, a student agrees with the teacher along
    its greedy path far more than one distilled on corpus text alone (same steps, same KL); a
    wrong window width is refused."""
    torch.manual_seed(5)
    teacher = Transformer(ModelConfig(**CONFIG)).eval()
    with torch.no_grad():  # weights large enough that its greedy path is not one repeated token
        for p in teacher.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)
    stream = _stream(4000)
    windows = op.on_policy_windows(teacher, stream, 16, 32, 4, (0.0,), seed=0)  # [16, 33]
    prompts = windows[:8, :4].tolist()
    agreement = {}
    for share in (0.0, 1.0):
        torch.manual_seed(6)
        student = Transformer(ModelConfig(**CONFIG))
        cfg = TrainConfig(steps=100, batch_size=4, seq_len=32, peak_lr=1e-2, warmup_steps=3,
                          eval_every=100, eval_batches=1, bf16=False, distill=0.9,
                          on_policy_windows=16, on_policy_share=share)  # fmt: skip
        train(student, stream, stream[:800], cfg, progress=False, teacher=teacher,
              on_policy=windows if share else None)  # fmt: skip
        agreement[share] = op.decode_agreement(teacher, student, prompts, 12)
    assert agreement[1.0]["tokens"] == 96 and agreement[1.0]["prompts"] == 8
    assert (agreement[1.0]["decode_agreement"]
            > agreement[0.0]["decode_agreement"] + 0.15), agreement  # fmt: skip
    assert op.decode_agreement(teacher, teacher, prompts, 12)["decode_agreement"] == 1.0
    with pytest.raises(
        ValueError, match=r"on_policy windows hold 20 tokens, expected seq_len \+ 1 = 33"
    ):
        train(student, stream, stream[:800], cfg, progress=False, teacher=teacher,
              on_policy=windows[:, :20])  # fmt: skip
