"""The draft distillation pipeline (pearlmoe.train.distill) on a tiny random teacher: corpus
readers, the kept-vocabulary ranking, that training raises agreement, and that a resumed run
ends bit-identical to an uninterrupted one."""

import torch

from conftest import tiny_pair
from pearlmoe.model import ModelConfig, Transformer
from pearlmoe.train import corpora
from pearlmoe.train import distill as D


def test_read_brown_and_fortunes(tmp_path):
    brown = tmp_path / "ca01"
    brown.write_text(
        "\n\n\tThe/at jury/nn said/vbd ``/`` no/at ''/'' ,/, (/( it/pps )/) ./.\n\n\n\tNext/ap ./.\n"
    )
    # Quotes keep the spaces inside them (the shipped draft's corpus was read this way).
    assert corpora.read_brown(brown) == 'The jury said " no ", (it).\n\nNext.'
    fortunes = tmp_path / "fortunes"
    fortunes.write_text("one\nline\n%\ntwo\n%\n")
    assert corpora.read_fortunes(fortunes) == "one\nline\n\ntwo"


def test_windows_are_distinct_and_seeded():
    stream = torch.arange(1000, dtype=torch.int32)
    w = D.windows(stream, 10, 50, seed=0)
    assert w.shape == (50, 10) and w[:, 0].unique().numel() == 50
    assert torch.equal(w, D.windows(stream, 10, 50, seed=0))
    assert torch.equal(w[:, 1:] - w[:, :-1], torch.ones(50, 9, dtype=torch.int32))


def test_kept_vocab_ranks_by_predictions_then_inputs():
    teacher = {
        "top_ids": torch.tensor([[[5, 0], [5, 0], [7, 0], [9, 0]]]),  # argmax 5, 5, 7, 9
        "ids": torch.tensor([[9, 9, 3, 3]]),
    }
    assert D.kept_vocab(teacher, 12, 4).tolist() == [5, 9, 7, 3]
    assert D.draft_coverage(teacher, torch.tensor([5, 9])) == 0.75


def _draft_for(target: Transformer, kept: int) -> tuple[Transformer, D.DistillConfig]:
    cfg = D.DistillConfig(kept_vocab=kept, hidden_size=16, layers=1, heads=2, kv_heads=1,
                          intermediate_size=32, batch_size=8, seq_len=24, peak_lr=1e-2,
                          warmup_steps=5, topk=8, checkpoint_every=10)  # fmt: skip
    config = D.draft_config(target.config, cfg)
    return Transformer(config, dtype=torch.float32), cfg


def _teacher_data(target: Transformer, cfg: D.DistillConfig) -> dict:
    ids = torch.randint(0, target.config.vocab_size, (48, cfg.seq_len),
                        generator=torch.Generator().manual_seed(0), dtype=torch.int32)  # fmt: skip
    top_ids, top_logp = D.teacher_topk(target, ids, cfg.topk)
    return {"ids": ids, "top_ids": top_ids, "top_logp": top_logp}


def test_training_raises_agreement_and_resumes_exactly(tmp_path):
    target, _ = tiny_pair(num_experts=0)
    target = target.float()
    draft, cfg = _draft_for(target, 48)
    teacher = _teacher_data(target, cfg)
    vocab = D.kept_vocab(teacher, 64, 48)
    D.init_draft(draft, target, vocab, seed=0)
    before = D.agreement(draft, teacher)["greedy_agreement"]
    cfg.steps = 60
    D.train_draft(draft, teacher, cfg, tmp_path / "a")
    after = D.agreement(draft, teacher)
    assert after["greedy_agreement"] > before + 0.1, (before, after)
    assert 0 < after["expected_acceptance_t1"] <= 1

    # 30 steps, stop, resume to 60: the same weights as one uninterrupted run.
    resumed, _ = _draft_for(target, 48)
    D.init_draft(resumed, target, vocab, seed=0)
    D.train_draft(resumed, teacher, cfg, tmp_path / "b", stop_at=30)
    again, _ = _draft_for(target, 48)
    again.set_vocab(vocab)
    D.train_draft(again, teacher, cfg, tmp_path / "b")
    for (name, a), b in zip(draft.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_exported_config_is_a_trimmed_llama():
    target, _ = tiny_pair(num_experts=0)
    draft, _ = _draft_for(target, 20)
    c = draft.config
    assert (c.model_type, c.vocab_size, c.trimmed_vocab_size) == ("llama", 64, 20)
    assert ModelConfig.from_dict(c.to_dict()) == c
