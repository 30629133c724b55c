"""Expert parallelism and multi-process PEARL on the CPU with gloo: 2, 3 and 4 processes spawned
by the test, bounded in time. Each rank checks its own results against the single-process ones
(the same seeded weights, loaded from one checkpoint) and a failure anywhere fails the test."""

import datetime
import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from conftest import tiny_pair
from pearlmoe import ops
from pearlmoe.decode import generate
from pearlmoe.distributed import ExpertParallel, distributed_pearl_generate, shard_experts
from pearlmoe.model import Transformer, from_pretrained, save_pretrained
from pearlmoe.model import checkpoint as ckpt

TIMEOUT_S = 240


def _spawn(fn, world: int, tmp_path: Path, *args) -> None:
    """Run fn(rank, world, init_file, *args) on `world` processes; re-raise the first failure,
    kill everything past the deadline."""
    init = tmp_path / "init"
    ctx = mp.start_processes(fn, (world, str(init), *args), nprocs=world, join=False,
                             start_method="spawn")  # fmt: skip
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{world}-process run did not finish in {TIMEOUT_S} s")


def _init(rank: int, world: int, init: str) -> None:
    torch.set_num_threads(1)  # several processes share the CI machine's cores
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))  # fmt: skip


def _pair(experts: int = 5, seed: int = 0) -> tuple[Transformer, Transformer]:
    """5 experts: uneven splits over 2 and 4 ranks."""
    return tiny_pair(seed=seed, num_experts=experts)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    target, draft = _pair()
    save_pretrained(target, root / "target", max_shard_bytes=40_000)  # several shards
    save_pretrained(draft, root / "draft")
    return root


# ---- the op -------------------------------------------------------------------------------------


def _op_worker(rank: int, world: int, init: str) -> None:
    _init(rank, world, init)
    g = torch.Generator().manual_seed(0)
    hidden, inter, experts = 24, 40, 5
    w13 = torch.randn(experts, 2 * inter, hidden, generator=g, dtype=torch.float64) * 0.2
    w2 = torch.randn(experts, hidden, inter, generator=g, dtype=torch.float64) * 0.2
    shared13 = torch.randn(2 * inter, hidden, generator=g, dtype=torch.float64) * 0.2
    shared2 = torch.randn(hidden, inter, generator=g, dtype=torch.float64) * 0.2
    router = torch.randn(experts, hidden, generator=g, dtype=torch.float64)
    few = ExpertParallel(3)  # fewer experts than 4 ranks: rank 0 owns none
    got = few.moe_ffn(
        x_few := torch.randn(4, hidden, dtype=torch.float64),
        router[:3],
        w13[few.first : few.last],
        w2[few.first : few.last],
        1,
        shared13,
        shared2,
    )
    torch.testing.assert_close(got, ops.moe_ffn(x_few, router[:3], w13[:3], w2[:3], 1, shared13,
                                                shared2), rtol=1e-10, atol=1e-10)  # fmt: skip
    ep = ExpertParallel(experts)
    local13, local2 = w13[ep.first : ep.last], w2[ep.first : ep.last]
    # Uneven token counts, rank 1 with none; every rank uses its own tokens.
    tokens = [3, 0, 17, 1][rank % 4] + (rank >= 4)
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(10 + rank),
                    dtype=torch.float64)  # fmt: skip
    for top_k, renorm, shared in ((1, False, True), (2, True, True), (3, False, False)):
        s13, s2 = (shared13, shared2) if shared else (None, None)
        got = ep.moe_ffn(x, router, local13, local2, top_k, s13, s2, renorm)
        want = ops.moe_ffn(x, router, w13, w2, top_k, s13, s2, renorm)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    # Every token to expert 0 (rank 0's): the other ranks receive nothing.
    skewed = router.clone()
    skewed[0] = 0
    x_pos = x.abs() + 0.1
    skewed[0, 0] = 1e3
    got = ep.moe_ffn(x_pos, skewed, local13, local2, 1, shared13, shared2)
    want = ops.moe_ffn(x_pos, skewed, w13, w2, 1, shared13, shared2)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_expert_parallel_moe_ffn_matches_single_process(tmp_path, world):
    _spawn(_op_worker, world, tmp_path)


# ---- the model and the sharded loader ---------------------------------------------------------


def _model_worker(rank: int, world: int, init: str, root: str) -> None:
    _init(rank, world, init)
    root = Path(root)
    full = from_pretrained(root / "target", dtype=torch.float64)
    ep = ExpertParallel(full.config.num_experts)
    read: set[str] = set()
    opened = ckpt._open

    class Recording:
        def __init__(self, handle):
            self.handle = handle

        def keys(self):
            return self.handle.keys()

        def get_tensor(self, name):
            read.add(name)
            return self.handle.get_tensor(name)

    ckpt._open = lambda file: Recording(opened(file))
    try:
        model = from_pretrained(root / "target", dtype=torch.float64, expert_parallel=ep)
    finally:
        ckpt._open = opened
    # Each rank read its own experts and the replicated tensors, never another rank's experts.
    experts = {ckpt._expert_index(n) for n in read} - {None}
    assert experts == set(range(ep.first, ep.last)), (rank, experts)
    assert {n for n in read if ckpt._expert_index(n) is None} == {
        n for n, _ in ckpt.hf_tensors(full) if ckpt._expert_index(n) is None
    }

    # Data-parallel attention, expert-parallel MoE: every rank its own prompt (rank 1 none).
    prompts = {0: [1, 2, 3, 4, 5], 1: [], 2: [7, 8], 3: [9] * 11}
    prompt = prompts[rank % 4]
    if prompt:
        ids = torch.tensor([prompt])
        torch.testing.assert_close(model(ids), full(ids), rtol=1e-9, atol=1e-9)
    else:
        model.forward_idle()

    # Leader / followers: rank 0 decodes, the others serve their experts to it.
    ep.leader_announces = True
    if rank == 0:
        out = generate(model, [[3, 1, 4, 1, 5]], 12)
        ep.stop_followers(model.device)
        assert out == generate(full, [[3, 1, 4, 1, 5]], 12)
    else:
        assert ep.serve_followers(model) == 13  # the prompt but its last token, 12 steps
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_expert_parallel_model_and_sharded_load(tmp_path, checkpoints, world):
    _spawn(_model_worker, world, tmp_path, str(checkpoints))


def test_shard_experts_needs_a_matching_plan(tmp_path):
    _spawn(_plan_mismatch_worker, 2, tmp_path)


def _plan_mismatch_worker(rank: int, world: int, init: str) -> None:
    _init(rank, world, init)
    target, _ = _pair(experts=5)
    with pytest.raises(ValueError, match="5 experts, the expert-parallel plan 4"):
        shard_experts(target, ExpertParallel(4))
    ep = ExpertParallel(5)
    with pytest.raises(ValueError, match="router_w must have 5 rows"):
        ep.moe_ffn(
            torch.randn(2, 8), torch.randn(4, 8), torch.randn(1, 4, 8), torch.randn(1, 8, 2), 1
        )
    dist.destroy_process_group()


# ---- PEARL across processes ----------------------------------------------------------------------


def _pearl_worker(rank: int, world: int, init: str, root: str) -> None:
    """Rank 0: the draft. Ranks 1..: the target, expert-parallel when there are several."""
    _init(rank, world, init)
    root = Path(root)
    prompt = [5, 6, 7, 8, 9, 10]
    target_ranks = list(range(1, world))
    group = dist.new_group(target_ranks) if world > 2 else None
    if rank == 0:
        model = from_pretrained(root / "draft", dtype=torch.float64)
        full = from_pretrained(root / "target", dtype=torch.float64)
    else:
        ep = ExpertParallel(5, group, leader_announces=True) if world > 2 else None
        model = from_pretrained(root / "target", dtype=torch.float64, expert_parallel=ep)
    role, peer = ("draft", 1) if rank == 0 else ("target", 0)
    accepted = proposed = post_rounds = 0
    for gamma in (1, 3, 5):
        if rank >= 2:
            ep.serve_followers(model)
            continue
        out, stats = distributed_pearl_generate(model, prompt, 30, gamma, role, peer)
        if rank == 1 and ep is not None:
            ep.stop_followers(model.device)
        assert stats.emitted == 30 and stats.gamma == gamma
        accepted, proposed = accepted + stats.accepted, proposed + stats.proposed
        post_rounds += stats.extra["post_rounds"]
        if rank == 0:
            assert out == generate(full, [prompt], 30)[0], gamma
    if rank < 2:  # both modes and both outcomes were exercised
        assert 0 < accepted < proposed and post_rounds > 0
    # Sampling: both sides agree on what was emitted, and a seed reproduces it.
    if rank >= 2:
        ep.serve_followers(model)
        ep.serve_followers(model)
    else:
        runs = []
        for _ in range(2):
            g = torch.Generator().manual_seed(11 + rank)
            out, _ = distributed_pearl_generate(model, prompt, 20, 3, role, peer, temperature=1.0,
                                                top_p=0.95, generator=g)  # fmt: skip
            if rank == 1 and ep is not None:
                ep.stop_followers(model.device)
            runs.append(out)
        assert runs[0] == runs[1] and len(runs[0]) == 20
        mine = torch.tensor(runs[0])
        theirs = torch.empty_like(mine)
        dist.send(mine, peer) if rank == 0 else dist.recv(theirs, peer)
        dist.recv(theirs, peer) if rank == 0 else dist.send(mine, peer)
        assert torch.equal(mine, theirs)
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3, 4])
def test_distributed_pearl_greedy_equals_autoregressive(tmp_path, checkpoints, world):
    _spawn(_pearl_worker, world, tmp_path, str(checkpoints))


def test_distributed_pearl_bad_arguments():
    model = _pair()[1]
    with pytest.raises(ValueError, match="role must be"):
        distributed_pearl_generate(model, [1], 4, 2, "oracle", 1)
    for gamma in (0, 16):
        with pytest.raises(ValueError, match=rf"gamma must be in \[1, 15\], got {gamma}"):
            distributed_pearl_generate(model, [1], 4, gamma, "draft", 1)


def test_expert_parallel_needs_an_initialised_group():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        ExpertParallel(4)


def _handshake_worker(rank: int, world: int, init: str) -> None:
    _init(rank, world, init)
    _, draft = _pair()
    # The two sides disagree on gamma: both raise, neither hangs.
    with pytest.raises(ValueError, match=r"disagree: gamma (3 vs 4|4 vs 3)"):
        distributed_pearl_generate(draft, [1, 2, 3], 8, 3 + rank, ("draft", "target")[rank],
                                   1 - rank)  # fmt: skip
    dist.destroy_process_group()


def test_distributed_pearl_sides_must_agree(tmp_path):
    _spawn(_handshake_worker, 2, tmp_path)


def _launch_worker(rank: int, world: int, init: str, port: int, out: str, argv: list) -> None:
    """pearlmoe.distributed's entry point as torchrun would start it."""
    import contextlib

    from pearlmoe.distributed.__main__ import main

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    with open(f"{out}/rank{rank}.txt", "w") as f, contextlib.redirect_stdout(f):
        assert main([*argv, "--backend", "gloo"]) == 0


@pytest.mark.parametrize("mode, world", [("pearl", 3), ("ar", 2)])
def test_torchrun_entry_point_matches_single_process(tmp_path, mode, world):
    from pearlmoe import cli

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    prompt = "def main(argv):\n    "
    argv = [prompt, "--mode", mode, "--gamma", "3", "--max-new-tokens", "24"]
    _spawn(_launch_worker, world, tmp_path, port, str(tmp_path), argv)
    printed = (tmp_path / "rank0.txt").read_text()
    tokenizer = cli.load_tokenizer(cli.TARGET)
    target = from_pretrained(cli.TARGET, dtype=torch.float32)
    ids, _ = cli.decode("ar", target, None, tokenizer.encode(prompt).ids, 24, None, 0.0, None, 0)
    assert printed.startswith(prompt + tokenizer.decode(ids, skip_special_tokens=True) + "\n")
    assert f"[{mode}, {world} ranks] {len(ids)} tokens" in printed


def _sampling_worker(rank: int, world: int, init: str, out: str, n: int) -> None:
    """n sampled 2-token continuations at temperature 1, draft on rank 0, target on rank 1,
    with independent generators (seed + rank, as the API asks)."""
    _init(rank, world, init)
    target, draft = tiny_pair(vocab=16, noise=0.6, seed=1)
    model, role = (draft, "draft") if rank == 0 else (target, "target")
    g = torch.Generator().manual_seed(100 + rank)
    tokens = [distributed_pearl_generate(model, [1, 2, 3, 4, 5, 6], 2, 2, role, 1 - rank,
                                         temperature=1.0, generator=g)[0] for _ in range(n)]  # fmt: skip
    if rank == 0:
        save_file({"tokens": torch.tensor(tokens)}, f"{out}/tokens.safetensors")
    dist.destroy_process_group()


def test_distributed_pearl_sampling_follows_the_target_distribution(tmp_path):
    """The marginals of both sampled positions match the exact target distribution (and not
    the draft's), as for the single-process loops in test_decode."""
    n = 2000  # L1 error of n draws over 16 tokens ~ 0.05; the draft's own is > 0.2 away
    _spawn(_sampling_worker, 2, tmp_path, str(tmp_path), n)
    tokens = load_file(str(tmp_path / "tokens.safetensors"))["tokens"]  # [n, 2]
    target, draft = tiny_pair(vocab=16, noise=0.6, seed=1)
    prompt = [1, 2, 3, 4, 5, 6]
    with torch.no_grad():
        p1 = torch.softmax(target(torch.tensor([prompt]))[0, -1], -1)  # [V]
        nxt = torch.tensor([[*prompt, x] for x in range(16)])
        p2 = p1 @ torch.softmax(target(nxt)[:, -1], -1)  # [V]
        q1 = torch.softmax(draft(torch.tensor([prompt]))[0, -1], -1)
    assert (q1 - p1).abs().sum() > 0.2  # trusting the draft would fail below
    for i, want in enumerate((p1, p2)):
        freq = torch.bincount(tokens[:, i], minlength=16).double() / n
        assert (freq - want).abs().sum() < 0.09, (i, freq, want)
