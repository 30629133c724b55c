"""The embedded default pair, reproducible from `python -m pearlmoe.train --preset NAME`.

tiny-target: Hunyuan-Large scaled down (shared expert + 8 routed top-1 SwiGLU experts, GQA 4/2,
CLA over pairs of layers, QK-norm after RoPE), 10.0 M parameters, 3.8 M active per token.
tiny-draft: a dense Llama-style model about a tenth of that size, trained on the same corpus and
tokenizer and distilled from the target (KL on its logits), which is what raises their agreement,
half of each batch on the target's own continuations (on-policy data, pearlmoe.train.on_policy).

Both train on the Python standard library's sources (held-out split by file), with fixed seeds.
"""

import json
import math
import platform
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..model import ModelConfig, Transformer, from_pretrained, save_pretrained
from ..model.named import EMBEDDED
from . import data
from .on_policy import decode_agreement, on_policy_windows
from .trainer import TrainConfig, train

TOKENIZER = "tokenizer.json"
VOCAB = 4096
SPECIALS = dict(bos_token_id=None, eos_token_id=0, pad_token_id=1)  # data.EOS, data.PAD


@dataclass
class Preset:
    name: str
    config: ModelConfig
    train: TrainConfig
    teacher: str | None = None  # preset whose embedded weights it distils from


PRESETS = {
    "tiny-target": Preset(
        "tiny-target",
        ModelConfig(
            vocab_size=VOCAB,
            hidden_size=256,
            num_hidden_layers=6,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=192,
            num_experts=8,
            moe_topk=1,
            num_shared_expert=1,
            use_mixed_mlp_moe=True,
            use_cla=True,
            cla_share_factor=2,
            use_qk_norm=True,
            rope_theta=10000.0,
            max_position_embeddings=2048,
            torch_dtype="bfloat16",
            **SPECIALS,
        ),
        TrainConfig(
            steps=2400,
            batch_size=8,
            seq_len=256,
            peak_lr=3e-3,
            warmup_steps=50,
            eval_every=200,
            seed=0,
        ),
    ),
    "tiny-draft": Preset(
        "tiny-draft",
        ModelConfig(
            vocab_size=VOCAB,
            hidden_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            intermediate_size=384,
            model_type="llama",
            rope_theta=10000.0,
            max_position_embeddings=2048,
            torch_dtype="bfloat16",
            **SPECIALS,
        ),
        TrainConfig(
            steps=4000,
            batch_size=8,
            seq_len=256,
            peak_lr=3e-3,
            warmup_steps=50,
            eval_every=200,
            seed=1,
            distill=0.9,
            # Half of each batch: the target's own continuations of training-set prefixes
            # (greedy and T = 1), the text a draft meets while decoding (bench/NOTES.md v19).
            on_policy_windows=8192,
            on_policy_share=0.5,
        ),
        teacher="tiny-target",
    ),
}


def corpus(tokenizer_path: Path | None) -> tuple:
    """(tokenizer, train tokens [N], held-out tokens [M]); trains the tokenizer when no path."""
    from tokenizers import Tokenizer

    train_files, held_out_files = data.split_files(data.stdlib_files())
    train_texts = data.read(train_files)
    if tokenizer_path is None:
        tokenizer = data.train_tokenizer(train_texts, VOCAB)
    else:
        tokenizer = Tokenizer.from_file(str(tokenizer_path))
    return (
        tokenizer,
        data.encode(tokenizer, train_texts),
        data.encode(tokenizer, data.read(held_out_files)),
    )


def init_for_training(model: Transformer, seed: int) -> None:
    """N(0, 0.02) everywhere, residual output projections scaled by 1/sqrt(2L) (GPT-2), norms 1."""
    g = torch.Generator().manual_seed(seed)
    scale = 1 / math.sqrt(2 * model.config.num_hidden_layers)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 or name.endswith("layernorm"):
                p.fill_(1.0)
                continue
            std = 0.02 * (scale if name.endswith(("o_proj", "w2")) else 1.0)
            p.copy_(torch.randn(p.shape, generator=g) * std)


@torch.no_grad()
def held_out_metrics(
    model: Transformer,
    tokens: Tensor,
    windows: int = 64,
    seq_len: int = 256,
    other: Transformer | None = None,
) -> dict:
    """Mean NLL (nats/token) of the inference path on fixed held-out windows; with other, also the
    greedy top-1 agreement and the expected acceptance sum(min(p, q)) at temperature 1."""
    span = seq_len + 1
    count = min(windows, tokens.numel() // span)
    ids = tokens[: count * span].view(count, span).to(model.device)  # [W, S+1]
    nll, agree, accept, n = 0.0, 0.0, 0.0, 0
    for chunk in ids.split(8):
        logits = model(chunk[:, :-1])  # [b, S, V]
        targets = chunk[:, 1:].flatten()
        nll += F.cross_entropy(logits.flatten(0, 1), targets, reduction="sum").item()
        if other is not None:
            q = other(chunk[:, :-1])
            agree += (logits.argmax(-1) == q.argmax(-1)).sum().item()
            accept += torch.minimum(logits.softmax(-1), q.softmax(-1)).sum().item()
        n += chunk[:, 1:].numel()
    out = {"held_out_nll": nll / n, "held_out_ppl": math.exp(nll / n), "tokens": n}
    if other is not None:
        out |= {"greedy_agreement": agree / n, "expected_acceptance_t1": accept / n}
    return out


def run(
    name: str,
    out: Path | None = None,
    work: Path | None = None,
    steps: int | None = None,
    device: str = "cpu",
    resume: bool = False,
    teacher_dir: Path | None = None,
    progress: bool = True,
) -> dict:
    """Train a preset and export it (bf16 weights, config.json, tokenizer.json, training.json)."""
    preset = PRESETS[name]
    out = Path(out) if out else EMBEDDED / name
    work = Path(work) if work else Path("build/train") / name
    cfg = preset.train
    if steps is not None:
        cfg = TrainConfig(**{**asdict(cfg), "steps": steps})
    teacher = None
    tokenizer_path = None
    if preset.teacher is not None:
        teacher_dir = Path(teacher_dir) if teacher_dir else EMBEDDED / preset.teacher
        tokenizer_path = teacher_dir / TOKENIZER
        if not tokenizer_path.exists():
            raise FileNotFoundError(
                f"{name} shares {preset.teacher}'s tokenizer: train it first "
                f"(python -m pearlmoe.train --preset {preset.teacher}) or pass --teacher DIR"
            )
        if cfg.distill:
            teacher = from_pretrained(teacher_dir, dtype=torch.float32, device=device)
    started = time.perf_counter()
    tokenizer, train_tokens, eval_tokens = corpus(tokenizer_path)
    # The bf16 target (the dtype pearlmoe decodes in on the CPU by default) writes the on-policy
    # windows and is what the exported draft is measured against.
    target = None
    if preset.teacher is not None:
        target = from_pretrained(teacher_dir, dtype=torch.bfloat16, device=device)
    windows, decoding = None, time.perf_counter()
    if teacher is not None and cfg.on_policy_windows:
        windows = on_policy_windows(
            target, train_tokens, cfg.on_policy_windows, cfg.seq_len, cfg.on_policy_prompt,
            tuple(cfg.on_policy_temperatures), cfg.seed, work / "on_policy.safetensors",
        )  # fmt: skip
    decoding = time.perf_counter() - decoding
    torch.manual_seed(cfg.seed)
    model = Transformer(preset.config, dtype=torch.float32, device=device)
    init_for_training(model, cfg.seed)
    history = train(
        model, train_tokens, eval_tokens, cfg, work, resume=resume, progress=progress,
        teacher=teacher, on_policy=windows,
    )  # fmt: skip
    seconds = time.perf_counter() - started

    exported = Transformer(preset.config, dtype=torch.bfloat16, device=device)
    exported.load_state_dict({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()})
    exported.eval()
    save_pretrained(exported, out)
    if tokenizer_path is None:
        tokenizer.save(str(out / TOKENIZER))
    else:
        shutil.copyfile(tokenizer_path, out / TOKENIZER)
    report = {
        "preset": name,
        "parameters": sum(p.numel() for p in exported.parameters()),
        "train": asdict(cfg),
        "train_tokens_seen": cfg.steps * cfg.batch_size * cfg.seq_len,
        "corpus_tokens": {"train": train_tokens.numel(), "held_out": eval_tokens.numel()},
        "wall_seconds": round(seconds, 1),
        "on_policy_decode_seconds": round(decoding, 1),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip()
        + f", {torch.get_num_threads()} threads, {device}",
        "torch": torch.__version__,
        "final_train_loss": history[-1]["loss"] if history else None,
        "held_out": held_out_metrics(exported, eval_tokens),
    }
    if target is not None:
        report["vs_" + preset.teacher] = held_out_metrics(target, eval_tokens, other=exported)
        prompts = data.held_out_prompts(tokenizer, 32, 64)  # `pearlmoe bench`'s kind of prompt
        report["vs_" + preset.teacher]["decode"] = decode_agreement(target, exported, prompts, 128)
    (out / "training.json").write_text(json.dumps(report, indent=1) + "\n")
    return report
