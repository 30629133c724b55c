"""The fused CPU step (pearlmoe.decode.fused, csrc/cpu/model_step.cpp): its logits and cache writes
are bit-identical to the eager step's (same kernels, same rounding points) for the model shapes
it covers, its greedy tokens are torch.argmax's (ties to the lowest token id, NaN first, trimmed
vocabularies), a draft's γ tokens in one call equal γ calls, bad calls get a clear error, models
it does not cover fall back to compile, and every decode loop on it emits the autoregressive
tokens. Its speed is measured by `pearlmoe bench` (bench/NOTES.md), not here."""

import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from test_static_decode import PROMPTS4, _pair
from test_trimmed_vocab import trimmed_copy

import pearlmoe
from pearlmoe.decode import cost_model, fused, pearl_generate, speculative_generate
from pearlmoe.decode.common import num_threads
from pearlmoe.decode.runner import Runner, Sampling, default_backend, effective_backend
from pearlmoe.model import ModelConfig, Transformer

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _dense(dtype: torch.dtype, seed: int = 0) -> Transformer:
    """A Llama-style model (dense SwiGLU, no CLA, no QK-norm) with an untied head and an odd
    vocabulary."""
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=97, hidden_size=48, num_hidden_layers=3,
                         num_attention_heads=6, num_key_value_heads=2, intermediate_size=40,
                         head_dim=8, tie_word_embeddings=False, model_type="llama")  # fmt: skip
    model = Transformer(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 1.5 * p.shape[-1] ** -0.5)
    return model.to(dtype)


def _models(dtype: torch.dtype) -> dict[str, Transformer]:
    target, draft = _pair(dtype)
    return {"moe_cla_qknorm": target, "dense": _dense(dtype), "draft": draft}


def _runners(model: Transformer, batch: int, sampling: Sampling) -> dict[str, Runner]:
    runners = {b: Runner(model, batch, 48, b, sampling) for b in ("eager", "fused")}
    prompts = [[3 + i + j for j in range(5 + 7 * i)] for i in range(batch)]  # ragged
    for r in runners.values():
        r.prefill(prompts)
    return runners


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [1, 3])
def test_logits_and_cache_equal_the_eager_step(dtype, batch):
    for name, model in _models(dtype).items():
        assert fused.unsupported(model) is None, name
        runners = _runners(model, batch, Sampling(logits=True))
        assert runners["fused"].backend == "fused"
        for width in (1, 2, 5):
            ids = torch.randint(0, model.config.vocab_size, (batch, width))
            eager, _ = runners["eager"](ids)
            got, _ = runners["fused"](ids)
            assert got.dtype == torch.float32 and got.shape == eager.shape
            assert torch.equal(got, eager), (name, width, (got - eager).abs().max())
            for r in runners.values():
                with torch.inference_mode():
                    r.lens.add_(width)
        for part in ("k", "v"):
            a, b = getattr(runners["eager"].cache, part), getattr(runners["fused"].cache, part)
            assert torch.equal(a, b), (name, part)


def test_sampled_probabilities_equal_the_eager_steps_and_keep_the_thread_count():
    """A sampled fused step computes its probabilities on the calling thread alone (no OpenMP
    team left spinning beside the next step's pool): the same numbers as the eager step's, and
    the caller's thread count is back afterwards, also on another thread with its own count."""
    model = _models(torch.float32)["moe_cla_qknorm"]
    sampling = Sampling(temperature=0.8, top_k=50, top_p=0.9)
    runners = _runners(model, 2, sampling)
    ids = torch.randint(
        0, model.config.vocab_size, (2, 3), generator=torch.Generator().manual_seed(0)
    )
    seen = {}

    def step(threads: int) -> None:
        with num_threads(threads):
            probs, tokens = runners["fused"](ids)
            seen[threads] = (probs, tokens, torch.get_num_threads())

    step(2)
    worker = threading.Thread(target=step, args=(1,))
    worker.start()
    worker.join()
    eager, _ = runners["eager"](ids)
    for threads, (probs, tokens, after) in seen.items():
        assert tokens is None and after == threads
        assert torch.equal(probs, eager), threads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_fills_the_eager_cache(dtype):
    """The fused prefill computes only what the cache holds (no head, no layers past the last
    K/V write; prompts of one length in one call): its cache is the eager prefill's bit for bit,
    for prompts past the kept scratch shapes (> 16 tokens), one after another of varying lengths,
    and its lens and host lengths agree."""
    g = torch.Generator().manual_seed(1)
    for name, model in _models(dtype).items():
        vocab = model.config.vocab_size
        for lengths in ([40, 40, 40], [17, 1, 33], [5, 0, 21]):
            prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]
            runners = {b: Runner(model, 3, 96, b) for b in ("eager", "fused")}
            for r in runners.values():
                r.prefill(prompts)
                r.prefill([p[:3] for p in prompts])  # a second fill after the first
            eager, fused_ = runners["eager"].cache, runners["fused"].cache
            assert fused_.seq_lens() == eager.seq_lens() == [n + min(n, 3) for n in lengths]
            assert torch.equal(fused_.lens, eager.lens)
            for g_ in range(eager.k.shape[0]):  # the written rows (the rest is uninitialised)
                for b, n in enumerate(eager.seq_lens()):
                    for part in ("k", "v"):
                        want = getattr(eager, part)[g_, b, :n]
                        assert torch.equal(getattr(fused_, part)[g_, b, :n], want), (name, part)


def test_batched_prefill_stays_where_rows_are_computed_alone():
    """Equal-length prompts prefill in one call only while every kernel computes each row as
    the prompt alone would (≤ 256 rows for the skinny GEMM and the experts, ≤ 2^16 query-key
    pairs for attention's per-row path): 4 prompts of 100 tokens (400 rows, BLAS territory) must
    still fill the cache the eager one-at-a-time prefill fills (on the embedded target, whose
    cache differs when the 4 go in one call)."""
    from pearlmoe.cli import TARGET
    from pearlmoe.model import from_pretrained

    g = torch.Generator().manual_seed(2)
    model = from_pretrained(TARGET, dtype=torch.bfloat16)
    prompts = torch.randint(0, model.config.vocab_size, (4, 100), generator=g).tolist()
    runners = {b: Runner(model, 4, 128, b) for b in ("eager", "fused")}
    for r in runners.values():
        r.prefill(prompts)
    for part in ("k", "v"):
        eager, got = getattr(runners["eager"].cache, part), getattr(runners["fused"].cache, part)
        assert torch.equal(got[:, :, :100], eager[:, :, :100]), part


def test_pearl_and_speculative_refuse_windows_past_16_tokens():
    target, draft = _models(torch.float32)["moe_cla_qknorm"], _models(torch.float32)["draft"]
    for loop in (speculative_generate, pearl_generate):
        with pytest.raises(ValueError, match=r"gamma must be in \[1, 15\], got 16"):
            loop(target, draft, [[1, 2, 3]], 4, gamma=16)


def test_prefill_past_the_capacity_is_refused_before_any_write():
    model = _dense(torch.float32)
    runner = Runner(model, 2, 8, "fused")
    with pytest.raises(RuntimeError, match="KVCache: sequence 1 would hold 9 tokens"):
        runner.prefill([[1, 2], list(range(9))])
    assert runner.lens.tolist() == [0, 0] and runner.cache.seq_lens() == [0, 0]
    with pytest.raises(RuntimeError, match="ModelStep: sequence 0 holds 0 tokens: 9 more exceed"):
        runner._fused.fill(torch.zeros(2, 9, dtype=torch.long), runner.cache.k, runner.cache.v,
                           runner.lens)  # fmt: skip
    assert runner.lens.tolist() == [0, 0]


def test_greedy_is_torch_argmax_with_ties_and_nan():
    model = _dense(torch.bfloat16)
    with torch.no_grad():  # rows 10 = 20 = u and 30 = 40 = -u, large: one pair ties at the top
        u = model.lm_head.abs().max(0).values * 8
        model.lm_head[10] = model.lm_head[20] = u
        model.lm_head[30] = model.lm_head[40] = -u
    runners = _runners(model, 2, Sampling())
    probe = _runners(model, 2, Sampling(logits=True))["eager"]
    ids = torch.randint(0, 97, (2, 3))
    logits, _ = probe(ids)
    _, got = runners["fused"](ids)
    assert torch.equal(got, logits.argmax(-1))
    assert set(got.flatten().tolist()) <= {10, 30}  # the lower id of each tied pair
    with torch.no_grad():
        model.lm_head[50] = float("nan")  # NaN beats every number, as in torch.argmax
    _, got = runners["fused"](ids)
    assert (got == 50).all()


def test_trimmed_vocabulary_draft():
    _, draft = _pair(torch.float32)
    kept = torch.randperm(96, generator=torch.Generator().manual_seed(3))[:50].tolist()
    trimmed = trimmed_copy(draft, kept)
    with torch.no_grad():  # two kept tokens tie above the rest: the lower token id wins
        a, b = sorted(kept[10:12])
        rows = {t: r for r, t in enumerate(kept)}
        top = trimmed.embed_tokens.abs().max(0).values * 4
        trimmed.embed_tokens[rows[a]] = trimmed.embed_tokens[rows[b]] = top
    runners = _runners(trimmed, 2, Sampling(logits=True))
    ids = torch.tensor([[kept[0], 95, 7], [kept[5], kept[6], 0]])
    eager, _ = runners["eager"](ids)
    got, _ = runners["fused"](ids)
    assert torch.equal(got, eager)  # -inf outside the kept tokens
    greedy = Runner(trimmed, 2, 48, "fused")
    greedy.prefill([[1, 2, 3], [4]])
    _, tokens = greedy(ids)
    assert torch.equal(tokens, eager.argmax(-1))


@pytest.mark.parametrize("width", [1, 2])
def test_draft_in_one_call_equals_step_by_step(width):
    _, draft = _pair(torch.bfloat16)
    one, steps = (Runner(draft, 3, 48, "fused") for _ in range(2))
    prompts = [[1, 2, 3, 4], [5, 6], [7, 8, 9, 10, 11, 12]]
    one.prefill(prompts)
    steps.prefill(prompts)
    feed = torch.tensor([[13, 14], [15, 16], [17, 18]])[:, :width]
    assert one.drafts_in_one_call
    got = one.draft(feed, 4)
    want, ids = [], feed
    for _ in range(4):
        _, tokens = steps(ids)
        with torch.inference_mode():
            steps.lens.add_(ids.shape[1])
        want.append(tokens[:, -1])
        ids = tokens[:, -1:]
    assert torch.equal(got, torch.stack(want, 1))
    # the last drafted token is not cached: lengths moved by width + 4 - 1
    assert one.lens.tolist() == [len(p) + width + 3 for p in prompts]
    assert torch.equal(one.cache.k, steps.cache.k)


@pytest.mark.parametrize("n", [1, 5, 33])
def test_greedy_steps_equal_step_by_step(n):
    """greedy_steps: n one-token steps in one call, the tokens, cache and lengths of n greedy
    calls with the caller moving the lengths (ragged prompts, the MoE target with CLA)."""
    target, _ = _pair(torch.bfloat16)
    one, steps = (Runner(target, 3, 48, "fused") for _ in range(2))
    prompts = [[1, 2, 3, 4], [5, 6], [7, 8, 9, 10, 11, 12]]
    one.prefill(prompts)
    steps.prefill(prompts)
    c = one.cache
    got = one.fused_step.greedy_steps(
        torch.tensor([[13], [14], [15]]), c.k, c.v, c.lens, n, torch.tensor([], dtype=torch.long),
        torch.zeros(3, dtype=torch.bool),
    )  # fmt: skip
    want, ids = [], torch.tensor([[13], [14], [15]])
    for _ in range(n):
        _, tokens = steps(ids)
        with torch.inference_mode():
            steps.lens.add_(1)
        want.append(tokens[:, 0])
        ids = tokens
    assert torch.equal(got, torch.stack(want, 1))
    assert one.lens.tolist() == [len(p) + n for p in prompts]
    assert torch.equal(one.cache.k, steps.cache.k) and torch.equal(one.cache.v, steps.cache.v)


def test_greedy_steps_stop_once_every_live_sequence_has_ended():
    target, _ = _pair(torch.float32)
    prompts = [[1, 2, 3, 4], [5, 6], [7, 8, 9, 10, 11, 12]]
    first = torch.tensor([[13], [14], [15]])
    ref = Runner(target, 3, 64, "fused")
    ref.prefill(prompts)
    c = ref.cache
    no_eos, none_done = torch.tensor([], dtype=torch.long), torch.zeros(3, dtype=torch.bool)
    full = ref.fused_step.greedy_steps(first, c.k, c.v, c.lens, 12, no_eos, none_done).tolist()

    def run(eos: list[int], done: list[bool]) -> list[list[int]]:
        r = Runner(target, 3, 64, "fused")
        r.prefill(prompts)
        c = r.cache
        out = r.fused_step.greedy_steps(first, c.k, c.v, c.lens, 12, torch.tensor(eos),
                                        torch.tensor(done))  # fmt: skip
        assert r.lens.tolist() == [len(p) + out.shape[1] for p in prompts]
        return out.tolist()

    # Each row ends at its first EOS; the call ends with the last row to end.
    eos = [full[0][1], full[1][3], full[2][2]]
    ends = [min(j for j, t in enumerate(row) if t in eos) + 1 for row in full]
    assert run(eos, [False] * 3) == [row[: max(ends)] for row in full]
    # A row already done does not hold the call open.
    slow = max(range(3), key=lambda b: ends[b])
    done = [b == slow for b in range(3)]
    stop = max(e for b, e in enumerate(ends) if b != slow)
    assert stop < max(ends)  # (the done row alone would have held the call open longer)
    assert run(eos, done) == [row[:stop] for row in full]
    # No EOS ever chosen: all n steps.
    assert run([-5], [False] * 3) == full


def test_bad_calls_name_the_problem():
    model = _dense(torch.float32)
    runner = Runner(model, 2, 8, "fused")
    step, cache = runner._fused, runner.cache
    ids = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(RuntimeError, match=r"ModelStep: ids\[1, 2\] = 97 is outside the vocab"):
        step.greedy(torch.tensor([[0, 0, 0], [0, 0, 97]]), cache.k, cache.v, cache.lens)
    with pytest.raises(RuntimeError, match="ModelStep: ids must be Long"):
        step.greedy(ids.int(), cache.k, cache.v, cache.lens)
    with pytest.raises(RuntimeError, match="exceed the cache's capacity 8"):
        step.greedy(torch.zeros(2, 9, dtype=torch.long), cache.k, cache.v, cache.lens)
    with pytest.raises(RuntimeError, match="ModelStep: the caches must have the weights' dtype"):
        step.greedy(ids, cache.k.half(), cache.v.half(), cache.lens)
    with pytest.raises(RuntimeError, match=r"ModelStep: k_cache and v_cache must be \[G=3, B=2"):
        step.greedy(ids, cache.k[:, :1], cache.v[:, :1], cache.lens)
    with pytest.raises(RuntimeError, match="ModelStep: lens must be Int"):
        step.greedy(ids, cache.k, cache.v, cache.lens.long())
    with pytest.raises(RuntimeError, match="ModelStep: draft needs n >= 1"):
        step.draft(ids, cache.k, cache.v, cache.lens, 0)
    eos, done, one = torch.tensor([1]), torch.zeros(2, dtype=torch.bool), ids[:, :1]
    with pytest.raises(RuntimeError, match=r"greedy_steps needs one token per sequence"):
        step.greedy_steps(ids, cache.k, cache.v, cache.lens, 2, eos, done)
    with pytest.raises(RuntimeError, match="ModelStep: greedy_steps needs n >= 1"):
        step.greedy_steps(one, cache.k, cache.v, cache.lens, 0, eos, done)
    with pytest.raises(RuntimeError, match="ModelStep: eos must be Long"):
        step.greedy_steps(one, cache.k, cache.v, cache.lens, 2, eos.int(), done)
    with pytest.raises(RuntimeError, match="ModelStep: eos must be 1-D"):
        step.greedy_steps(one, cache.k, cache.v, cache.lens, 2, eos[None], done)
    with pytest.raises(RuntimeError, match=r"ModelStep: done must be \[B=2\]"):
        step.greedy_steps(one, cache.k, cache.v, cache.lens, 2, eos, done[:1])
    with pytest.raises(RuntimeError, match="ModelStep: done must be Bool"):
        step.greedy_steps(one, cache.k, cache.v, cache.lens, 2, eos, done.int())
    with pytest.raises(RuntimeError, match="exceed the cache's capacity 8"):
        step.greedy_steps(one, cache.k, cache.v, cache.lens, 9, eos, done)
    assert cache.lens.tolist() == [0, 0]  # nothing moved by the refused calls


def test_models_it_does_not_cover_take_compile():
    base = _dense(torch.float32)
    variants = {
        "attention biases": dict(qkv_bias=True),
        "QK-norm before RoPE": dict(use_qk_norm=True, qk_norm_position="before_rope"),
        "clip_qkv": dict(clip_qkv=4.0),
        "partial rotary": dict(partial_rotary_factor=0.5),
    }
    for why, change in variants.items():
        c = base.config
        config = ModelConfig(**{**{f: getattr(c, f) for f in c.__dataclass_fields__}, **change})
        model = Transformer(config)
        assert why in fused.unsupported(model)
        assert effective_backend(model, "fused") == "compile"
        assert Runner(model, 1, 8, "fused").backend == "compile"
        with pytest.raises(ValueError, match=f"fused backend does not run this model.*{why}"):
            fused.build(model)
    assert fused.unsupported(base.double()) == "torch.float64"
    assert default_backend("cpu") == "fused"


def test_autoregressive_stream_on_fused_steps_equals_the_eager_one():
    """generate_stream runs greedy fused steps FUSED_STEPS a C++ call: the same per-step
    stream as the eager loop, across chunk boundaries, each sequence stopping at its EOS."""
    from pearlmoe.decode import autoregressive

    target, _ = _pair(torch.float32)
    prompts = PROMPTS4
    n = autoregressive.FUSED_STEPS + 9
    free = pearlmoe.generate(target, prompts, n)
    # An EOS one sequence meets mid-way through the first call and another only past it.
    firsts = {t: [row.index(t) if t in row else n for row in free] for t in set(free[0][1:8])}
    eos = [t for t, f in firsts.items() if max(f) > autoregressive.FUSED_STEPS][:1]
    assert eos
    want = list(pearlmoe.generate_stream(target, prompts, n, eos_token_id=eos))
    got = list(pearlmoe.generate_stream(target, prompts, n, eos_token_id=eos, backend="fused"))
    assert got == want
    assert len(want) > autoregressive.FUSED_STEPS  # the stream crossed a call's boundary
    assert any(t is None for t in want[-1])  # some sequence did stop early


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 4])
def test_decode_loops_emit_the_autoregressive_tokens(dtype, batch):
    target, draft = _pair(dtype)
    prompts = PROMPTS4[:batch]
    want = pearlmoe.generate(target, prompts, 24)
    assert pearlmoe.generate(target, prompts, 24, backend="fused") == want
    for loop in (speculative_generate, pearl_generate):
        for gamma in (1, 3, 5):
            got, stats = loop(target, draft, prompts, 24, gamma=gamma, backend="fused")
            assert got == want, (loop.__name__, gamma)
            assert 0 < stats.acceptance_rate < 1
    _, stats = pearl_generate(target, draft, prompts, 8, gamma=2, backend="fused")
    assert stats.extra["draft_process"] is False  # threads: the fused steps release the GIL
    assert stats.extra["round"] == "C++"  # greedy rounds are one call each
    _, stats = speculative_generate(target, draft, prompts, 8, gamma=2, backend="fused")
    assert stats.extra["round"] == "C++"
    _, stats = speculative_generate(target, draft, prompts, 8, gamma=2, temperature=0.5,
                                    backend="fused")  # fmt: skip
    assert stats.extra["round"] == "C++"  # sampled too: draws and verification in the call
    _, stats = speculative_generate(target, draft, prompts, 8, gamma=2, temperature=0.5,
                                    backend="fused", bookkeeping="device")  # fmt: skip
    assert stats.extra["round"] == "Python"  # asked for: verified in Python (spec_verify)
    # EOS inside a window
    eos = pearlmoe.generate(target, PROMPTS4, 24)[1][6]
    want = pearlmoe.generate(target, PROMPTS4, 24, eos_token_id=eos)
    for loop in (speculative_generate, pearl_generate):
        got, _ = loop(target, draft, PROMPTS4, 24, gamma=4, eos_token_id=eos, backend="fused")
        assert got == want


@pytest.mark.parametrize("lookup", [0, 3])
def test_finished_sequences_leave_the_speculative_rounds(lookup):
    """A finished sequence gives its slot to a live one: the rounds score fewer rows, and every
    sequence's tokens stay the autoregressive ones, whichever order they finish in."""
    target, draft = _pair(torch.float32)
    prompts = [*PROMPTS4, [16, 17], [18, 19, 20]]
    eos = pearlmoe.generate(target, prompts, 24)[1][6]
    want = pearlmoe.generate(target, prompts, 24, eos_token_id=eos)
    assert len({len(w) for w in want}) > 1  # they finish at different rounds
    got, stats = speculative_generate(target, draft, prompts, 24, gamma=3, eos_token_id=eos,
                                      backend="fused", lookup=lookup)  # fmt: skip
    assert got == want
    every_slot = len(prompts) * (stats.draft_calls + stats.target_calls)
    assert stats.extra["target_rows"] < every_slot


class _ScheduledGate(cost_model.SpeculationGate):
    """A gate whose arms alternate whatever their rates: 2 rounds, ``plain`` plain steps, 4
    rounds, ``plain`` plain steps, 4 rounds...; starting with plain steps where asked (a decode
    that starts from a remembered plain leader)."""

    def __init__(self, start_plain: bool = False, plain: int = 3) -> None:
        super().__init__(probe=plain, first=2, longest=4, margin=float("inf"))
        if start_plain:
            self.arm, self.left = self.PLAIN, self.probe


@pytest.mark.parametrize("start_plain, plain", [(False, 3), (True, 3), (False, 30)])
@pytest.mark.parametrize("lookup", [0, 3])
def test_the_speculation_gate_keeps_every_loop_lossless(start_plain, plain, lookup):
    """Rounds and plain steps (the target alone, several a call) taking turns: the draft
    catches up on the tokens it missed at the next round (speculative: a wider feed; PEARL: a
    fill after dropping its unverified drafts; 30 steps: past the 16-token windows), sequences
    finish during either arm (EOS inside a plain call, ragged prompts), and every loop emits the
    autoregressive tokens."""
    target, draft = _pair(torch.float32)
    prompts = [*PROMPTS4, [16, 17], [18, 19, 20]]
    eos = pearlmoe.generate(target, prompts, 40)[1][6]
    for batch_prompts in (prompts[1:2], prompts):
        want = pearlmoe.generate(target, batch_prompts, 40, eos_token_id=eos)
        runs = [(speculative_generate, {}), (pearl_generate, {"lookahead": True}),
                (pearl_generate, {"lookahead": False})]  # fmt: skip
        for loop, extra in runs:
            gate = _ScheduledGate(start_plain, plain)
            got, stats = loop(target, draft, batch_prompts, 40, gamma=3, eos_token_id=eos,
                              backend="fused", lookup=lookup, gate=gate, **extra)  # fmt: skip
            assert got == want, (loop.__name__, extra, len(batch_prompts))
            units = stats.extra["gate"]["units"]
            assert units["plain"] > 0 and units["speculate"] > 0, units


def test_pearl_rounds_plain_steps_refuse_zero_steps():
    target, draft = _pair(torch.float32)
    tgt, drf = Runner(target, 1, 32, "fused"), Runner(draft, 1, 32, "fused")
    worker = torch.classes.pearlmoe.CpuDraftWorker(drf.fused_step, 1)
    rounds = _cpu_rounds(tgt, drf, worker, lend=False)
    with pytest.raises(RuntimeError, match="plain needs steps >= 1, got 0"):
        rounds.plain(0)


def test_pearl_rounds_sampling_needs_a_sampler_per_side_and_no_plain_steps():
    target, draft = _pair(torch.float32)
    sampling = Sampling(temperature=1.0)
    tgt, drf = Runner(target, 1, 32, "fused", sampling), Runner(draft, 1, 32, "fused", sampling)
    worker = torch.classes.pearlmoe.CpuDraftWorker(drf.fused_step, 1)
    rounds = _cpu_rounds(tgt, drf, worker, lend=False)
    one = tgt.sampler()
    with pytest.raises(RuntimeError, match="a sampler per side"):
        rounds.sample_with(one, one)
    rounds.sample_with(one, drf.sampler())
    with pytest.raises(RuntimeError, match="plain steps are greedy: sampled rounds have none"):
        rounds.plain(2)


def test_steps_run_without_the_gil():
    """A fused step releases the GIL, so PEARL's draft thread runs its steps beside the target's.
    With the switch interval out of the way, a thread that yields the GIL only by itself
    (sleep(0)) can run while the main thread is inside a step only if the step released it."""
    target, _ = _pair(torch.float32)
    runner = Runner(target, 1, 64, "fused")
    runner.prefill([[1, 2, 3]])
    step, cache, ids = runner._fused, runner.cache, torch.tensor([[4]])
    count, stop = [0], threading.Event()

    def other():
        while not stop.is_set():
            count[0] += 1
            time.sleep(0)  # releases the GIL; the main thread takes it back at once

    interval = sys.getswitchinterval()
    sys.setswitchinterval(100.0)  # no forced hand-overs
    thread = threading.Thread(target=other)
    try:
        thread.start()
        before, deadline = count[0], time.monotonic() + 10.0
        # Until the other thread has run once: on a loaded machine it may find no free core
        # during the first steps, but it can only ever run inside one.
        while count[0] == before and time.monotonic() < deadline:
            step.greedy(ids, cache.k, cache.v, cache.lens)
        ran = count[0] - before
    finally:
        stop.set()
        sys.setswitchinterval(interval)
        thread.join()
    assert ran > 0


def test_draft_worker_thread():
    """PEARL's C++ draft thread: the same tokens as the step's own draft(), its errors raised
    by result(), misuse refused, and workers that come and go join cleanly."""
    _, draft = _pair(torch.float32)
    mine, other = (Runner(draft, 2, 48, "fused") for _ in range(2))
    for r in (mine, other):
        r.prefill([[1, 2, 3], [4, 5]])
    worker = torch.classes.pearlmoe.CpuDraftWorker(mine.fused_step, 1)
    feed = torch.tensor([[6], [7]])
    c = mine.cache
    for n in (1, 3):
        worker.submit(feed, c.k, c.v, c.lens, n)
        got = worker.result()
        assert torch.equal(got, other.draft(feed, n))
        assert torch.equal(mine.lens, other.lens) and worker.seconds() > 0
    with pytest.raises(RuntimeError, match="DraftWorker: result without a submitted job"):
        worker.result()
    worker.submit(torch.tensor([[6], [500]]), c.k, c.v, c.lens, 2)
    with pytest.raises(RuntimeError, match=r"ModelStep: ids\[1, 0\] = 500 is outside"):
        worker.result()
    worker.submit(feed, c.k, c.v, c.lens, 1)
    with pytest.raises(RuntimeError, match="DraftWorker: submit while a job is pending"):
        worker.submit(feed, c.k, c.v, c.lens, 1)
    worker.result()
    for _ in range(20):  # idle or just used, a worker's thread joins when it goes
        w = torch.classes.pearlmoe.CpuDraftWorker(mine.fused_step, 1)
        w.submit(feed, c.k, c.v, c.lens, 1)
        w.result()
        del w
    _, stats = pearl_generate(*_pair(torch.float32), [[1, 2, 3]], 8, gamma=2, backend="fused")
    assert stats.extra["draft_side"] == "C++ thread"


def test_draft_worker_keeps_its_thread_count():
    """The worker's jobs run with its own thread count, not the process's count the caller sets
    after starting it (PEARL's loop does: share + 1). With the caller's, the draft's kernels ran
    as two-part pool jobs that woke a helper of the worker's own, a third busy thread on two
    cores (PEARL's target side 2x slower in back-to-back rounds)."""
    _, draft = _pair(torch.float32)
    runner = Runner(draft, 1, 48, "fused")
    runner.prefill([[1, 2, 3]])
    c = runner.cache
    with num_threads(1):
        worker = torch.classes.pearlmoe.CpuDraftWorker(runner.fused_step, 1)
        time.sleep(0.2)  # its thread is up and waiting for a job
    with num_threads(2):  # set after the worker's thread started, before its first job
        worker.submit(torch.tensor([[4]]), c.k, c.v, c.lens, 2)
        worker.result()
    assert worker.job_threads() == 1


def test_draft_worker_dropped_mid_job_joins():
    _, draft = _pair(torch.float32)
    runner = Runner(draft, 1, 400, "fused")
    runner.prefill([[1, 2, 3]])
    c = runner.cache
    for _ in range(5):
        w = torch.classes.pearlmoe.CpuDraftWorker(runner.fused_step, 1)
        w.submit(torch.tensor([[4]]), c.k, c.v, c.lens, 64)
        del w  # its owner gone before result(): the thread finishes the job and joins
        runner.lens.zero_().add_(3)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc (Linux)")
def _cpu_rounds(tgt: Runner, drf: Runner, worker, lend: bool) -> torch.ScriptObject:
    """C++ PEARL rounds over the runners' caches: one sequence, 4 tokens committed (the last
    one 4), no lookup; ``lend``: the draft's thread helps the target."""
    t, d = tgt.cache, drf.cache
    empty = torch.empty(0, dtype=torch.int64)
    return torch.classes.pearlmoe.CpuPearlRounds(
        tgt.fused_step, worker, t.k, t.v, t.lens, d.k, d.v, d.lens, [4], [4], empty, empty, 0,
        lend, False,
    )  # fmt: skip


def test_pearl_rounds_end_the_callers_spinning_openmp_helpers():
    """A prefill on all the cores leaves the caller's OpenMP helpers spinning at their barrier,
    where they took the draft thread's core for milliseconds: the rounds end them."""
    target, draft = _pair(torch.float32)
    tgt, drf = Runner(target, 1, 96, "fused"), Runner(draft, 1, 96, "fused")

    def thread_ids() -> set[int]:
        return {int(p.name) for p in Path("/proc/self/task").iterdir()}

    with num_threads(2):
        tgt.prefill([[1, 2, 3]])
        drf.prefill([[1, 2, 3]])
        a = torch.randn(256, 256)
        a @ a  # an OpenMP region on two threads: a helper now waits in the caller's pool
        worker = torch.classes.pearlmoe.CpuDraftWorker(drf.fused_step, 1)
        before = thread_ids()
        rounds = _cpu_rounds(tgt, drf, worker, lend=False)
        deadline = time.monotonic() + 5
        while not before - thread_ids() and time.monotonic() < deadline:
            time.sleep(0.01)  # a released helper leaves its thread a moment after
        assert before - thread_ids()  # the helper is gone
        after = thread_ids()
        rounds.round(2, 0)
        a @ a  # and the pool comes back for the next region on two threads
        assert thread_ids() - after


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc (Linux)")
def test_cpu_pool_rest_ends_the_callers_spinning_openmp_helpers():
    """pearl_generate calls cpu_pool_rest before it starts its draft thread: an OpenMP region on
    two threads (an eager decode) leaves a helper spinning, beside which the new thread was
    placed on the caller's core. The op ends it; the next region brings it back."""

    def thread_ids() -> set[int]:
        return {int(p.name) for p in Path("/proc/self/task").iterdir()}

    with num_threads(2):
        a = torch.randn(256, 256)
        a @ a
        before = thread_ids()
        torch.ops.pearlmoe.cpu_pool_rest()
        deadline = time.monotonic() + 5
        while not before - thread_ids() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert before - thread_ids()
        after = thread_ids()
        a @ a
        assert thread_ids() - after


def test_pearl_rounds_verify_the_drafts_a_sequence_holds_when_gamma_changes():
    """A post-verify sequence's window is the drafts it holds, whatever γ the next round asks
    for: γ may change between any rounds, and the committed tokens stay the target's own."""
    from pearlmoe.decode import generate

    target, draft = _pair(torch.float32)
    tgt, drf = Runner(target, 1, 96, "fused"), Runner(draft, 1, 96, "fused")
    prompt = [1, 2, 3, 4]
    tgt.prefill([prompt[:-1]])
    drf.prefill([prompt[:-1]])
    worker = torch.classes.pearlmoe.CpuDraftWorker(drf.fused_step, 1)
    rounds = _cpu_rounds(tgt, drf, worker, lend=False)
    emitted, widths, changed_in_post, before = [], [], 0, None
    for i in range(40):  # a noisy copy of the target agrees often
        gamma = 3 if i % 3 else 2  # changes while drafts are unverified, too
        rows, _, width, drafted = rounds.round(gamma, 0)
        was_post, _, _, kept = rows[0, :4].tolist()
        assert drafted == gamma  # no lookup: exactly γ
        # post-verify: the window is [last, the drafts the round before left unverified]
        assert width == (before if was_post else 1), (i, width, before)
        changed_in_post += was_post and before != gamma
        widths.append(width)
        before = drafted
        emitted += rows[0, 4 : 4 + kept].tolist()
    assert changed_in_post > 0  # a γ change met unverified drafts
    assert set(widths) >= {1, 2, 3}  # pre-verify rounds and windows of both lengths
    assert emitted == generate(target, [prompt], len(emitted))[0]
    with pytest.raises(RuntimeError, match="gamma must be positive and extend >= 0, got 0"):
        rounds.round(0, 0)


@pytest.mark.parametrize("batch", [1, 3])
def test_pearls_draft_thread_runs_target_work_once_it_has_drafted(batch):
    """With draft_helps (the default) the draft's C++ thread runs chunks of the target's steps
    between its drafts, and the tokens stay AR's (ragged prompts at batch 3); without it, none."""
    from pearlmoe.cli import DRAFT, TARGET
    from pearlmoe.decode import generate

    # The embedded pair: the random pair's steps are too small to share between threads.
    target = pearlmoe.from_pretrained(TARGET, dtype=torch.bfloat16)
    draft = pearlmoe.from_pretrained(DRAFT, dtype=torch.bfloat16)
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]][:batch]
    with num_threads(2):
        want = generate(target, prompts, 40, backend="fused")
        helped = 0
        deadline = time.monotonic() + 20
        while not helped and time.monotonic() < deadline:  # a loaded machine runs jobs solo
            out, stats = pearl_generate(target, draft, prompts, 40, backend="fused")
            assert out == want
            assert stats.extra["draft_helps"] and stats.extra["round"] == "C++"
            helped = stats.extra["draft_helped_chunks"]
        assert helped > 0
        out, stats = pearl_generate(target, draft, prompts, 40, backend="fused", draft_helps=False)
        assert out == want
        assert not stats.extra["draft_helps"] and stats.extra["draft_helped_chunks"] == 0
        before = torch.ops.pearlmoe.cpu_pool()
        try:  # on OpenMP's pool there is no guest to lend: the target keeps its share
            torch.ops.pearlmoe.set_cpu_pool("openmp")
            out, stats = pearl_generate(target, draft, prompts, 40, backend="fused")
        finally:
            torch.ops.pearlmoe.set_cpu_pool(before)
        assert out == want
        assert not stats.extra["draft_helps"] and stats.extra["draft_helped_chunks"] == 0


def test_closed_pearl_rounds_give_the_target_pool_its_own_helper_back():
    """While rounds that lend the draft's thread exist, the target thread's jobs keep a part for
    it (no helper thread of their own); close() (or the end of the decode) returns it."""
    selftest = torch.ops.pearlmoe._cpu_pool_selftest
    target, draft = _pair(torch.float32)
    tgt, drf = Runner(target, 1, 32, "fused"), Runner(draft, 1, 32, "fused")
    worker = torch.classes.pearlmoe.CpuDraftWorker(drf.fused_step, 1)
    rounds = _cpu_rounds(tgt, drf, worker, lend=True)
    with num_threads(2):
        # No job handed the worker the guest yet: the caller runs the guest's part itself.
        assert {selftest(64, 1, -1)[1] for _ in range(300)} == {1}
        rounds.close()
        used: set[int] = set()
        deadline = time.monotonic() + 10
        while 2 not in used and time.monotonic() < deadline:
            used |= {selftest(64, 1, -1)[1] for _ in range(300)}
        assert 2 in used
