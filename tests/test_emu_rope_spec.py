"""rope_norm and spec_verify CUDA kernels under the CPU emulator (tests/emu/): RoPE + RMSNorm
against the golden reference (head_dim 2..128, fp32/bf16/fp16, strided rows, large positions),
and speculative verification against its CPU twin, token for token (vocabularies 1..1000, 0..4
drafts, greedy and sampling, ties, p == q), with two scheduling seeds."""

import pytest
import torch

import emu_kernels
from conftest import assert_close_to_oracle
from pearlmoe import reference

pytestmark = pytest.mark.emu  # bench/device_check.sh skips these: the GPU runs the kernels

SEEDS = [0, 11]


def inv_freq(base, dim):
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))  # as HF


def rope_norm_ref(x, positions, base, weight, eps, normalize):
    out = reference.rope(x, positions, base)
    return reference.rms_norm(out, weight, eps) if normalize else out


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("tokens", "heads", "dim"), [(1, 1, 2), (7, 3, 8), (33, 10, 80), (5, 2, 128), (4, 1, 64)]
)
def test_rope_norm(tokens, heads, dim, dtype, seed):
    g = torch.Generator().manual_seed(tokens * dim)
    wide = torch.randn(tokens, heads + 2, dim, generator=g).to(dtype)
    x = wide[:, 1 : 1 + heads]  # token stride (H + 2) D, offset D
    positions = torch.randint(0, 262144, (tokens,), generator=g)
    base = 1.343e9 if dim == 80 else 1e4
    for normalize, weight in [
        (True, torch.rand(dim, generator=g) + 0.5),
        (True, None),
        (False, None),
    ]:
        r = emu_kernels.rope_norm(x, positions, inv_freq(base, dim), weight, 1e-5, normalize,
                                  seed=seed).check()  # fmt: skip
        low = rope_norm_ref(x, positions, base, weight, 1e-5, normalize).to(dtype)
        oracle = rope_norm_ref(x.double(), positions, base, weight, 1e-5, normalize)
        assert_close_to_oracle(r.outputs["out"], low, oracle, floor=1e-5)


@pytest.mark.parametrize("dim", [130, 7])
def test_rope_norm_rejects_head_dims(dim):
    x = torch.randn(2, 1, dim)
    r = emu_kernels.rope_norm(x, torch.arange(2), inv_freq(1e4, dim - dim % 2))
    assert r.status == 1 and r.launches == []


def _probs(rows, vocab, g, zeros=0.3):
    p = torch.rand(rows, vocab, generator=g)
    p = torch.where(p < zeros, 0.0, p)
    p[:, 0] += 1e-3  # every row has mass
    return p / p.sum(-1, keepdim=True)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("vocab", [1, 5, 300, 1000])
@pytest.mark.parametrize("drafts", [0, 1, 4])
def test_spec_verify(vocab, drafts, seed):
    g = torch.Generator().manual_seed(vocab * 10 + drafts)
    batch = 3
    for variant in ("random", "ties", "p-equals-q", "accept-greedy"):
        target = _probs(batch * (drafts + 1), vocab, g).view(batch, drafts + 1, vocab)
        draft = _probs(batch * drafts, vocab, g).view(batch, drafts, vocab)
        if variant == "ties":  # many equal probabilities: argmax and the inverse CDF on ties
            target = torch.full_like(target, 1.0 / vocab)
        if variant == "p-equals-q":  # no residual mass: the correction samples p itself
            draft = target[:, :drafts].clone()
        ids = torch.randint(0, vocab, (batch, drafts), generator=g)
        if variant == "accept-greedy":
            ids = target[:, :drafts].argmax(-1)
        uniforms = torch.rand(batch, drafts + 1, generator=g)
        for d, u in ((None, None), (draft, uniforms)):
            r = emu_kernels.spec_verify(target, ids, d, u, seed=seed).check()
            want = torch.ops.pearlmoe.spec_verify(target, ids, d, u)
            assert torch.equal(r.outputs["tokens"], want[0]), variant
            assert torch.equal(r.outputs["num_accepted"], want[1]), variant


def test_spec_verify_unchecked_values_stay_defined():
    """Under CUDA-graph capture the op cannot check values; the kernel must still finish, stay in
    bounds and agree with the documented rule: out-of-range draft ids are rejected unread, a row
    without mass gives token 0 (the CPU twin's rule too)."""
    target = torch.full((3, 3, 5), 0.2)
    target[0, 0] = 0  # rejected row without mass: greedy argmax 0 / sampled 0
    target[2, 2] = 0  # bonus row without mass
    draft = torch.full((3, 2, 5), 0.2)
    ids = torch.tensor([[1, 1], [-3, 1], [0, 1 << 40]])
    uniforms = torch.full((3, 3), 0.5)
    for d, u in ((None, None), (draft, uniforms)):
        tokens = emu_kernels.spec_verify(target, ids, d, u).check().outputs["tokens"]
        assert tokens[0, 0] == 0 and tokens[1, 1] == -1 and tokens[2, 1] in range(5)
        if d is not None:
            assert tokens.tolist() == [[0, -1, -1], [2, -1, -1], [0, 2, -1]]
