"""Training practices: the loop learns, the expert learning rate and schedule follow the paper's
rules, the training forward equals the inference forward, and checkpoints resume exactly."""

import itertools

import pytest
import torch

from pearlmoe.model import ModelConfig, Transformer
from pearlmoe.train import (
    TrainConfig,
    expert_lr_ratio,
    lr_at,
    optimal_lr_scale,
    param_groups,
    train,
)

CONFIG = dict(
    vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, intermediate_size=32, num_experts=4, moe_topk=1, num_shared_expert=1,
    use_mixed_mlp_moe=True, use_cla=True, cla_share_factor=2, use_qk_norm=True,
)  # fmt: skip


def _tokens(n: int, seed: int) -> torch.Tensor:
    """A learnable stream: a fixed 11-token cycle with 5% noise."""
    g = torch.Generator().manual_seed(seed)
    cycle = torch.tensor([3, 7, 1, 9, 4, 4, 12, 30, 2, 8, 15])
    stream = cycle.repeat(n // 11 + 1)[:n].clone()
    noise = torch.rand(n, generator=g) < 0.05
    stream[noise] = torch.randint(0, 32, (int(noise.sum()),), generator=g)
    return stream


def _model(seed=0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**CONFIG))


def test_twenty_steps_reduce_the_loss():
    model = _model()
    cfg = TrainConfig(steps=20, batch_size=8, seq_len=32, peak_lr=1e-2, warmup_steps=3,
                      eval_every=20, eval_batches=2, bf16=False)  # fmt: skip
    history = train(model, _tokens(4000, 0), _tokens(800, 1), cfg, progress=False)
    first, last = history[0]["loss"], sum(h["loss"] for h in history[-3:]) / 3
    assert last < first - 0.5, (first, last)
    assert history[-1]["eval_ppl"] < 32  # better than uniform over the vocabulary
    assert all(h["aux"] > 0 for h in history)


def test_bf16_autocast_step_runs():
    cfg = TrainConfig(steps=2, batch_size=2, seq_len=16, eval_every=2, eval_batches=1, bf16=True)
    history = train(_model(), _tokens(500, 0), _tokens(200, 1), cfg, progress=False)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in history)


def test_expert_learning_rate_rule():
    # The paper: routed experts see ~B/16 tokens; with B_noise = 3.8 B the ratio is ~0.31.
    assert expert_lr_ratio(1, 16) == pytest.approx(0.31, abs=0.005)
    assert optimal_lr_scale(4.0, 4.0) == pytest.approx(1.0)  # ε(B_noise) = ε_max
    model = _model()
    groups = {g["name"]: g for g in param_groups(model, TrainConfig())}
    routed = {id(p) for b in model.layers for p in (b.mlp.w13, b.mlp.w2)}
    assert {id(p) for p in groups["routed_experts"]["params"]} == routed
    assert groups["routed_experts"]["lr_scale"] == pytest.approx(expert_lr_ratio(1, 4))
    assert groups["no_decay"]["weight_decay"] == 0 and all(
        p.dim() == 1 for p in groups["no_decay"]["params"]
    )
    history = train(model, _tokens(300, 0), _tokens(100, 1),
                    TrainConfig(steps=3, eval_every=3, eval_batches=1, batch_size=2, seq_len=8),
                    progress=False)  # fmt: skip
    assert [h["lr"] for h in history] == [lr_at(s, 3, 3e-3, 50) for s in range(3)]


def test_schedule_warmup_decay_anneal():
    lrs = [lr_at(s, 1000, 1.0, 100) for s in range(1000)]
    assert lrs[0] == pytest.approx(0.01) and lrs[99] == pytest.approx(1.0)
    assert all(a >= b - 1e-12 for a, b in itertools.pairwise(lrs[99:]))  # never rises
    assert lrs[949] == pytest.approx(0.3, abs=1e-3)  # decay ends where the anneal starts (95%)
    assert lrs[-1] == pytest.approx(0.1)  # anneal to 1/10 of the peak


def test_training_forward_equals_inference_forward():
    model = _model().eval()
    ids = torch.randint(0, 32, (2, 12))
    with torch.no_grad():
        logits, _ = model.forward_train(ids)
        torch.testing.assert_close(logits, model(ids), rtol=1e-4, atol=1e-4)


def test_resume_is_exact(tmp_path):
    cfg = TrainConfig(steps=8, batch_size=4, seq_len=16, warmup_steps=2, eval_every=3,
                      eval_batches=1, bf16=False)  # fmt: skip
    data, held_out = _tokens(2000, 0), _tokens(300, 1)
    straight = _model()
    train(straight, data, held_out, cfg, progress=False)
    resumed = _model()
    train(resumed, data, held_out, cfg, tmp_path, progress=False, stop_at=5)  # interrupted
    resumed = _model(seed=123)  # a fresh process: everything comes from the checkpoint
    train(resumed, data, held_out, cfg, tmp_path, resume=True, progress=False)
    for (name, a), (_, b) in zip(
        straight.state_dict().items(), resumed.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_stdlib_corpus_and_tokenizer():
    from pearlmoe.train.data import EOS, encode, read, split_files, stdlib_files, train_tokenizer

    files = stdlib_files()
    assert len(files) > 300
    assert not any({"test", "tests", "idlelib"} & set(f.parts) for f in files)
    train_files, held_out = split_files(files)
    assert set(train_files).isdisjoint(held_out) and len(held_out) == len(files[::20])
    tokenizer = train_tokenizer(read(train_files[:40]), vocab_size=512)
    assert tokenizer.get_vocab_size() == 512
    sample = 'def f(x):\n    return {"ä": x ** 2}  # ✓\n'
    assert tokenizer.decode(tokenizer.encode(sample).ids) == sample  # byte-level: lossless
    ids = encode(tokenizer, read(held_out[:5]))
    assert ids.dtype == torch.int64 and int(ids.max()) < 512
    assert int((ids == tokenizer.token_to_id(EOS)).sum()) == 5


def test_distillation_pulls_the_student_towards_the_teacher():
    """With a teacher and distill=1, the loss is KL(teacher || student) alone: the student learns
    the teacher's predictions, including where they differ from the data."""
    from pearlmoe.train.trainer import _losses

    teacher = _model(seed=5).eval()
    window = _tokens(400, 3)[:33].view(1, 33)
    cfg = TrainConfig(steps=30, batch_size=4, seq_len=32, peak_lr=1e-2, warmup_steps=3,
                      eval_every=30, eval_batches=1, bf16=False, distill=1.0)  # fmt: skip
    student = Transformer(ModelConfig(**{**CONFIG, "model_type": "llama", "num_experts": 0}))
    student.eval()
    before = _losses(student, window, cfg, teacher=teacher)[2].item()
    train(student, _tokens(4000, 0), _tokens(800, 1), cfg, progress=False, teacher=teacher)
    after = _losses(student, window, cfg, teacher=teacher)[2].item()
    assert after < 0.5 * before, (before, after)
    wrong_vocab = Transformer(ModelConfig(**{**CONFIG, "vocab_size": 48}))
    with pytest.raises(ValueError, match="teacher vocab_size 48 != model vocab_size 32"):
        train(student, _tokens(400, 0), _tokens(100, 1), cfg, progress=False, teacher=wrong_vocab)
