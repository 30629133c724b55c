"""attention, rope_qk_norm and the CLA-shared KV cache against the golden reference."""

import pytest
import torch

import pearlmoe
from conftest import DEVICES, HAS_CUDA, assert_close_to_oracle
from pearlmoe import reference
from pearlmoe.model import KVCache
from pearlmoe.ops import ntk_alpha_rope_base

DTYPES = [("cpu", torch.float32), ("cpu", torch.bfloat16)]
if HAS_CUDA:
    DTYPES += [
        pytest.param("cuda", t, marks=pytest.mark.cuda) for t in (torch.bfloat16, torch.float16)
    ]

# (Sq, kv_lens per sequence, Hq, Hkv, D): decode, verification, prefill; GQA ratios 10, 8, 1;
# sequences of different lengths in one batch; buffers longer than any sequence.
ATTN_CASES = [
    (1, [1, 4099, 257], 10, 1, 80),
    (4, [4, 517, 4099], 8, 1, 64),
    (113, [113, 2000], 2, 2, 128),
    (803, [803, 4099], 10, 1, 80),
    (1, [1], 1, 1, 64),
    (9, [9, 40], 10, 1, 80),  # speculative verification of 8 drafts
    (63, [63, 100], 10, 1, 80),  # CUDA: several row groups of the split-KV kernel
    (64, [64, 300], 10, 1, 80),  # CUDA: the prefill kernel's smallest query length
    (65, [65, 129], 8, 1, 128),
    # The CPU's direct decode path (≤ 16 query rows per KV head, ≤ 1M multiply-adds):
    (1, [1, 37, 200], 8, 2, 64),
    (2, [2, 129], 4, 2, 64),
    (3, [3, 200, 61], 4, 4, 80),
]


def _qkv(q_len, lens, q_heads, kv_heads, dim, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    capacity = max(lens) + 3
    q = torch.randn(len(lens), q_len, q_heads, dim, generator=g)
    k = torch.randn(len(lens), capacity, kv_heads, dim, generator=g)
    v = torch.randn(len(lens), capacity, kv_heads, dim, generator=g)
    for b, n in enumerate(lens):  # the buffer past each sequence holds garbage: never read it
        k[b, n:] = float("nan")
        v[b, n:] = float("nan")
    kv_lens = torch.tensor(lens, dtype=torch.int32)
    return [t.to(device, dtype) for t in (q, k, v)] + [kv_lens.to(device)]


@pytest.mark.parametrize(("device", "dtype"), DTYPES)
@pytest.mark.parametrize(
    "case", ATTN_CASES, ids=[f"Sq{c[0]}-L{max(c[1])}-G{c[2] // c[3]}-D{c[4]}" for c in ATTN_CASES]
)
def test_attention_matches_reference(device, dtype, case):
    q, k, v, kv_lens = _qkv(*case, dtype, device, seed=sum(case[1]))
    out = pearlmoe.attention(q, k, v, kv_lens)
    assert out.shape == q.shape and out.dtype == dtype
    cpu = [t.cpu() for t in (q, k, v, kv_lens)]
    low = reference.attention(*cpu)
    oracle = reference.attention(*[t.double() for t in cpu[:3]], cpu[3])
    assert out.isfinite().all()
    assert_close_to_oracle(out, low, oracle, floor=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("q_heads", "kv_heads", "dim", "longest"),
    [(4, 2, 64, 130), (10, 1, 80, 130), (8, 8, 128, 130), (6, 2, 96, 130), (2, 1, 200, 130),
     (10, 1, 80, 1000)],  # the last: long keys, so blocks of fewer positions
)  # fmt: skip
def test_attention_cpu_window_rows_equal_their_own_steps(dtype, q_heads, kv_heads, dim, longest):
    """Each query position of a window gives bitwise what a one-token call at that position
    gives: the CPU kernel scores a block of positions' rows in one GEMM over the last row's keys
    and sums each row over its own, which greedy speculative decoding's equality with
    autoregressive decoding rests on. Sequences of different lengths, key counts around multiples
    of 4 and 16, head dims off multiples of 64, a 40-token prompt (blocks past the first)."""
    for window in (1, 2, 3, 5, 9, 16, 40):
        lens = [window + 3, 64 + window, longest]
        if window > 16 and len(lens) * window * longest > 1 << 16:
            continue  # a prompt this long over these keys takes the blocked (BLAS) path
        q, k, v, kv_lens = _qkv(window, lens, q_heads, kv_heads, dim, dtype, "cpu", seed=window)
        out = pearlmoe.attention(q, k, v, kv_lens)
        for i in range(window):
            step = pearlmoe.attention(q[:, i : i + 1], k, v, kv_lens - (window - 1 - i))
            assert torch.equal(out[:, i : i + 1], step), (window, i)


@pytest.mark.parametrize("device", DEVICES)
def test_attention_scale_and_strided_inputs(device):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    q, k, v, kv_lens = _qkv(3, [9, 5], 4, 2, 64, dtype, device, seed=3)
    q_strided = q.transpose(1, 2).contiguous().transpose(1, 2)  # same values, head-major memory
    out = pearlmoe.attention(q_strided, k, v, kv_lens, scale=0.3)
    want = reference.attention(
        q.cpu().float(), k.cpu().float(), v.cpu().float(), kv_lens.cpu(), scale=0.3
    )
    torch.testing.assert_close(out.cpu().float(), want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (
            dict(k=torch.randn(2, 16, 3, 64), v=torch.randn(2, 16, 3, 64)),
            r"the 4 query heads must be a multiple of the 3 KV heads",
        ),
        (
            dict(kv_lens=torch.tensor([5, 17], dtype=torch.int32)),
            r"kv_lens\[1\] = 17 exceeds the K/V buffer length 16",
        ),
        (
            dict(kv_lens=torch.tensor([5, 2], dtype=torch.int32)),
            r"kv_lens\[1\] = 2 is smaller than Sq = 3",
        ),
        (dict(kv_lens=torch.tensor([5, 9])), r"kv_lens must be Int, got Long"),
        (dict(kv_lens=torch.tensor([5], dtype=torch.int32)), r"kv_lens must have B = 2 entries"),
        (dict(v=torch.randn(2, 16, 2, 32)), r"k and v must have the same shape"),
        (
            dict(k=torch.randn(2, 16, 2, 32), v=torch.randn(2, 16, 2, 32)),
            r"k must be \[B, Skv, Hkv, D\] with B = 2 and D = 64",
        ),
        (dict(q=torch.randn(2, 3, 4, 64).double()), r"q, k and v must share a dtype"),
        (dict(q=torch.randn(3, 4, 64)), r"q must be 4-D"),
    ],
    ids=[
        "gqa",
        "len>buffer",
        "Sq>len",
        "lens-int64",
        "lens-B",
        "v-shape",
        "k-D",
        "dtype",
        "q-rank",
    ],
)
def test_attention_bad_input(change, match):
    args = dict(
        q=torch.randn(2, 3, 4, 64),
        k=torch.randn(2, 16, 2, 64),
        v=torch.randn(2, 16, 2, 64),
        kv_lens=torch.tensor([5, 9], dtype=torch.int32),
    )
    args.update(change)
    with pytest.raises(RuntimeError, match=r"pearlmoe\.attention: " + match):
        pearlmoe.attention(**args)


# ---- RoPE + QK norm ------------------------------------------------------------------------------


def test_ntk_alpha_base():
    assert ntk_alpha_rope_base(1e4, 1e5, 80) == pytest.approx(1.343e9, rel=1e-3)
    assert ntk_alpha_rope_base(1e4, 1e3, 80) == pytest.approx(1.194e7, rel=1e-3)


@pytest.mark.parametrize(("device", "dtype"), [("cpu", torch.float32), ("cpu", torch.bfloat16)]
                         + ([pytest.param("cuda", torch.bfloat16, marks=pytest.mark.cuda)] if HAS_CUDA else []))  # fmt: skip
@pytest.mark.parametrize("normalize", [True, False])
def test_rope_qk_norm_matches_reference(device, dtype, normalize):
    g = torch.Generator().manual_seed(int(normalize))
    tokens, dim = 257, 80
    q = torch.randn(tokens, 10, dim, generator=g).to(device, dtype)
    k = torch.randn(tokens, 1, dim, generator=g).to(device, dtype)
    positions = torch.randint(0, 262144, (tokens,), generator=g).to(device)
    weights = (
        [torch.rand(dim, generator=g).to(device) + 0.5 for _ in range(2)]
        if normalize
        else [None, None]
    )
    base = ntk_alpha_rope_base(1e4, 1e5, dim)
    q_out, k_hat = pearlmoe.rope_qk_norm(q, k, positions, base, *weights, 1e-5, normalize)
    cpu_w = [w if w is None else w.cpu() for w in weights]
    args = (positions.cpu(), base, *cpu_w, 1e-5, normalize)
    low = reference.rope_qk_norm(q.cpu(), k.cpu(), *args)
    oracle = reference.rope_qk_norm(q.cpu().double(), k.cpu().double(), *args)
    for got, lo, want in zip((q_out, k_hat), low, oracle, strict=True):
        assert_close_to_oracle(got, lo, want, floor=1e-5)


def test_rope_qk_norm_bad_base():
    q, k, pos = torch.randn(4, 2, 8), torch.randn(4, 1, 8), torch.arange(4)
    for base in (0.0, -1e4, float("nan"), float("inf")):
        with pytest.raises(
            RuntimeError, match=r"rope_qk_norm: rope_base must be a positive finite"
        ):
            pearlmoe.rope_qk_norm(q, k, pos, base)


def test_rope_qk_norm_bad_input():
    q, k, pos = torch.randn(4, 2, 8), torch.randn(4, 1, 8), torch.arange(4)
    with pytest.raises(RuntimeError, match=r"rope_qk_norm: positions must have T = 4 entries"):
        pearlmoe.rope_qk_norm(q, k, pos[:3], 1e4)
    with pytest.raises(
        RuntimeError, match=r"rope_qk_norm: q_weight must have head_dim = 8 entries"
    ):
        pearlmoe.rope_qk_norm(q, k, pos, 1e4, torch.ones(7))
    with pytest.raises(RuntimeError, match=r"rope_qk_norm: k must be \[T, Hkv, D\]"):
        pearlmoe.rope_qk_norm(q, torch.randn(4, 1, 6), pos, 1e4)
    with pytest.raises(RuntimeError, match=r"q_weight given, but normalize=False"):
        pearlmoe.rope_qk_norm(q, k, pos, 1e4, torch.ones(8), normalize=False)
    with pytest.raises(RuntimeError, match=r"head_dim must be even"):
        pearlmoe.rope_qk_norm(torch.randn(4, 2, 7), torch.randn(4, 1, 7), pos, 1e4)


# ---- CLA: one normalised key per layer pair ------------------------------------------------------


def test_cla_shared_cache_equals_per_layer_caches():
    """Two layers of a CLA pair (Hunyuan-Large: the odd layer reuses the even layer's raw K/V and
    applies its own key norm) computed from one cached k_hat with folded key-norm weights equal
    the reference's per-layer computation, through prefill and two decode steps."""
    g = torch.Generator().manual_seed(0)
    q_heads, kv_heads, dim, steps = 10, 2, 64, [7, 1, 1]
    base = ntk_alpha_rope_base(1e4, 1e3, dim)
    total = sum(steps)
    q = [torch.randn(1, total, q_heads, dim, generator=g) for _ in range(2)]  # per layer
    k_raw = torch.randn(1, total, kv_heads, dim, generator=g)  # the even layer's k_proj output
    v = torch.randn(1, total, kv_heads, dim, generator=g)
    w_q = [torch.rand(dim, generator=g) + 0.5 for _ in range(2)]
    w_k = [torch.rand(dim, generator=g) + 0.5 for _ in range(2)]

    # Reference: each layer rotates and normalises with its own weights, attends over everything.
    positions = torch.arange(total)
    want = []
    for layer in range(2):
        q_ref = reference.rms_norm(reference.rope(q[layer][0], positions, base), w_q[layer])
        k_ref = reference.rms_norm(reference.rope(k_raw[0], positions, base), w_k[layer])
        want.append(
            reference.attention(
                q_ref[None].float(),
                k_ref[None].float(),
                v,
                torch.tensor([total], dtype=torch.int32),
            )
        )

    cache = KVCache(num_layers=2, cla_share_factor=2, batch_size=1, capacity=16,
                    kv_heads=kv_heads, head_dim=dim, dtype=torch.float32)  # fmt: skip
    outs = [[], []]
    start = 0
    for n in steps:
        pos = cache.positions(n)[0]
        assert pos.tolist() == list(range(start, start + n))
        sl = slice(start, start + n)
        for layer in range(2):
            q_out, k_hat = pearlmoe.rope_qk_norm(
                q[layer][0, sl], k_raw[0, sl], pos, base, w_q[layer], w_k[layer]
            )
            if cache.owns_kv(layer):
                cache.write(layer, k_hat[None], v[:, sl])
            k_buf, v_buf = cache.buffers(layer)
            outs[layer].append(pearlmoe.attention(q_out[None], k_buf, v_buf, cache.kv_lens(n)))
        cache.advance(n)
        start += n
    for layer in range(2):
        torch.testing.assert_close(torch.cat(outs[layer], dim=1), want[layer], rtol=1e-4, atol=1e-5)
    assert cache.k.shape[0] == 1  # one buffer for the pair


def test_kv_cache_bytes_per_token_hunyuan_large():
    # 64 layers, CLA pairs, 8 KV heads of 80, bf16: 2 · 8 · 80 · 32 · 2 bytes.
    assert KVCache.bytes_per_token(64, 8, 80, cla_share_factor=2, dtype=torch.bfloat16) == 81920
    assert KVCache.bytes_per_token(64, 8, 80, cla_share_factor=1, dtype=torch.bfloat16) == 163840
    cache = KVCache(
        num_layers=6, cla_share_factor=2, batch_size=3, capacity=5, kv_heads=2, head_dim=8
    )
    stored = cache.k.numel() * cache.k.element_size() + cache.v.numel() * cache.v.element_size()
    assert stored == 3 * 5 * KVCache.bytes_per_token(6, 2, 8, 2)


def test_kv_cache_lengths_rollback_and_capacity():
    cache = KVCache(
        num_layers=2, batch_size=2, capacity=6, kv_heads=1, head_dim=4, dtype=torch.float32
    )
    k = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 1, 4)
    cache.write(0, k, k, num_new=[3, 1])  # left-padded: sequence 1 brings only its last row
    assert cache.kv_lens([3, 1]).tolist() == [3, 1]
    cache.advance([3, 1])
    assert cache.seq_lens() == [3, 1] and cache.lens.tolist() == [3, 1]
    assert torch.equal(cache.k[0, 1, 0], k[1, 2])  # the real row, not the padding
    assert cache.positions(2, [2, 1]).tolist() == [[3, 4], [0, 1]]  # row 0 of seq 1 pads
    cache.truncate([2, 1])
    assert cache.seq_lens() == [2, 1]
    with pytest.raises(
        RuntimeError, match=r"sequence 0 would hold 7 tokens, past the cache's capacity of 6"
    ):
        cache.advance([5, 0])
    with pytest.raises(ValueError, match=r"cannot truncate lengths \[2, 1\] to \[3, 1\]"):
        cache.truncate([3, 1])
    with pytest.raises(ValueError, match=r"num_new must give 0..3 new tokens"):
        cache.write(0, k, k, num_new=[4, 1])
    with pytest.raises(IndexError, match=r"layer 2 out of range"):
        cache.group(2)


def test_attention_kv_lens_views_are_checked_as_read():
    """Issue 13 item 8: kv_lens given as a strided or expanded view is checked element for
    element as the kernel reads it (the check used to index the raw storage)."""
    q, k, v, _ = _qkv(3, [9, 5], 4, 2, 64, torch.float32, "cpu", seed=4)  # capacity 12
    want = reference.attention(q, k, v, torch.tensor([9, 5], dtype=torch.int32))
    strided = torch.tensor([9, 0, 5, 0], dtype=torch.int32)[::2]  # valid; the raw [9, 0] is not
    torch.testing.assert_close(pearlmoe.attention(q, k, v, strided), want)
    same = torch.tensor([5], dtype=torch.int32).expand(2)
    torch.testing.assert_close(
        pearlmoe.attention(q, k, v, same),
        reference.attention(q, k, v, torch.tensor([5, 5], dtype=torch.int32)),
    )
    bad = torch.tensor([5, 9, 100, 9], dtype=torch.int32)[::2]  # [5, 100]; the raw [5, 9] is fine
    with pytest.raises(RuntimeError, match=r"kv_lens\[1\] = 100 exceeds the K/V buffer length 12"):
        pearlmoe.attention(q, k, v, bad)


# ---- CUDA: the decode step's calls neither sync nor copy, and replay in a CUDA graph ------------


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (none present)")
def test_attention_and_rope_without_sync_and_in_a_cuda_graph():
    """Issue 13 items 2 and 3: device kv_lens are not read by the host and rope_qk_norm builds
    no table per call, so neither syncs (sync debug mode raises on any) and both capture; the
    graph replays with lengths changed on the device."""
    dev, dtype = "cuda", torch.bfloat16
    q, k, v, lens = _qkv(1, [300, 300], 10, 1, 80, dtype, dev, seed=7)  # no NaN below 300
    qr, kr = (
        torch.randn(2, 10, 80, device=dev, dtype=dtype),
        torch.randn(2, 1, 80, device=dev, dtype=dtype),
    )
    pos = torch.tensor([299, 39], device=dev)
    w = torch.rand(80, device=dev) + 0.5
    pearlmoe.rope_qk_norm(qr, kr, pos, 1e6, w, w)  # builds the (base, D) table once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        pearlmoe.attention(q, k, v, lens)
        pearlmoe.rope_qk_norm(qr, kr, pos, 1e6, w, w)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        pearlmoe.attention(q, k, v, lens)  # warm-up outside the graph
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph):
        out = pearlmoe.attention(q, k, v, lens)
        q_out, _ = pearlmoe.rope_qk_norm(qr, kr, pos, 1e6, w, w)
    for new in ([300, 40], [17, 3], [1, 299]):
        lens.copy_(torch.tensor(new, dtype=torch.int32))
        graph.replay()
        torch.cuda.synchronize()
        cpu = [t.cpu().float() for t in (q, k, v)]
        want = reference.attention(*cpu, lens.cpu())
        torch.testing.assert_close(out.cpu().float(), want, rtol=3e-2, atol=3e-2)
    want_q, _ = reference.rope_qk_norm(qr.cpu(), kr.cpu(), pos.cpu(), 1e6, w.cpu(), w.cpu())
    torch.testing.assert_close(q_out.cpu().float(), want_q.float(), rtol=3e-2, atol=3e-2)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (none present)")
def test_attention_cpu_kv_lens_refused_under_capture():
    q, k, v, lens = _qkv(1, [30, 40], 4, 1, 64, torch.bfloat16, "cuda", seed=8)
    pearlmoe.attention(q, k, v, lens.cpu())  # eager: checked on the host, copied without a sync
    graph = torch.cuda.CUDAGraph()
    match = r"kv_lens on the CPU cannot be used under CUDA-graph capture"
    with pytest.raises(RuntimeError, match=match), torch.cuda.graph(graph):
        pearlmoe.attention(q, k, v, lens.cpu())


def test_attention_cpu_prefill_leading_block_of_minus_inf_scores():
    """Issue 13 item 11: when every score of a leading key block is -inf (q·k overflows), the
    CPU's blocked path shifted by m = -inf and returned NaN; the reference and the decode path
    stay finite, since later keys are visible."""
    q_len, keys, dim = 128, 700, 8  # past the direct path's 2^16 query-key pairs
    q = torch.ones(1, q_len, 1, dim)
    k = torch.randn(1, keys, 1, dim, generator=torch.Generator().manual_seed(0))
    k[:, :512] = -3e38  # the first key blocks (256 keys at 128 rows) score -inf in fp32
    v = torch.randn(1, keys, 1, dim, generator=torch.Generator().manual_seed(1))
    lens = torch.tensor([keys], dtype=torch.int32)
    want = reference.attention(q, k, v, lens)
    assert want.isfinite().all()
    torch.testing.assert_close(pearlmoe.attention(q, k, v, lens), want, rtol=1e-4, atol=1e-5)
