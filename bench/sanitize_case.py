"""A small CUDA workload for compute-sanitizer (bench/device_check.sh): every kernel family on
awkward sizes, checked against the reference so a wrong answer fails too."""

import torch

import pearlmoe
from pearlmoe import reference


def main() -> None:
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    torch.manual_seed(0)
    for num_tokens, num_experts, k in [(1, 1, 1), (3, 16, 1), (33, 257, 8), (1025, 16, 2)]:
        logits = torch.randn(num_tokens, num_experts, device="cuda")
        weights, ids = pearlmoe.topk_softmax(logits, k, renormalize=k > 1)
        ref_w, ref_ids = reference.topk_softmax(logits.cpu(), k, renormalize=k > 1)
        assert torch.equal(ids.cpu(), ref_ids)
        torch.testing.assert_close(weights.cpu(), ref_w, rtol=1e-5, atol=1e-7)
        dropped = torch.where(torch.rand(ids.shape, device="cuda") < 0.1, -1, ids)
        for got, want in zip(
            pearlmoe.moe_align(dropped, num_experts),
            reference.moe_align(dropped.cpu(), num_experts),
            strict=True,
        ):
            assert torch.equal(got.cpu(), want)
    # The expert FFN: decode and prefill tile paths, dropped slots, shared expert.
    hidden, inter, experts = 64, 48, 5
    w13 = torch.randn(experts, 2 * inter, hidden, device="cuda", dtype=torch.bfloat16) / 8
    w2 = torch.randn(experts, hidden, inter, device="cuda", dtype=torch.bfloat16) / 8
    s13, s2 = w13[0].clone(), w2[0].clone()
    router_w = torch.randn(experts, hidden, device="cuda")
    for num_tokens in (1, 7, 333):
        x = torch.randn(num_tokens, hidden, device="cuda", dtype=torch.bfloat16)
        y = pearlmoe.moe_ffn(x, router_w, w13, w2, 2, s13, s2)
        cpu = [t.cpu().float() for t in (x, router_w, w13, w2, s13, s2)]
        want = reference.moe_ffn(*cpu[:4], 2, *cpu[4:])
        torch.testing.assert_close(y.cpu().float(), want, rtol=3e-2, atol=3e-2)
        offs = torch.tensor(
            [0, 0, num_tokens // 2, num_tokens // 2, num_tokens, num_tokens],
            dtype=torch.int32,
            device="cuda",
        )
        got = pearlmoe.grouped_gemm(x, w13, offs)
        want = reference.grouped_gemm(x.cpu().float(), w13.cpu().float(), offs.cpu())
        torch.testing.assert_close(got.cpu().float(), want, rtol=3e-2, atol=3e-2)
    # Attention: decode (split-KV), verification and prefill shapes, GQA 10, head_dim 80; a short
    # context in a long cache (device-side key ranges) and a long prefill (the split prefill path).
    for q_len, lens, capacity in [(1, [1, 700], 705), (4, [4, 300], 305), (70, [70, 129], 134),
                                  (1, [90, 2000], 16384), (64, [64, 3000], 4096)]:  # fmt: skip
        q = torch.randn(2, q_len, 10, 80, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(2, capacity, 1, 80, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        kv_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
        got = pearlmoe.attention(q, k, v, kv_lens)
        want = reference.attention(*(t.cpu().float() for t in (q, k, v)), kv_lens.cpu())
        torch.testing.assert_close(got.cpu().float(), want, rtol=3e-2, atol=3e-2)
        q_out, k_hat = pearlmoe.rope_qk_norm(
            q[0],
            k[0, :q_len],
            kv_lens.new_tensor(range(q_len)),
            1e6,
            torch.ones(80, device="cuda"),
            torch.ones(80, device="cuda"),
        )
        assert q_out.isfinite().all() and k_hat.isfinite().all()
    # Verification: greedy and sampling over a Hunyuan-sized vocabulary.
    target = torch.softmax(torch.randn(3, 5, 129_024, device="cuda"), -1)
    draft = torch.softmax(torch.randn(3, 4, 129_024, device="cuda"), -1)
    drafts = torch.randint(0, 129_024, (3, 4), device="cuda")
    for q in (None, draft):
        tokens, accepted = pearlmoe.spec_verify(target, drafts, q)
        assert ((tokens >= 0).sum(1) == accepted + 1).all()
    # GGUF-quantised projections: the gemv (up to 16 rows, a K tail past 32 blocks a lane) and
    # dequantize + cuBLAS paths, each format.
    g = torch.Generator().manual_seed(0)
    for fmt, size in reference.GGUF_BLOCK_BYTES.items():
        qweight = torch.randint(0, 256, (37, 33, size), dtype=torch.uint8, generator=g)
        qweight[..., 0:2] = torch.full((37, 33, 1), 0.01).half().view(torch.uint8)
        if fmt == "q4_1":
            qweight[..., 2:4] = torch.full((37, 33, 1), -0.05).half().view(torch.uint8)
        qweight = qweight.reshape(37, 33 * size)
        for rows in (1, 9, 40):
            x = torch.randn(rows, 33 * 32).bfloat16()
            got = pearlmoe.qlinear(x.cuda(), qweight.cuda(), fmt)
            want = reference.qlinear(x.float(), qweight, fmt)
            torch.testing.assert_close(got.cpu().float(), want, rtol=3e-2, atol=3e-2)
    torch.cuda.synchronize()
    print("sanitize case: ok")


if __name__ == "__main__":
    main()
