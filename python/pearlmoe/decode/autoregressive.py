"""Autoregressive decoding over the KV cache: batched, sequences of different prompt lengths,
stopping per sequence at EOS, streaming the tokens as they come.

Shape letters: B sequences, S prompt length, V vocabulary.
"""

from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

from ..model.transformer import Transformer
from .runner import Runner, Sampling
from .sampling import sample


def _prompts(input_ids: Tensor | Sequence[Sequence[int]]) -> list[list[int]]:
    rows = input_ids.tolist() if isinstance(input_ids, Tensor) else [list(r) for r in input_ids]
    if isinstance(input_ids, Tensor) and input_ids.dim() == 1:
        rows = [rows]
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("generate: every prompt needs at least one token")
    return [[int(t) for t in r] for r in rows]


def _eos_set(eos_token_id: int | Sequence[int] | None) -> set[int]:
    if eos_token_id is None:
        return set()
    return {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)


@torch.inference_mode()
def generate_stream(
    model: Transformer,
    input_ids: Tensor | Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    backend: str = "eager",
) -> Iterator[list[int | None]]:
    """Yields, per step, each sequence's new token (None once the sequence has stopped)."""
    prompts = _prompts(input_ids)
    eos = _eos_set(eos_token_id)
    sampling = Sampling(temperature, top_k, top_p)
    runner = Runner(model, len(prompts), max(map(len, prompts)) + max_new_tokens, backend, sampling)
    runner.warmup([1])
    # The cache holds every prompt token but the last, which the first (batched) step feeds.
    runner.prefill([p[:-1] for p in prompts])
    tokens = torch.tensor([p[-1] for p in prompts], device=model.device)  # [B]
    done = [False] * len(prompts)
    if runner.drafts_in_one_call or runner.samples_in_one_call:  # many steps a C++ call
        sampler = runner.sampler(generator) if runner.samples_in_one_call else None
        yield from _fused_steps(runner, tokens, done, eos, max_new_tokens, sampler)
        return
    # The CPU lengths through a numpy view (~0.3 us a step instead of a ~4 us tensor op), and
    # only the cudagraph backend's outputs need copying out of its static buffers.
    lens = runner.lens.numpy() if runner.lens.device.type == "cpu" else runner.lens
    fresh = runner.backend != "cudagraph"
    for _ in range(max_new_tokens):
        probs, greedy = runner(tokens.unsqueeze(1))
        lens += 1  # finished rows decode on, unused
        if greedy is not None:
            tokens = greedy[:, 0] if fresh else greedy[:, 0].clone()
        else:
            tokens = sample(probs[:, 0], generator)
        out: list[int | None] = []
        for b, token in enumerate(tokens.tolist()):  # the step's one host sync
            out.append(None if done[b] else token)
            done[b] = done[b] or token in eos
        yield out
        if all(done):
            return


# Steps one C++ call runs at most (ModelStep.greedy_steps / sample_steps, which stop at EOS): a
# step called from Python costs ~50 us of host work beside the embedded target's ~0.3 ms, and
# streamed tokens arrive in bursts of at most this many.
FUSED_STEPS = 32


def _fused_steps(
    runner: Runner, tokens: Tensor, done: list[bool], eos: set[int], max_new_tokens: int,
    sampler: torch.ScriptObject | None = None,
) -> Iterator[list[int | None]]:  # fmt: skip
    """generate_stream's loop on fused CPU steps: up to FUSED_STEPS steps a call, each step's
    tokens yielded as the per-step loop yields them (greedy: the same tokens, bit for bit; with
    a sampler, each drawn inside the call from the same distribution the per-step loop samples)."""
    c = runner.cache
    stops = torch.tensor(sorted(eos), dtype=torch.long)  # [E]
    last = tokens.unsqueeze(1)  # [B, 1]
    left = max_new_tokens
    while left > 0:
        args = (last, c.k, c.v, c.lens, min(left, FUSED_STEPS), stops, torch.tensor(done))
        if sampler is None:
            chunk = runner.fused_step.greedy_steps(*args)  # [B, n]: lens moved by n
        else:
            chunk = runner.fused_step.sample_steps(*args, sampler)
        left -= chunk.shape[1]
        last = chunk[:, -1:]
        for column in chunk.T.tolist():  # [n, B]
            out: list[int | None] = []
            for b, token in enumerate(column):
                out.append(None if done[b] else token)
                done[b] = done[b] or token in eos
            yield out
            if all(done):
                return


def generate(
    model: Transformer,
    input_ids: Tensor | Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    callback: Callable[[list[int | None]], None] | None = None,
    backend: str = "eager",
) -> list[list[int]]:
    """Autoregressive decoding: each sequence's new tokens (up to and including its EOS).

    ``input_ids``: a [B, S] tensor or B token lists of any lengths. Greedy (temperature 0) is
    deterministic. ``callback`` receives each step's tokens (None for finished sequences), for
    streaming (on fused CPU steps: the steps of one C++ call, up to FUSED_STEPS, in a
    burst when it returns); ``generate_stream`` is the iterator form. ``backend``: "eager",
    "compile", "fused" or "cudagraph" (pearlmoe.decode.runner).
    """
    outputs = [[] for _ in _prompts(input_ids)]
    for step in generate_stream(
        model, input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id, generator,
        backend,
    ):  # fmt: skip
        if callback is not None:
            callback(step)
        for b, token in enumerate(step):
            if token is not None:
                outputs[b].append(token)
    return outputs
