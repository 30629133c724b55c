"""On-policy data for a draft: the target's own continuations of training-set prefixes.

While decoding, a draft proposes tokens after text the target wrote, not after corpus text, and
a token is accepted when the draft's guess equals the target's. Distilling on the target's
continuations (DistillSpec, Zhou et al. 2023) therefore trains the draft on the contexts it
will meet; the corpus windows stay in the mix so that prompts (corpus text) are covered too.

Shape letters: N sequences, P prompt tokens, G generated tokens, S = P + G.
"""

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..decode import generate
from ..model.transformer import Transformer


def prefixes(tokens: Tensor, count: int, length: int, seed: int) -> Tensor:
    """count prompts of length tokens at seeded random offsets of a token stream: [N, P]."""
    if tokens.numel() <= length:
        raise ValueError(
            f"prefixes: a stream of {tokens.numel()} tokens has no {length}-token prefix"
        )
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - length, (count,), generator=g)
    return torch.stack([tokens[s : s + length] for s in starts.tolist()])


@torch.inference_mode()
def continuations(
    target: Transformer,
    prompts: Tensor,
    new_tokens: int,
    temperature: float,
    seed: int,
    batch_size: int = 64,
) -> Tensor:
    """The target's continuation of each prompt (greedy at temperature 0, else sampled with a
    seeded generator), decoded past any end-of-text so every row is full: [N, P + G] int64."""
    g = torch.Generator(device=target.device).manual_seed(seed)
    rows = []
    for part in prompts.split(batch_size):
        outs = generate(target, part.tolist(), new_tokens, temperature=temperature, generator=g)
        rows.append(torch.cat([part, torch.tensor(outs, dtype=torch.int64)], dim=1))
    return torch.cat(rows)


def on_policy_windows(
    target: Transformer,
    tokens: Tensor,
    count: int,
    seq_len: int,
    prompt_len: int,
    temperatures: tuple[float, ...],
    seed: int,
    cache: Path | None = None,
) -> Tensor:
    """count windows of seq_len + 1 tokens, each a corpus prefix and the target's continuation,
    split evenly over the temperatures (0 is greedy): [N, seq_len + 1]. Cached in cache (a
    safetensors file) when given, so a resumed run does not decode them again."""
    key = f"{count}-{seq_len}-{prompt_len}-{'-'.join(map(str, temperatures))}-{seed}"
    if cache is not None and cache.exists():
        stored = load_file(str(cache))
        if key in stored:
            return stored[key]
    prompts = prefixes(tokens, count, prompt_len, seed)  # [N, P]
    parts = []
    for i, (part, temperature) in enumerate(
        zip(prompts.tensor_split(len(temperatures)), temperatures, strict=True)
    ):
        parts.append(continuations(target, part, seq_len + 1 - prompt_len, temperature, seed + i))
    windows = torch.cat(parts)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        save_file({key: windows.contiguous()}, str(cache))
    return windows


@torch.inference_mode()
def decode_agreement(target: Transformer, draft: Transformer, prompts: list[list[int]],
                     new_tokens: int) -> dict:  # fmt: skip
    """How often the draft's greedy token equals the target's along the target's own greedy
    continuation of each prompt: greedy speculative decoding's per-token acceptance, measured
    without the loop (teacher-forced on the target's path)."""
    outs = generate(target, prompts, new_tokens)
    agree = n = 0
    for prompt, out in zip(prompts, outs, strict=True):
        ids = torch.tensor([prompt + out], device=draft.device)  # [1, P + G]
        guess = draft(ids[:, :-1]).argmax(-1)[0, len(prompt) - 1 :]  # [G]
        agree += (guess == ids[0, len(prompt) :]).sum().item()
        n += len(out)
    return {"decode_agreement": agree / max(1, n), "prompts": len(prompts), "tokens": n}
