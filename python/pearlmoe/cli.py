"""The `pearlmoe` command: generate, bench, info, plan.

    pearlmoe generate "def fibonacci(n):" --mode pearl
    pearlmoe bench --prompts 8 --max-new-tokens 64
    pearlmoe info DIR
    pearlmoe plan hunyuan-large --gpus 8 --gpu-mem 80 --weights fp8

Defaults use the embedded pair (pearlmoe/embedded/tiny-target and tiny-draft) on the best device.
Every error is one line on stderr and exit status 2; never a traceback.
"""

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from . import ops
from .decode import generate, pearl_generate, runner, speculative_generate
from .decode.common import GATES, LOOKUP, MAX_GAMMA, measured_curve
from .decode.cost_model import plan
from .decode.pearl import draft_thread_lent
from .decode.runner import BACKENDS, compile_available, default_backend
from .model import ModelConfig, Transformer, from_pretrained
from .model.config import estimate
from .model.gguf_checkpoint import is_gguf
from .model.named import draft_for, resolve
from .train.data import held_out_prompts
from .train.presets import EMBEDDED, TOKENIZER

TARGET, DRAFT = EMBEDDED / "tiny-target", EMBEDDED / "tiny-draft"
MODES = ("ar", "speculative", "pearl")


class UsageError(Exception):
    """A bad flag or argument: reported as one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print the whole usage block
        raise UsageError(message)


# ---- loading ---------------------------------------------------------------------------------


def best_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        # bf16 on GPUs, and on CPUs that multiply bf16 natively (AVX512-BF16), where pearlmoe's
        # kernels run it ~1.5-2x faster than fp32 (bench/NOTES.md); fp32 on other CPUs.
        if device.startswith("cuda") or ops.cpu_isa() == "avx512bf16":
            return torch.bfloat16
        return torch.float32
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def _backend(name: str, device: str) -> str:
    if name == "auto":
        return default_backend(device)
    if name == "cudagraph" and not device.startswith("cuda"):
        raise UsageError("--backend cudagraph replays CUDA graphs: it needs --device cuda")
    if name == "fused" and device != "cpu":
        raise UsageError("--backend fused is the CPU's one-call step: it needs --device cpu")
    if name == "compile" and device == "cpu" and not compile_available():
        raise UsageError("--backend compile needs a C++ compiler (g++) on the CPU")
    return name


def _note(text: str) -> None:
    print(f"[pearlmoe] {text} ...", file=sys.stderr, flush=True)


def load_tokenizer(directory: Path):
    """A model's tokenizer: its directory's tokenizer.json, or rebuilt from a GGUF's metadata."""
    from tokenizers import Tokenizer

    from .model.gguf_checkpoint import is_gguf, read_tokenizer

    directory = resolve(directory)
    if is_gguf(directory):
        return read_tokenizer(directory)
    path = Path(directory) / TOKENIZER
    if not path.exists():
        # A draft distilled for a named target uses the target's tokenizer ("tokenizer_from").
        source = ModelConfig.from_file(directory).extra.get("tokenizer_from")
        if source is None:
            raise FileNotFoundError(f"no {TOKENIZER} in {directory}")
        return load_tokenizer(resolve(source))
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises its own exception type
        raise ValueError(f"{path}: not a readable tokenizer ({err})") from None


def check_tokenizers(target_dir: Path, draft_dir: Path) -> None:
    """Draft and target must map text to the same ids, or verification compares nonsense."""
    a, b = load_tokenizer(target_dir), load_tokenizer(draft_dir)
    if a.get_vocab(with_added_tokens=True) != b.get_vocab(with_added_tokens=True):
        raise ValueError(
            f"incompatible tokenizers: the draft's ({draft_dir}) and the target's ({target_dir}) "
            "assign different ids (draft and target must share a tokenizer)"
        )


def load_model(
    directory: Path, device: str, dtype: torch.dtype, quantized: bool = False
) -> Transformer:
    """A model directory, a GGUF file, or a named model (pearlmoe.model.named); ``quantized``
    keeps a GGUF file's quantised projections in their blocks."""
    path = resolve(directory)
    if not path.is_dir() and not is_gguf(path):
        raise FileNotFoundError(f"model directory {path} does not exist")
    if quantized and not is_gguf(path):
        raise UsageError(f"--quantized keeps a GGUF file's blocks; {path} is not a .gguf file")
    return from_pretrained(path, dtype=dtype, device=device, quantized=quantized)


def _check_device(device: str) -> str:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UsageError(f"--device {device!r}: expected cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available on this machine")
    if dev.type == "cuda" and not torch.ops.pearlmoe.built_with_cuda():
        raise UsageError(f"--device {device}: this pearlmoe build has no CUDA kernels (rebuild "
                         "with PEARLMOE_WITH_CUDA=ON against a CUDA torch)")  # fmt: skip
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {device}: expected cpu, cuda or cuda:N")
    return device


# ---- decoding --------------------------------------------------------------------------------


def decode(
    mode: str,
    target: Transformer,
    draft: Transformer | None,
    prompt: list[int],
    max_new_tokens: int,
    gamma: int | None,
    temperature: float,
    top_p: float | None,
    seed: int,
    on_tokens: Callable[[list[int]], None] | None = None,
    backend: str = "eager",
    lookup: int = LOOKUP,
    gate: bool | None = None,
) -> tuple[list[int], dict]:
    """One prompt in one mode: the new tokens and the run's statistics. ``seconds`` is decoding
    only; compiling or capturing the steps is ``warmup_seconds``."""
    generator = torch.Generator(device=target.device).manual_seed(seed)
    common = dict(temperature=temperature, top_p=top_p, eos_token_id=target.config.eos_token_id,
                  generator=generator, backend=backend)  # fmt: skip
    if mode == "ar":
        start = time.perf_counter()
        first: list[float] = []

        def step(tokens: list[int | None]) -> None:
            if not first:
                first.append(time.perf_counter())
            if on_tokens is not None and tokens[0] is not None:
                on_tokens([tokens[0]])

        out = generate(target, [prompt], max_new_tokens, callback=step, **common)[0]
        seconds = time.perf_counter() - start
        return out, {"mode": mode, "tokens": len(out), "seconds": seconds,
                     "tokens_per_second": len(out) / seconds if seconds else 0.0}  # fmt: skip
    run = pearl_generate if mode == "pearl" else speculative_generate

    def chunk(tokens: list[list[int]]) -> None:
        if on_tokens is not None and tokens[0]:
            on_tokens(tokens[0])

    outs, stats = run(target, draft, [prompt], max_new_tokens, gamma=gamma, callback=chunk,
                      lookup=lookup, gate=gate, **common)  # fmt: skip
    seconds = stats.seconds
    return outs[0], {
        "mode": mode, "tokens": len(outs[0]), "seconds": seconds,
        "tokens_per_second": len(outs[0]) / seconds if seconds else 0.0,
        "gamma": stats.gamma, "mean_accepted_tokens": stats.mean_accepted_tokens,
        "acceptance_rate": stats.acceptance_rate, "target_calls": stats.target_calls,
        **stats.extra,
    }  # fmt: skip


def warm_up(mode: str, target: Transformer, draft: Transformer | None, prompt: list[int],
            backend: str, gamma: int | None, temperature: float) -> float:  # fmt: skip
    """Compile or capture the steps a mode uses, and measure the cost curve, before the timed
    run; returns the seconds it took."""
    start = time.perf_counter()
    if backend != "eager" or (mode != "ar" and gamma is None):
        decode(mode, target, draft, prompt[:8], 4, gamma, temperature, None, 0, backend=backend)
    return time.perf_counter() - start


def choose_mode(target: Transformer, draft: Transformer, backend: str) -> tuple[str, dict]:
    """--mode auto, greedy: the mode (and γ) the cost model predicts fastest at a prior
    acceptance rate of 0.6, PEARL's on its sides' own costs (half the CPU threads each, and the
    draft's thread helping the target once it has drafted where the greedy fused rounds lend it);
    every mode's prediction comes with it."""
    curve = measured_curve(target, draft, 1, "speculative", backend)
    helped = draft_thread_lent(target, draft, backend)
    pearl_curve = measured_curve(target, draft, 1, "pearl", backend, helped)
    best = plan(curve, 0.6, pearl_curve=pearl_curve)
    return best.mode, best.predicted


# New tokens each mode decodes of the prompt when --mode auto measures the modes (sampling).
PROBE_TOKENS = 32


def probe_modes(
    target: Transformer, draft: Transformer, prompt: list[int], backend: str,
    temperature: float, top_p: float | None, seed: int,
) -> tuple[str, dict]:  # fmt: skip
    """--mode auto, sampling: the fastest mode and each mode's (γ, tokens/s) decoding
    PROBE_TOKENS of the prompt (after a warm-up decode). The cost curve times greedy steps;
    sampled rounds carry host work it does not see (0.5-1.0 ms a round on the 2-core VM, where
    it predicted speculative 1.35x AR and the loop ran 0.47x: bench/NOTES.md v19), so this
    measures."""
    measured = {}
    for mode in MODES:
        pair = draft if mode != "ar" else None
        warm_up(mode, target, pair, prompt, backend, None, temperature)
        _, stats = decode(mode, target, pair, prompt, PROBE_TOKENS, None, temperature, top_p,
                          seed, backend=backend)  # fmt: skip
        measured[mode] = (stats.get("gamma") or 0, stats["tokens_per_second"])
    return max(measured, key=lambda m: measured[m][1]), measured


class _Streamer:
    """Prints text as tokens arrive; holds back a partial UTF-8 character until it completes."""

    def __init__(self, tokenizer, out=sys.stdout) -> None:
        self.tokenizer, self.out = tokenizer, out
        self.ids: list[int] = []
        self.printed = 0

    def __call__(self, tokens: list[int]) -> None:
        self.ids.extend(tokens)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        self.out.write(text[self.printed :])
        self.out.flush()
        self.printed = len(text)

    def finish(self) -> None:
        """Print what is still held back (a character cut off at the end of generation)."""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        self.out.write(text[self.printed :])
        self.printed = len(text)


# ---- commands --------------------------------------------------------------------------------


def _check_dirs(args, draft: bool) -> None:
    for flag, path in (("--target", args.target), ("--draft", args.draft))[: 1 + draft]:
        resolved = resolve(path)  # a named model that is not installed says how to install it
        if not resolved.is_dir() and not is_gguf(resolved):
            raise FileNotFoundError(f"{flag} {path}: no such model directory or .gguf file")


def _chat_template(target: Path) -> str | None:
    """The target's chat template (a GGUF file's own), or None."""
    from .model.gguf_checkpoint import chat_template

    path = resolve(target)
    return chat_template(path) if is_gguf(path) else None


def chat_prompt(target: Path, text: str) -> str:
    """``text`` as one user turn in the target's chat template, ready for the reply."""
    template = _chat_template(target)
    if template is None:
        raise UsageError(f"--chat: {target} has no chat template")
    from .model.gguf_checkpoint import render_chat_template

    return render_chat_template(template, [{"role": "user", "content": text}])


def _load_pair(args, needs_draft: bool):
    """What generate and serve set up from their flags: (device, dtype, backend, tokenizer,
    target, draft or None)."""
    _check_dirs(args, draft=needs_draft)
    device = _check_device(args.device)
    dtype = _dtype(args.dtype, device)
    backend = _backend(args.backend, device)
    tokenizer = load_tokenizer(args.target)
    if needs_draft:
        check_tokenizers(args.target, args.draft)
    target = load_model(args.target, device, dtype, args.quantized)
    draft = load_model(args.draft, device, dtype) if needs_draft else None
    return device, dtype, backend, tokenizer, target, draft


def cmd_generate(args) -> int:
    device, dtype, backend, tokenizer, target, draft = _load_pair(args, args.mode != "ar")
    text = chat_prompt(args.target, args.prompt) if args.chat else args.prompt
    prompt = tokenizer.encode(text).ids
    if not prompt:
        raise UsageError("PROMPT is empty: give at least one character of text")
    runner.notify = _note
    mode = args.mode
    if mode == "auto":
        if args.temperature <= 0:
            mode, predicted = choose_mode(target, draft, backend)
            how = "predicted"
        else:
            mode, predicted = probe_modes(target, draft, prompt, backend, args.temperature,
                                          args.top_p, args.seed)  # fmt: skip
            how = f"measured over {PROBE_TOKENS} sampled"
        _note(f"mode auto: {how} tokens/s " + ", ".join(
            f"{m} {r:.0f}" + (f" (gamma {g})" if g else "") for m, (g, r) in predicted.items()
        ) + f"; running {mode}")  # fmt: skip
    warm = warm_up(mode, target, draft, prompt, backend, args.gamma, args.temperature)
    print(args.prompt + ("\n" if args.chat else ""), end="", flush=True)
    streamer = _Streamer(tokenizer)
    _, stats = decode(mode, target, draft, prompt, args.max_new_tokens, args.gamma,
                      args.temperature, args.top_p, args.seed, streamer, backend,
                      args.lookup, GATES[args.gate])  # fmt: skip
    streamer.finish()
    line = (f"\n\n[{mode}] {stats['tokens']} tokens in {stats['seconds']:.2f} s: "
            f"{stats['tokens_per_second']:.1f} tokens/s")  # fmt: skip
    if mode != "ar":
        gammas = "->".join(map(str, stats.get("gammas", [stats["gamma"]])))
        line += (f", gamma {gammas}, {stats['mean_accepted_tokens']:.2f} tokens per target "
                 f"call, acceptance rate {stats['acceptance_rate']:.2f}")  # fmt: skip
        plain = stats.get("gate", {}).get("tokens", {}).get("plain", 0)
        if plain:  # the speculation gate found plain steps faster for a while
            line += f", {plain / max(stats['tokens'], 1):.0%} of tokens by plain steps"
    line += f" ({device}, {str(dtype).removeprefix('torch.')}, {backend}"
    print(line + (f"; warm-up {warm:.1f} s)" if warm >= 0.05 else ")"))
    if args.vs_ar and mode != "ar":
        warm_up("ar", target, None, prompt, backend, None, args.temperature)
        ar, ratios = vs_ar(mode, target, draft, prompt, args, backend)
        median = statistics.median(ratios)
        print(f"[ar] {ar['tokens']} tokens in {ar['seconds']:.2f} s: "
              f"{ar['tokens_per_second']:.1f} tokens/s; same run, {len(ratios)} alternating "
              f"pairs: {mode} is {median:.2f}x autoregressive (median; "
              f"{min(ratios):.2f}-{max(ratios):.2f}x)")  # fmt: skip
    return 0


VS_AR_PAIRS = 7


def vs_ar(mode: str, target, draft, prompt: list[int], args, backend: str) -> tuple[dict, list]:
    """The speed-up of ``mode`` over autoregressive decoding of the same prompt: the ratios of
    VS_AR_PAIRS pairs of decodes, each pair in alternating order so that a drift of the machine's
    speed falls on both. One decode of the demo's 96 tokens takes 20-60 ms on the 2-core VM, where
    a single pair read anything from 0.57x to 1.17x in four runs of one minute. Returns the last
    autoregressive decode's statistics and the ratios."""
    ratios, ar = [], None
    for i in range(VS_AR_PAIRS):
        rates = {}
        for m in (mode, "ar") if i % 2 == 0 else ("ar", mode):
            _, st = decode(m, target, draft, prompt, args.max_new_tokens, args.gamma,
                           args.temperature, args.top_p, args.seed, None, backend, args.lookup,
                           GATES[args.gate])  # fmt: skip
            rates[m] = st["tokens_per_second"]
            if m == "ar":
                ar = st
        ratios.append(rates[mode] / rates["ar"])
    return ar, ratios


def cmd_serve(args) -> int:
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise UsageError("serve needs starlette and uvicorn: "
                         "pip install 'pearlmoe[serve]'") from None  # fmt: skip
    from .serve import Engine
    from .serve.server import ServedModel, serve

    device, dtype, backend, tokenizer, target, draft = _load_pair(args, args.mode != "ar")
    context = args.context or min(target.config.max_position_embeddings, 2048)
    eos = target.config.eos_token_id
    eos = frozenset([] if eos is None else [eos] if isinstance(eos, int) else eos)
    name = args.model_name or Path(args.target).name.removesuffix(".gguf")  # as the user named it
    runner.notify = _note
    engine = Engine(target, draft, args.mode, args.max_batch, context, backend, args.gamma,
                    args.max_prefill_tokens, args.gate == "on")  # fmt: skip
    warm = engine.warmup()
    model = ServedModel(name, tokenizer, _chat_template(args.target), eos, int(time.time()))
    serve(engine, model, args.host, args.port, ready=lambda url: _note(
        f"serving {name} ({args.mode}, batch up to {args.max_batch}, context {context}, "
        f"{device} {str(dtype).removeprefix('torch.')} {backend}; warm-up {warm:.1f} s) at "
        f"{url}/v1"))  # fmt: skip
    return 0


def cmd_bench(args) -> int:
    from . import decode_bench

    _check_dirs(args, draft=True)
    device = _check_device(args.device)
    backend = _backend(args.backend, device)
    names = args.dtypes.split(",")
    if names == ["auto"]:  # the CLI's default, and fp32 beside it when that default is bf16
        auto = _dtype("auto", device)
        dtypes = [auto] + ([torch.float32] if auto != torch.float32 else [])
    else:
        bad = [n for n in names if n not in ("bfloat16", "float16", "float32")]
        if bad:
            raise UsageError(f"--dtypes: unknown dtype {bad[0]!r} (bfloat16, float16, float32)")
        dtypes = [_dtype(n, device) for n in names]
    check_tokenizers(args.target, args.draft)
    tokenizer = load_tokenizer(args.target)
    prompts = held_out_prompts(tokenizer, args.prompts * args.batch, args.prompt_tokens)
    if len(prompts) < args.batch:
        raise UsageError(f"--prompt-tokens {args.prompt_tokens}: too few held-out files are "
                         f"that long for a batch of {args.batch}")  # fmt: skip
    batches = [prompts[i : i + args.batch] for i in range(0, len(prompts), args.batch)]
    batches = [b for b in batches if len(b) == args.batch]
    if len(prompts) < args.prompts * args.batch:
        print(f"note: only {len(prompts)} held-out files have {args.prompt_tokens} tokens")
    runner.notify = _note
    result = {
        "date": time.strftime("%Y-%m-%d"), "device": _device_name(device), "backend": backend,
        "threads": torch.get_num_threads(), "cpu_isa": ops.cpu_isa(), "batch": args.batch,
        "target": str(args.target), "draft": str(args.draft), "prompts": len(batches),
        "prompt_tokens": args.prompt_tokens, "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature, "gamma": args.gamma, "lookup": args.lookup,
        "gate": args.gate, "repeats": args.repeats, "runs": [],
    }  # fmt: skip
    for dtype in dtypes:
        target = load_model(args.target, device, dtype, args.quantized)
        draft = load_model(args.draft, device, dtype)
        run = decode_bench.bench_dtype(target, draft, batches, args, backend, dtype, args.batch)
        result["runs"].append(run)
        decode_bench.print_run(run)
    same = (
        "n/a (sampled: the modes' draws differ; tests check their distributions)"
        if args.temperature > 0
        else [r["greedy_outputs_identical"] for r in result["runs"]]
    )
    print(f"device {result['device']}, backend {backend}, batch {args.batch}; greedy outputs "
          f"identical across modes: {same}")  # fmt: skip
    try:
        decode_bench.write(result, Path(args.out))
    except ImportError:
        raise UsageError("the plot needs matplotlib: pip install 'pearlmoe[bench]'") from None
    if any(r["greedy_outputs_identical"] is False for r in result["runs"]):
        print("error: speculative/PEARL greedy output differs from autoregressive", file=sys.stderr)
        return 1
    return 0


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    import platform

    return f"CPU {platform.machine()}, {torch.get_num_threads()} threads"


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def cmd_info(args) -> int:
    name = str(args.dir)
    builtin = (BUILTIN[name] or name) if name in BUILTIN else None  # a flagship config by name
    directory = CONFIGS / f"{builtin}.json" if builtin else resolve(args.dir)
    if not directory.exists():
        raise FileNotFoundError(f"model directory {directory} does not exist")
    if is_gguf(directory):
        from .model.gguf_checkpoint import read_config

        config = read_config(directory)
    else:
        config = ModelConfig.from_file(directory)
    est = estimate(config)
    print(f"{directory}: {config.to_dict()['architectures'][0]} ({config.model_type})")
    for key, value in sorted(config.to_dict().items()):
        if key != "architectures" and value is not None:
            print(f"  {key:<28}{value}")
    print(f"total parameters       {_count(est.total_params)} ({est.total_params:,})")
    print(f"active per token       {_count(est.active_params)} ({est.active_params:,})")
    print(f"KV cache per token     {est.kv_bytes_per_token:,} bytes (bf16)")
    return 0


CONFIGS = Path(__file__).resolve().parent / "configs"
BUILTIN = {"hunyuan-large": "hunyuan-large-instruct", "hunyuan-large-instruct": None,
           "hunyuan-large-pretrain": None, "mixtral-8x7b": None, "qwen1.5-moe-a2.7b": None,
           "qwen3-30b-a3b": None, "qwen3-235b-a22b": None, "olmoe-1b-7b": None,
           "glm-4.5": None, "glm-4.5-air": None}  # fmt: skip
WEIGHT_BYTES = {"bf16": 2, "fp16": 2, "fp8": 1, "int4": 0.5}


def cmd_plan(args) -> int:
    from .distributed.plan import format_plan

    name = args.config
    if name in BUILTIN:
        path = CONFIGS / f"{BUILTIN[name] or name}.json"
    else:
        path = Path(name)
        if not path.exists():
            raise FileNotFoundError(
                f"CONFIG {name}: no such file or directory (or a built-in: "
                f"{', '.join(sorted(BUILTIN))})"
            )
    config = ModelConfig.from_file(path)
    print(f"{name}: {config.to_dict()['architectures'][0]}")
    print(format_plan(config, args.gpus, args.gpu_mem, args.batch, WEIGHT_BYTES[args.weights],
                      args.kv_bytes, args.reserve, args.weights))  # fmt: skip
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pearlmoe", description="Hunyuan-style MoE models with PEARL decoding.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def models(p) -> None:
        p.add_argument(
            "--target",
            type=Path,
            default=TARGET,
            help="target model: a directory, a .gguf file or a name (smollm2-135m)",
        )
        p.add_argument(
            "--draft",
            type=Path,
            help="draft model: a directory, a .gguf file or a name (default: the target's "
            "shipped draft, smollm2-135m-draft for smollm2-135m, else the embedded tiny-draft)",
        )
        p.add_argument("--device", default=best_device())
        p.add_argument("--quantized", action="store_true",
                       help="a GGUF target's Q4_0/Q4_1/Q8_0 projections stay in their blocks "
                       "(pearlmoe.qlinear) instead of being expanded to --dtype")  # fmt: skip
        p.add_argument(
            "--gamma",
            type=_gamma,
            help=f"draft length, 1..{MAX_GAMMA} (default: chosen from the measured cost curve)",
        )
        p.add_argument(
            "--backend",
            default="auto",
            choices=["auto", *BACKENDS],
            help="auto: fused on the CPU (compile for models it does not cover), cudagraph on CUDA",
        )
        p.add_argument("--seed", type=int, default=0)  # fmt: skip

    def lookup(p) -> None:
        p.add_argument("--lookup", type=_non_negative_int, default=LOOKUP, metavar="N",
                       help="greedy drafts on fused CPU steps take the token after an earlier "
                       "occurrence of the last N tokens where there is one (prompt lookup); "
                       f"0: the draft model alone (default {LOOKUP})")  # fmt: skip
        p.add_argument("--gate", choices=list(GATES), default="auto",
                       help="greedy decoding on fused CPU steps takes plain steps of the target "
                       "alone while those measure faster than rounds (as at batch 4 on a small "
                       "CPU): on, off (speculate every round), auto (on for PEARL at batches "
                       "of more than one sequence)")  # fmt: skip

    g = sub.add_parser("generate", help="stream a continuation of PROMPT")
    g.add_argument("prompt", metavar="PROMPT")
    g.add_argument("--chat", action="store_true",
                   help="wrap PROMPT as a user turn in the model's chat template")  # fmt: skip
    g.add_argument(
        "--mode",
        choices=[*MODES, "auto"],
        default="pearl",
        help="auto: the mode the cost model predicts fastest",
    )
    g.add_argument("--vs-ar", action="store_true",
                   help="then time 7 alternating pairs of decodes in this mode and "
                        "autoregressively and print the median speed-up")  # fmt: skip
    g.add_argument("--temperature", type=_non_negative, default=0.0)
    g.add_argument("--top-p", type=_probability)
    g.add_argument("--max-new-tokens", type=_positive, default=128)
    models(g)
    lookup(g)
    g.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="auto: bf16 on GPUs and AVX512-BF16 CPUs, else fp32")  # fmt: skip
    g.set_defaults(fn=cmd_generate)

    b = sub.add_parser("bench", help="AR vs speculative vs PEARL on held-out prompts")
    b.add_argument(
        "--prompts",
        type=_positive,
        default=16,
        help="held-out prompts (per batch row); 16 leave ~450-650 of the draft model's own "
        "drafts a pass",
    )
    b.add_argument("--prompt-tokens", type=_positive, default=64)
    b.add_argument("--max-new-tokens", type=_positive, default=128)
    b.add_argument("--temperature", type=_non_negative, default=0.0)
    b.add_argument("--batch", type=_positive, default=1, help="sequences decoded together")
    b.add_argument("--repeats", type=_positive, default=1,
                   help="passes over the prompts, the modes taking turns in each (more average a "
                   "noisy machine's drift out of the ratios)")  # fmt: skip
    b.add_argument("--out", default="bench/out", help="directory for the JSON and PNG")
    models(b)
    lookup(b)
    b.add_argument("--dtypes", default="auto", help="comma-separated; auto: the CLI's default "
                   "dtype, and float32 beside it when that is bf16")  # fmt: skip
    b.set_defaults(fn=cmd_bench)

    sv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (continuous batching)")
    sv.add_argument("--mode", choices=MODES, default="ar")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=_positive, default=8000)
    sv.add_argument("--max-batch", type=_positive, default=8, help="sequences decoded together")
    sv.add_argument("--context", type=_positive,
                    help="tokens per request, prompt included (default: the model's, at most "
                    "2048)")  # fmt: skip
    sv.add_argument("--model-name", help="the name clients ask for (default: the model's)")
    sv.add_argument("--max-prefill-tokens", type=_positive, default=64,
                    help="prompt tokens prefilled between two rounds (at least one prompt): "
                    "lower keeps running streams smoother, higher starts new ones "
                    "sooner")  # fmt: skip
    models(sv)
    sv.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    sv.add_argument("--gate", choices=["off", "on"], default="off",
                    help="on: speculative and PEARL rounds give way to plain steps of the target "
                    "while those measure faster, per batch size past one sequence, while every "
                    "request is greedy")  # fmt: skip
    sv.set_defaults(fn=cmd_serve)

    pl = sub.add_parser("plan", help="memory per GPU and longest context, EP and TP layouts")
    pl.add_argument("config", metavar="CONFIG", help="config.json, a model directory, or "
                    + ", ".join(sorted(BUILTIN)))  # fmt: skip
    pl.add_argument("--gpus", type=_positive, required=True)
    pl.add_argument("--gpu-mem", type=_gigabytes, required=True, metavar="GB")
    pl.add_argument("--batch", type=_positive, default=1)
    pl.add_argument("--weights", choices=sorted(WEIGHT_BYTES), default="bf16")
    pl.add_argument("--kv-bytes", type=int, choices=[1, 2, 4], default=2)
    pl.add_argument("--reserve", type=_non_negative, default=4.0, metavar="GB",
                    help="per GPU for activations and workspace")  # fmt: skip
    pl.set_defaults(fn=cmd_plan)

    i = sub.add_parser("info", help="config, parameters and KV bytes per token of a model")
    i.add_argument("dir", metavar="DIR", nargs="?", default=TARGET,
                   help="a model directory, a .gguf file, a named model, or a built-in config: "
                   + ", ".join(sorted(BUILTIN)))  # fmt: skip
    i.set_defaults(fn=cmd_info)
    return parser


def _int_at_least(low: int, what: str) -> Callable[[str], int]:
    """An argparse type: an integer >= low, else an error saying what was expected."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return parse


_positive = _int_at_least(1, "a positive integer")


def _gamma(text: str) -> int:
    value = _positive(text)
    if value > MAX_GAMMA:
        raise argparse.ArgumentTypeError(f"expected at most {MAX_GAMMA}, got {value}")
    return value


_non_negative_int = _int_at_least(0, "an integer >= 0")


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def _gigabytes(text: str) -> float:
    value = _non_negative(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a memory size in GB > 0, got {text}")
    return value


def _probability(text: str) -> float:
    value = _non_negative(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a probability in (0, 1], got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if hasattr(args, "draft") and args.draft is None:  # the target's own draft, if it ships one
            args.draft = Path(draft_for(args.target) or DRAFT)
        return args.fn(args)
    except UsageError as err:
        print(f"pearlmoe: error: {err}", file=sys.stderr)
    except (OSError, ValueError) as err:  # CheckpointError is a ValueError
        print(f"pearlmoe: error: {err}", file=sys.stderr)
    except KeyboardInterrupt:
        print("\npearlmoe: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # an op refusing its input, CUDA out of memory, ...
        if os.environ.get("PEARLMOE_DEBUG"):
            raise
        text = str(err).strip()
        first = text.splitlines()[0] if text else type(err).__name__
        print(f"pearlmoe: error: {first} (PEARLMOE_DEBUG=1 shows the traceback)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
