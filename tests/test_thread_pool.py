"""pearlmoe's claiming thread pool (csrc/cpu/thread_pool.h), which runs the fused steps' kernels:
every index of a parallel_for exactly once on any thread count (helpers taking part, counts
changing between jobs), errors back to the caller, results bit-identical to OpenMP's, correct
under concurrent callers (each with its pool), after fork and on a loaded machine (where it runs
the work on the caller alone)."""

import multiprocessing
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

import pearlmoe
from pearlmoe.decode import generate
from pearlmoe.decode.common import num_threads
from pearlmoe.decode.runner import Runner

EMBEDDED = Path(pearlmoe.__file__).parent / "embedded"
selftest = torch.ops.pearlmoe._cpu_pool_selftest


@pytest.fixture
def claim_pool():
    before = torch.ops.pearlmoe.cpu_pool()
    torch.ops.pearlmoe.set_cpu_pool("claim")
    yield
    torch.ops.pearlmoe.set_cpu_pool(before)


@pytest.mark.parametrize("threads", [1, 2, 3, 17])
def test_every_index_runs_exactly_once(claim_pool, threads):
    with num_threads(threads):
        for n in [0, 1, 2, 3, 7, 8, 9, 17, 257, 1000]:
            for grain in [1, 4, 1000]:
                runs, used = selftest(n, grain, -1)
                assert runs == [1] * n, (n, grain)
                assert used <= min(threads, max(n, 1)), (n, grain, used)


def test_helpers_take_part(claim_pool):
    """Not everything on the caller: among many jobs of two parts, some ran on two threads
    (within seconds: a solo spell left by an oversubscribed test before lasts up to 1.6 s)."""
    used: set[int] = set()
    deadline = time.monotonic() + 10
    with num_threads(2):
        while 2 not in used and time.monotonic() < deadline:
            used |= {selftest(64, 1, -1)[1] for _ in range(300)}
    assert 2 in used


def test_the_thread_count_may_change_between_jobs(claim_pool):
    for threads in [3, 2, 1, 4, 2]:
        with num_threads(threads):
            for _ in range(20):
                runs, used = selftest(40, 1, -1)
                assert runs == [1] * 40 and used <= threads


def test_a_chunks_error_reaches_the_caller_and_the_pool_goes_on(claim_pool):
    with num_threads(2):
        for throw_at in [0, 5, 99]:
            with pytest.raises(RuntimeError, match=f"thrown at {throw_at}"):
                selftest(100, 1, throw_at)
            assert selftest(100, 1, -1)[0] == [1] * 100  # the next job runs whole


guest_selftest = torch.ops.pearlmoe._cpu_pool_guest_selftest


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_a_guest_thread_takes_part_and_every_index_runs_once(claim_pool, threads):
    """A PoolGuest (PEARL's draft thread between its drafts) claims the jobs' last parts; the
    caller takes what the guest has not: each index of each job still runs exactly once."""
    took_part = 0
    deadline = time.monotonic() + 10
    with num_threads(threads):
        for n in [0, 1, 2, 3, 17, 64]:
            runs, part = guest_selftest(n, 50, -1)
            assert runs == [50] * n, (n, threads)
            took_part += part
        while threads > 1 and not took_part and time.monotonic() < deadline:
            took_part += guest_selftest(64, 300, -1)[1]
    # On one thread jobs run inline: nothing is posted for a guest to take.
    assert (took_part > 0) == (threads > 1)


def test_an_error_in_a_guests_job_reaches_the_caller(claim_pool):
    with num_threads(2):
        for throw_at in [0, 63]:  # the caller's part, the guest's
            with pytest.raises(RuntimeError, match=f"guest selftest: thrown at {throw_at}"):
                guest_selftest(64, 30, throw_at)
            assert guest_selftest(64, 30, -1)[0] == [30] * 64  # the pool goes on


def test_a_job_its_guest_serves_wakes_no_sleeping_helper(claim_pool):
    """With a guest taking every part but the caller's, the pool's own helper has no part: a job
    must not wake it (each did: a futex call per job, and the woken thread took a core from the
    caller or the guest mid-chunk, 0.38 -> 0.52 ms a one-token target step in PEARL's rounds).
    A job that wants the helper still wakes it."""
    wakes = torch.ops.pearlmoe.cpu_pool_helper_wakes
    deadline = time.monotonic() + 10
    with num_threads(2):
        while selftest(64, 1, -1)[1] < 2 and time.monotonic() < deadline:
            pass  # until the pool's helper exists (a solo spell runs jobs inline)
        time.sleep(0.05)  # past its spin (5 ms): it sleeps
        before = wakes()
        assert guest_selftest(64, 300, -1)[0] == [300] * 64
        assert wakes() == before
        while wakes() == before and time.monotonic() < deadline:
            selftest(64, 1, -1)
        assert wakes() > before


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_chunks_fork_no_openmp_or_blas_team(claim_pool, threads):
    """Inside a pool chunk, on the caller or a helper, neither OpenMP nor MKL would fork threads:
    a helper's own team made libgomp count more threads than CPUs and stop spinning in every team
    (an eager decode ran 4-5x slower for the rest of the process after one long fp32 prefill).
    The calling thread's counts are back after the job."""
    with num_threads(threads):
        for _ in range(20):
            seen = torch.ops.pearlmoe._cpu_pool_forkable_threads(16)
            assert seen[0] == seen[-1] == threads, seen
            assert seen[1:-1] == [1] * 16, seen


def test_the_pool_is_selectable_and_a_bad_kind_is_named():
    before = torch.ops.pearlmoe.cpu_pool()
    try:
        for kind in ["openmp", "claim"]:
            torch.ops.pearlmoe.set_cpu_pool(kind)
            assert torch.ops.pearlmoe.cpu_pool() == kind
            with num_threads(2):
                assert selftest(64, 1, -1)[0] == [1] * 64
        with pytest.raises(
            RuntimeError, match="set_cpu_pool's kind must be 'claim' or 'openmp', got 'tbb'"
        ):
            torch.ops.pearlmoe.set_cpu_pool("tbb")
    finally:
        torch.ops.pearlmoe.set_cpu_pool(before)


def test_a_bad_environment_setting_is_named():
    code = "import torch, pearlmoe; torch.ops.pearlmoe.cpu_pool()"
    env = dict(os.environ, PEARLMOE_CPU_POOL="fast")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode != 0
    assert "PEARLMOE_CPU_POOL must be 'claim' or 'openmp', got 'fast'" in out.stderr


def _target(dtype=torch.bfloat16):
    return pearlmoe.from_pretrained(EMBEDDED / "tiny-target", dtype=dtype)


def _logits_on_each_pool(target, prompts: list[list[int]], ids: torch.Tensor, capacity: int):
    """{pool: the fused step's logits for ids [B, S] after prefilling the prompts}, 2 threads."""
    out = {}
    before = torch.ops.pearlmoe.cpu_pool()
    try:
        for kind in ["openmp", "claim"]:
            torch.ops.pearlmoe.set_cpu_pool(kind)
            with torch.inference_mode(), num_threads(2):
                runner = Runner(target, len(prompts), capacity, "fused")
                runner.prefill(prompts)
                out[kind] = runner.fused_step.logits(ids, runner.cache.k, runner.cache.v,
                                                     runner.lens)  # fmt: skip
    finally:
        torch.ops.pearlmoe.set_cpu_pool(before)
    return out


@pytest.mark.parametrize("batch,width", [(1, 1), (3, 5), (4, 9)])
def test_fused_steps_give_the_same_logits_on_both_pools(batch, width):
    target = _target()
    ids = torch.randint(0, target.config.vocab_size, (batch, width),
                        generator=torch.Generator().manual_seed(width))  # fmt: skip
    prompts = [[1 + b, 2, 3, 4, 5][: 2 + b] for b in range(batch)]
    out = _logits_on_each_pool(target, prompts, ids, 32)
    assert torch.equal(out["openmp"], out["claim"])


def test_a_long_prefill_with_aten_calls_inside_the_pools_chunks():
    """A 300-token prefill takes the kernels' blocked paths, which call ATen ops on inference
    tensors inside each chunk: on a helper thread they need the caller's inference mode."""
    target = _target(torch.float32)
    prompts = torch.randint(1, target.config.vocab_size, (2, 300),
                            generator=torch.Generator().manual_seed(1)).tolist()  # fmt: skip
    out = _logits_on_each_pool(target, prompts, torch.tensor([[3], [4]]), 320)
    assert torch.equal(out["openmp"], out["claim"])


def test_concurrent_callers_each_get_their_own_answer(claim_pool):
    """Two threads decode at once, each on its own pool."""
    models = [_target(), _target()]
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    with num_threads(2):
        want = [generate(m, [p], 24, backend="fused")[0]
                for m, p in zip(models, prompts, strict=True)]  # fmt: skip
    got: list = [None, None]

    def run(i: int) -> None:
        torch.set_num_threads(2)
        for _ in range(3):
            got[i] = generate(models[i], [prompts[i]], 24, backend="fused")[0]

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert got == want


def _child(queue) -> None:  # a forked child: the parent's helper threads are not in it
    torch.set_num_threads(2)
    queue.put((selftest(50, 1, -1)[0], generate(_target(), [[5, 6, 7]], 16, backend="fused")[0]))


def test_a_forked_child_starts_a_pool_of_its_own(claim_pool):
    with num_threads(2):
        assert selftest(50, 1, -1)[0] == [1] * 50  # the parent's helpers exist now
        want = generate(_target(), [[5, 6, 7]], 16, backend="fused")[0]
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child, args=(queue,))
    child.start()
    runs, tokens = queue.get(timeout=120)
    child.join(timeout=30)
    assert child.exitcode == 0
    assert runs == [1] * 50
    assert tokens == want


LOADED = textwrap.dedent("""
    import json, os, subprocess, sys, time
    import torch, pearlmoe
    from pathlib import Path
    from pearlmoe.decode import generate, pearl_generate, speculative_generate
    cpus = sorted(os.sched_getaffinity(0))[:2]
    os.sched_setaffinity(0, cpus)  # two cores, whatever the machine: the busy loops share them
    torch.set_num_threads(2)
    root = Path(pearlmoe.__file__).parent / "embedded"
    target = pearlmoe.from_pretrained(root / "tiny-target", dtype=torch.bfloat16)
    draft = pearlmoe.from_pretrained(root / "tiny-draft", dtype=torch.bfloat16)
    prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13]]
    alone = generate(target, prompts, 48, backend="fused")
    alone_spec = speculative_generate(target, draft, prompts, 48, backend="fused")[0]
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(3)]
    try:
        time.sleep(0.3)
        spells = torch.ops.pearlmoe.cpu_pool_solo_spells()
        loaded, loaded_spec, loaded_pearl = [], [], []
        start = time.monotonic()
        while time.monotonic() - start < 1.5:
            loaded.append(generate(target, prompts, 48, backend="fused"))
            loaded_spec.append(speculative_generate(target, draft, prompts, 48,
                                                    backend="fused")[0])
            loaded_pearl.append(pearl_generate(target, draft, prompts, 48, backend="fused")[0])
        spells = torch.ops.pearlmoe.cpu_pool_solo_spells() - spells
    finally:
        for p in busy:
            p.kill()
    print(json.dumps({"spells": spells, "same": all(o == alone for o in loaded),
                      "same_spec": all(o == alone_spec for o in loaded_spec),
                      "same_pearl": all(o == alone for o in loaded_pearl),
                      "spec_equals_ar": alone_spec == alone}))
""")


def test_on_a_loaded_machine_the_pool_runs_solo_and_the_tokens_stay():
    """Beside three busy processes on the same two cores the caller gets well under its core's
    time: the pool's load watch must see it (solo spells) and decoding must emit what it emits
    alone (PEARL's draft thread lending itself to the target's pool too)."""
    import json

    env = dict(os.environ, PEARLMOE_CPU_POOL="claim")
    out = subprocess.run([sys.executable, "-c", LOADED], env=env, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"spells": result["spells"], "same": True, "same_spec": True,
                      "same_pearl": True, "spec_equals_ar": True}  # fmt: skip
    assert result["spells"] > 0
