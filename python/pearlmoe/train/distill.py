"""A draft distilled for a pretrained target: ``python -m pearlmoe.train.distill`` (SmolLM2-135M
by default). Every stage is resumable and deterministic (fixed seeds), its files under --work:

1. corpus: the stdlib sources (code) and fortunes + Brown (English, ``corpora``), encoded with the
   target's tokenizer, each split by file into train and held-out.
2. teacher: the target's top-k log-probabilities at every position of fixed 256-token windows,
   in shards of 32 windows (an interrupted run keeps the finished shards).
3. vocab: the draft scores only the V' tokens the target predicts most often (FR-Spec's
   frequency-ranked subset); the target's verification keeps decoding lossless regardless.
4. train: a small Llama (embedding initialised from the target's rows of the kept tokens, by
   PCA) learns the target's distribution over the kept tokens (soft cross-entropy on the top-k,
   plus the target's argmax as a hard label); checkpoints with the optimizer state.
5. export: bf16 weights, config.json, tokenizer, and training.json with the held-out greedy
   agreement on code and on English, measured against the live target.

Shape letters: W windows, S tokens per window, K teacher top-k, V' kept vocabulary, H hidden.
"""

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..model import ModelConfig, Transformer, from_pretrained, save_pretrained
from ..model.named import EMBEDDED
from . import corpora, data
from .schedule import lr_at
from .trainer import load_optimizer_tensors, optimizer_tensors


@dataclass
class DistillConfig:
    target: str = "smollm2-135m"
    seq_len: int = 256
    code_windows: int = 4000  # training windows drawn from the code stream
    english_windows: int = 7400  # ... and from the English one (nearly all of its 1.9 M tokens)
    labelled_windows: int = 11400  # the first ones of the shuffled set labelled and trained on
    held_out_windows: int = 64  # per domain
    topk: int = 16
    shard_windows: int = 32
    kept_vocab: int = 8192
    hidden_size: int = 384
    layers: int = 3
    heads: int = 6
    kv_heads: int = 2
    intermediate_size: int = 896
    steps: int = 3000
    batch_size: int = 16
    peak_lr: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 0.05
    hard_weight: float = 0.5  # weight of the cross-entropy on the target's argmax
    seed: int = 0
    checkpoint_every: int = 200


# ---- 1. corpus ------------------------------------------------------------------------------


def build_corpus(work: Path, tokenizer, corpus_dir: Path) -> dict[str, Tensor]:
    """{code,english}_{train,held_out} token streams (int32), cached in work/corpus.safetensors."""
    path = work / "corpus.safetensors"
    if path.exists():
        return load_file(str(path))
    files = data.stdlib_files()
    sources = {
        "code": list(zip(files, data.read(files), strict=True)),
        "english": corpora.english_texts(corpora.fetch(corpus_dir)),
    }
    streams = {}
    for domain, named in sources.items():  # (name, text) pairs; every 20th held out
        for part, docs in zip(("train", "held_out"), data.split_files(named), strict=True):
            streams[f"{domain}_{part}"] = data.encode(tokenizer, [t for _, t in docs]).int()
    save_file(streams, str(path))
    return streams


def windows(stream: Tensor, seq_len: int, count: int, seed: int) -> Tensor:
    """count distinct non-overlapping windows of a stream, in a seeded random order: [W, S]."""
    usable = stream.numel() // seq_len
    order = torch.randperm(usable, generator=torch.Generator().manual_seed(seed))[:count]
    return stream[: usable * seq_len].view(usable, seq_len)[order]


# ---- 2. teacher ------------------------------------------------------------------------------


@torch.no_grad()
def teacher_topk(target: Transformer, ids: Tensor, k: int, chunk: int = 4) -> tuple[Tensor, Tensor]:
    """The target's top-k log-probabilities at every position: ids [W, S] int32 ->
    (top ids [W, S, K] int32, log-probs [W, S, K] fp16)."""
    top_ids, top_logp = [], []
    for part in ids.long().split(chunk):
        logp = target(part).log_softmax(-1)  # [w, S, V] fp32
        values, indices = logp.topk(k, dim=-1)
        top_ids.append(indices.int())
        top_logp.append(values.half())
    return torch.cat(top_ids), torch.cat(top_logp)


def label(
    work: Path, target: Transformer, name: str, ids: Tensor, cfg: DistillConfig
) -> list[Path]:
    """Teacher shards of a window set (existing shards are kept: resumable)."""
    paths = []
    shards = ids.split(cfg.shard_windows)
    started, labelled = time.perf_counter(), 0
    for i, part in enumerate(shards):
        path = work / "teacher" / f"{name}-{i:05d}.safetensors"
        paths.append(path)
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        top_ids, top_logp = teacher_topk(target, part, cfg.topk)
        tmp = path.with_suffix(".tmp")
        save_file({"ids": part, "top_ids": top_ids, "top_logp": top_logp}, str(tmp))
        tmp.rename(path)
        labelled += part.numel()  # not the shards an earlier run left
        rate = labelled / (time.perf_counter() - started)
        print(f"teacher {name} shard {i + 1}/{len(shards)} ({rate:.0f} tok/s)", flush=True)
    return paths


def load_shards(paths: list[Path]) -> dict[str, Tensor]:
    parts = [load_file(str(p)) for p in paths]
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


# ---- 3. vocab --------------------------------------------------------------------------------


def kept_vocab(teacher: dict[str, Tensor], vocab_size: int, kept: int) -> Tensor:
    """The kept tokens, most often predicted (the target's argmax) first, ties broken by how
    often they occur as inputs, then by id: [V'] int64."""
    predicted = torch.bincount(teacher["top_ids"][..., 0].flatten().long(), minlength=vocab_size)
    seen = torch.bincount(teacher["ids"].flatten().long(), minlength=vocab_size)
    score = predicted.double() * (vocab_size + 1) + seen.double() / (seen.max() + 1)
    return score.argsort(descending=True, stable=True)[:kept]


# ---- 4. train --------------------------------------------------------------------------------


def draft_config(target: ModelConfig, cfg: DistillConfig) -> ModelConfig:
    return ModelConfig(
        vocab_size=target.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads,
        intermediate_size=cfg.intermediate_size,
        model_type="llama",
        rope_theta=target.rope_theta,
        rms_norm_eps=target.rms_norm_eps,
        max_position_embeddings=target.max_position_embeddings,
        bos_token_id=target.bos_token_id,
        eos_token_id=target.eos_token_id,
        pad_token_id=target.pad_token_id,
        trimmed_vocab_size=cfg.kept_vocab,
        torch_dtype="bfloat16",
    )


def init_draft(draft: Transformer, target: Transformer, vocab: Tensor, seed: int) -> None:
    """Small random layers (GPT-2 init); the embedding is the target's rows of the kept tokens
    (and their mean for the 'other' row) projected on their top principal components, scaled
    to std 0.02 per element, so the draft starts with the target's token geometry."""
    from .presets import init_for_training

    init_for_training(draft, seed)
    with torch.no_grad():
        rows = target.embed_tokens[vocab.to(target.device)].float().cpu()  # [V', Ht]
        rows = torch.cat([rows, rows.mean(0, keepdim=True)])  # [V'+1, Ht]
        centred = rows - rows.mean(0)
        _, _, v = torch.linalg.svd(centred, full_matrices=False)
        projected = centred @ v[: draft.config.hidden_size].T  # [V'+1, H]
        draft.embed_tokens.copy_(projected * (0.02 / projected.std()))
        draft.set_vocab(vocab)


def distill_loss(
    draft: Transformer, ids: Tensor, top_ids: Tensor, top_logp: Tensor, hard_weight: float
) -> tuple[Tensor, Tensor]:
    """Soft cross-entropy against the target's top-k distribution restricted to the kept
    tokens, plus hard_weight × the cross-entropy of the target's argmax (where it is kept).
    Returns (loss, greedy agreement of this batch)."""
    logits, _ = draft.forward_train(ids.long(), full_vocab=False)  # [B, S, V']
    logq = logits.log_softmax(-1)  # [B, S, V']
    rows = draft.vocab_rows[top_ids.long()]  # [B, S, K]; V' where not kept
    kept = rows < draft.config.trimmed_vocab_size
    p = top_logp.float().exp() * kept  # [B, S, K]
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-9)
    picked = logq.gather(-1, rows.clamp(max=logq.shape[-1] - 1))  # [B, S, K]
    soft = -(p * picked).sum(-1).mean()
    hard_ok = kept[..., 0]
    hard = -(picked[..., 0] * hard_ok).sum() / hard_ok.sum().clamp_min(1)
    agree = (logits.argmax(-1) == rows[..., 0]).float().mean()
    return soft + hard_weight * hard, agree


def train_draft(
    draft: Transformer,
    teacher: dict[str, Tensor],
    cfg: DistillConfig,
    work: Path,
    stop_at: int | None = None,
) -> list[dict]:
    """AdamW with warm-up and cosine decay over random batches of teacher windows; resumable
    from work/checkpoint (weights, optimizer, data RNG, history). stop_at ends the run early
    (checkpointed) on cfg's schedule."""
    ckpt = work / "checkpoint"
    decay = [p for p in draft.parameters() if p.dim() >= 2]
    no_decay = [p for p in draft.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [dict(params=decay, weight_decay=cfg.weight_decay),
         dict(params=no_decay, weight_decay=0.0)],
        lr=cfg.peak_lr, betas=(0.9, 0.95),
    )  # fmt: skip
    g = torch.Generator().manual_seed(cfg.seed)
    start, history = 0, []
    if (ckpt / "state.json").exists():
        state = json.loads((ckpt / "state.json").read_text())
        start, history = state["step"], state["history"]
        draft.load_state_dict(load_file(str(ckpt / "model.safetensors")))
        flat = load_file(str(ckpt / "optimizer.safetensors"))
        g.set_state(flat.pop("rng"))
        load_optimizer_tensors(draft, optimizer, flat)
        print(f"resumed at step {start}", flush=True)
    count = teacher["ids"].shape[0]
    draft.train()
    tick = time.perf_counter()
    end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
    for step in range(start, end):
        lr = lr_at(step, cfg.steps, cfg.peak_lr, cfg.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        pick = torch.randint(0, count, (cfg.batch_size,), generator=g)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, agree = distill_loss(
                draft, teacher["ids"][pick], teacher["top_ids"][pick], teacher["top_logp"][pick],
                cfg.hard_weight,
            )  # fmt: skip
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(draft.parameters(), 1.0)
        optimizer.step()
        now = time.perf_counter()
        record = {"step": step + 1, "loss": round(loss.item(), 4), "agree": round(agree.item(), 4),
                  "lr": lr,
                  "tok_s": round(cfg.batch_size * cfg.seq_len / (now - tick))}  # fmt: skip
        tick = now
        history.append(record)
        if (step + 1) % 20 == 0:
            print(json.dumps(record), flush=True)
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == end:
            ckpt.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in draft.state_dict().items()},
                      str(ckpt / "model.safetensors"))  # fmt: skip
            flat = optimizer_tensors(draft, optimizer)
            flat["rng"] = g.get_state()
            save_file(flat, str(ckpt / "optimizer.safetensors"))
            (ckpt / "state.json").write_text(json.dumps({"step": step + 1, "history": history}))
    draft.eval()
    return history


# ---- 5. export -------------------------------------------------------------------------------


@torch.no_grad()
def agreement(draft: Transformer, shards: dict[str, Tensor]) -> dict:
    """Teacher-forced greedy top-1 agreement with the target and the expected acceptance at
    T=1 over the kept top-k (a lower bound of sum(min(p, q)))."""
    agree = accept = n = 0.0
    for i in range(0, shards["ids"].shape[0], 8):
        ids = shards["ids"][i : i + 8].long()
        logits = draft(ids)  # [w, S, V], -inf outside the kept tokens
        q = logits.softmax(-1)
        top_ids = shards["top_ids"][i : i + 8].long()
        agree += (logits.argmax(-1) == top_ids[..., 0]).sum().item()
        p = shards["top_logp"][i : i + 8].float().exp()
        accept += torch.minimum(p, q.gather(-1, top_ids)).sum().item()
        n += ids.numel()
    return {"greedy_agreement": round(agree / n, 4), "expected_acceptance_t1": round(accept / n, 4),
            "tokens": int(n)}  # fmt: skip


def run(cfg: DistillConfig, work: Path, out: Path, corpus_dir: Path, threads: int | None) -> dict:
    from ..model.gguf_checkpoint import read_tokenizer
    from ..model.named import resolve

    if threads:
        torch.set_num_threads(threads)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    target_path = resolve(cfg.target)
    tokenizer = read_tokenizer(target_path)
    streams = build_corpus(work, tokenizer, corpus_dir)
    target = from_pretrained(cfg.target, dtype=torch.bfloat16)
    train_ids = torch.cat([
        windows(streams["code_train"], cfg.seq_len, cfg.code_windows, cfg.seed),
        windows(streams["english_train"], cfg.seq_len, cfg.english_windows, cfg.seed + 1),
    ])  # fmt: skip
    train_ids = train_ids[
        torch.randperm(train_ids.shape[0], generator=torch.Generator().manual_seed(cfg.seed))
    ]
    held = {domain: windows(streams[f"{domain}_held_out"], cfg.seq_len, cfg.held_out_windows,
                            cfg.seed + 2) for domain in ("code", "english")}  # fmt: skip
    held_shards = {d: load_shards(label(work, target, f"held-{d}", ids, cfg))
                   for d, ids in held.items()}  # fmt: skip
    # Shards follow the fixed window order, so labelling more windows later keeps the first.
    teacher = load_shards(label(work, target, "train", train_ids[: cfg.labelled_windows], cfg))
    labelled = time.perf_counter()

    vocab = kept_vocab(teacher, target.config.vocab_size, cfg.kept_vocab)
    covered = draft_coverage(teacher, vocab)
    config = draft_config(target.config, cfg)
    torch.manual_seed(cfg.seed)
    draft = Transformer(config, dtype=torch.float32)
    init_draft(draft, target, vocab, cfg.seed)
    history = train_draft(draft, teacher, cfg, work)
    trained = time.perf_counter()

    exported = Transformer(config, dtype=torch.bfloat16)
    exported.load_state_dict(
        {k: (v.to(torch.bfloat16) if v.is_floating_point() else v)
         for k, v in draft.state_dict().items()}
    )  # fmt: skip
    exported.set_vocab(draft.vocab_ids)
    exported.eval()
    exported.config.extra["tokenizer_from"] = cfg.target  # the target's ids, not a copy
    save_pretrained(exported, out)
    report = {
        "target": cfg.target,
        "config": asdict(cfg),
        "parameters": sum(p.numel() for p in exported.parameters()),
        "file_bytes": (out / "model.safetensors").stat().st_size,
        "kept_vocab_coverage_of_target_argmax": covered,
        "corpus_tokens": {k: v.numel() for k, v in streams.items()},
        "held_out": {d: agreement(exported, s) for d, s in held_shards.items()},
        "minutes": {
            "label": round((labelled - started) / 60, 1),
            "train": round((trained - labelled) / 60, 1),
        },
        "final": history[-1] if history else None,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip()
        + f", {torch.get_num_threads()} threads",
        "torch": torch.__version__,
    }
    (out / "training.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def draft_coverage(teacher: dict[str, Tensor], vocab: Tensor) -> float:
    """Fraction of the target's argmax predictions that are kept tokens (agreement's ceiling)."""
    top = teacher["top_ids"][..., 0].long().flatten()
    return round(torch.isin(top, vocab).float().mean().item(), 4)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pearlmoe.train.distill",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=EMBEDDED / "smollm2-135m-draft")
    parser.add_argument("--work", type=Path, default=Path("build/distill/smollm2-135m-draft"))
    parser.add_argument("--corpora", type=Path, default=Path("build/corpora"))
    parser.add_argument("--steps", type=int, help="override the step count")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    cfg = DistillConfig()
    if args.steps is not None:
        cfg.steps = args.steps
    report = run(cfg, args.work, args.out, args.corpora, args.threads)
    print(json.dumps({k: v for k, v in report.items() if k != "config"}, indent=1))
    return 0 if math.isfinite(report["final"]["loss"] if report["final"] else 0.0) else 1


if __name__ == "__main__":
    sys.exit(main())
