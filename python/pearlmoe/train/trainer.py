"""A training loop for the Transformer with Hunyuan-Large's practices: AdamW, the warm-up / decay /
anneal schedule, the expert-specific learning rate as parameter groups, the Switch-style
load-balancing loss, capacity with recycle routing, bf16 autocast, gradient clipping, held-out
perplexity, and resumable safetensors checkpoints (no pickle).

Shape letters: B sequences per batch, S tokens per sequence, V vocabulary.
"""

import json
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..model import Transformer, from_pretrained, save_pretrained
from ..model.transformer import MoE
from .schedule import expert_lr_ratio, lr_at


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 8
    seq_len: int = 256
    peak_lr: float = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    aux_loss_coef: float = 0.01  # the paper does not give it; Switch used 0.01
    capacity_factor: float | None = 1.25
    recycle: bool = True
    noise_to_batch: float = 3.8  # B_noise / B in the expert learning-rate rule
    expert_lr: bool = True
    bf16: bool = True
    eval_every: int = 100
    eval_batches: int = 8
    seed: int = 0
    distill: float = 0.0  # weight of KL(teacher || model) against the cross-entropy, with a teacher
    # On-policy data (with a teacher): windows of a corpus prefix and the teacher's continuation
    # at each temperature (0: greedy), and the share of each batch's rows drawn from them.
    on_policy_windows: int = 0
    on_policy_share: float = 0.0
    on_policy_prompt: int = 64
    on_policy_temperatures: tuple[float, ...] = (0.0, 1.0)


def param_groups(model: Transformer, cfg: TrainConfig) -> list[dict]:
    """Routed experts at expert_lr_ratio × the base rate; no weight decay on norms and 1-D
    parameters."""
    ratio = 1.0
    if cfg.expert_lr and model.config.is_moe:
        ratio = expert_lr_ratio(model.config.moe_topk, model.config.num_experts, cfg.noise_to_batch)
    routed = {id(p) for block in model.layers if isinstance(block.mlp, MoE)
              for p in (block.mlp.w13, block.mlp.w2)}  # fmt: skip
    groups = {
        "routed_experts": dict(params=[], lr_scale=ratio, weight_decay=cfg.weight_decay),
        "dense": dict(params=[], lr_scale=1.0, weight_decay=cfg.weight_decay),
        "no_decay": dict(params=[], lr_scale=1.0, weight_decay=0.0),
    }
    for p in model.parameters():
        name = "routed_experts" if id(p) in routed else "dense" if p.dim() >= 2 else "no_decay"
        groups[name]["params"].append(p)
    return [dict(name=name, **g) for name, g in groups.items() if g["params"]]


def batches(
    tokens: Tensor,
    batch_size: int,
    seq_len: int,
    generator: torch.Generator,
    extra: Tensor | None = None,
    extra_rows: int = 0,
) -> Iterator[Tensor]:
    """Random windows of seq_len + 1 tokens from a 1-D token stream: [B, S+1]; with extra
    ([N, S+1] windows), the last extra_rows rows of each batch are drawn from it instead."""
    limit = tokens.numel() - seq_len - 1
    if extra is None:
        extra_rows = 0
    while True:
        starts = torch.randint(0, limit, (batch_size - extra_rows,), generator=generator)
        rows = [tokens[s : s + seq_len + 1] for s in starts.tolist()]
        if extra_rows:
            picks = torch.randint(0, extra.shape[0], (extra_rows,), generator=generator)
            rows += list(extra[picks])
        yield torch.stack(rows)


def loss_fn(
    model: Transformer, window: Tensor, cfg: TrainConfig, generator=None
) -> tuple[Tensor, Tensor]:
    ce, aux, _ = _losses(model, window, cfg, generator)
    return ce, aux


def _losses(
    model: Transformer, window: Tensor, cfg: TrainConfig, generator=None, teacher=None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Cross-entropy, load-balancing loss and (with a teacher) the distillation KL per token."""
    inputs, targets = window[:, :-1], window[:, 1:]
    logits, aux = model.forward_train(
        inputs, cfg.capacity_factor if model.training else None, cfg.recycle and model.training,
        generator,
    )  # fmt: skip
    logits = logits.reshape(-1, logits.shape[-1])  # [B*S, V]
    ce = F.cross_entropy(logits, targets.reshape(-1))
    if teacher is None:
        return ce, aux, None
    with torch.no_grad():
        teacher_logits, _ = teacher.forward_train(inputs)  # [B, S, V]
    teacher_logp = F.log_softmax(teacher_logits.reshape_as(logits), -1)
    kl = F.kl_div(F.log_softmax(logits, -1), teacher_logp, log_target=True, reduction="batchmean")
    return ce, aux, kl


@torch.no_grad()
def evaluate(model: Transformer, tokens: Tensor, cfg: TrainConfig) -> float:
    """Held-out perplexity over fixed, evenly spaced windows."""
    model.eval()
    span = cfg.seq_len + 1
    count = min(cfg.eval_batches * cfg.batch_size, tokens.numel() // span)
    windows = tokens[: count * span].view(count, span)
    total = 0.0
    for chunk in windows.split(cfg.batch_size):
        ce, _ = loss_fn(model, chunk.to(model.device), cfg)
        total += ce.item() * chunk.shape[0]
    model.train()
    return math.exp(total / max(1, count))


def optimizer_tensors(model: torch.nn.Module, optimizer) -> dict[str, Tensor]:
    """The optimizer's state as flat tensors for safetensors: "{parameter index}.{key}"."""
    index = {p: i for i, p in enumerate(model.parameters())}
    return {
        f"{index[p]}.{key}": value.detach().float().reshape(-1)
        if value.dim() == 0
        else value.detach()
        for p, state in optimizer.state.items()
        for key, value in state.items()
    }


def load_optimizer_tensors(model: torch.nn.Module, optimizer, flat: dict[str, Tensor]) -> None:
    """The inverse of optimizer_tensors (any other keys must have been popped)."""
    params = list(model.parameters())
    for key, value in flat.items():
        i, name = key.split(".", 1)
        optimizer.state[params[int(i)]][name] = value.reshape(()) if name == "step" else value


def _save(model, optimizer, rngs, step: int, history: list, out: Path, cfg: TrainConfig) -> None:
    save_pretrained(model, out)
    flat = optimizer_tensors(model, optimizer)
    flat["rng.data"], flat["rng.route"] = rngs[0].get_state(), rngs[1].get_state()
    save_file(flat, str(out / "optimizer.safetensors"))
    (out / "trainer_state.json").write_text(
        json.dumps({"step": step, "config": asdict(cfg), "history": history}, indent=1)
    )


def _resume(model, optimizer, rngs, out: Path) -> tuple[int, list]:
    state = json.loads((out / "trainer_state.json").read_text())
    loaded = from_pretrained(out, dtype=model.dtype, device=model.device)
    model.load_state_dict(loaded.state_dict())
    flat = load_file(str(out / "optimizer.safetensors"), device=str(model.device))
    rngs[0].set_state(flat.pop("rng.data").cpu())
    rngs[1].set_state(flat.pop("rng.route").cpu())
    load_optimizer_tensors(model, optimizer, flat)
    return state["step"], state["history"]


def train(
    model: Transformer,
    train_tokens: Tensor,
    eval_tokens: Tensor,
    cfg: TrainConfig,
    out_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    stop_at: int | None = None,
    teacher: Transformer | None = None,
    on_policy: Tensor | None = None,
) -> list[dict]:
    """Train in place; returns the history (step, loss, aux, lr, tokens/s, held-out perplexity).
    With out_dir, checkpoints land there at every evaluation and at the end; resume=True picks up
    from the checkpoint in out_dir. stop_at ends the run early (checkpointed) on cfg's schedule.
    With a teacher (same vocabulary), the loss mixes in cfg.distill × KL(teacher || model);
    on_policy ([N, seq_len + 1] windows, see on_policy.py) supplies cfg.on_policy_share of each
    batch's rows."""
    if teacher is not None and teacher.config.vocab_size != model.config.vocab_size:
        raise ValueError(
            f"teacher vocab_size {teacher.config.vocab_size} != model vocab_size "
            f"{model.config.vocab_size}"
        )
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    route_g = torch.Generator().manual_seed(cfg.seed + 1)
    groups = param_groups(model, cfg)
    optimizer = torch.optim.AdamW(groups, lr=cfg.peak_lr, betas=(0.9, 0.95), eps=1e-8)
    out = Path(out_dir) if out_dir else None
    start, history = 0, []
    if resume and out is not None and (out / "trainer_state.json").exists():
        start, history = _resume(model, optimizer, (g, route_g), out)
    model.train()
    extra_rows = round(cfg.batch_size * cfg.on_policy_share) if on_policy is not None else 0
    if on_policy is not None and on_policy.shape[1] != cfg.seq_len + 1:
        raise ValueError(f"on_policy windows hold {on_policy.shape[1]} tokens, expected "
                         f"seq_len + 1 = {cfg.seq_len + 1}")  # fmt: skip
    data = batches(train_tokens, cfg.batch_size, cfg.seq_len, g, on_policy, extra_rows)
    autocast = cfg.bf16 and model.dtype == torch.float32
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=start, unit="step", dynamic_ncols=True)
    tick = time.perf_counter()
    end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
    for step in range(start, end):
        lr = lr_at(step, cfg.steps, cfg.peak_lr, cfg.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        window = next(data).to(model.device)
        with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=autocast):
            ce, aux, kl = _losses(model, window, cfg, route_g, teacher)
            loss = ce if kl is None else (1 - cfg.distill) * ce + cfg.distill * kl
            loss = loss + cfg.aux_loss_coef * aux
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        now = time.perf_counter()
        record = {"step": step + 1, "loss": ce.item(), "aux": aux.item(), "lr": lr,
                  "tok_s": window[:, :-1].numel() / (now - tick)}  # fmt: skip
        tick = now
        if (step + 1) % cfg.eval_every == 0 or step + 1 == end:
            record["eval_ppl"] = evaluate(model, eval_tokens, cfg)
            if out is not None:
                _save(model, optimizer, (g, route_g), step + 1, [*history, record], out, cfg)
        history.append(record)
        if bar is not None:
            bar.set_postfix(
                loss=f"{record['loss']:.3f}", lr=f"{lr:.2e}", tok_s=f"{record['tok_s']:.0f}"
            )
            bar.update(1)
    if bar is not None:
        bar.close()
    model.eval()
    return history
