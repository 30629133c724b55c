// CPU kernels (ATen tensors in, parallelised with at::parallel_for). Inputs are already checked
// by csrc/ops; outputs are preallocated.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace pearlmoe::cpu {

// logits [T, E] f32 contiguous -> weights [T, k] f32, ids [T, k] int32
void topk_softmax(const at::Tensor& logits, int64_t k, bool renormalize, at::Tensor& weights,
                  at::Tensor& ids);
void grouped_topk(const at::Tensor& logits, const float* bias, int64_t k, int64_t num_groups,
                  int64_t topk_groups, bool renormalize, double scaling, at::Tensor& weights,
                  at::Tensor& ids);

// topk_ids [T, k] int32|int64 contiguous -> sorted_slots [N], slot_to_row [N], offsets [E+1]
// Returns the first slot holding an id outside {-1} U [0, E), or -1.
int64_t moe_align(const at::Tensor& topk_ids, int64_t num_experts, at::Tensor& sorted_slots,
                  at::Tensor& slot_to_row, at::Tensor& expert_offsets);

}  // namespace pearlmoe::cpu

namespace pearlmoe::cpu {

// out [M, N] = a [M, K] (unit last stride) · b [N, K]^T (b contiguous). A few rows against a large
// b (decode, verification) stream b once through the skinny kernel, split over N across threads;
// everything else goes to BLAS.
void gemm_nt_out(const at::Tensor& a, const at::Tensor& b, at::Tensor& out);
// out = silu(gate) * up, [T, I] each (gate and up may be strided halves), row by row in parallel.
void silu_mul_out(const at::Tensor& gate, const at::Tensor& up, at::Tensor& out);
// Whether gemm_nt_out (and qlinear) computes each of `rows` rows of a dtype-typed a as a call
// holding that row alone would: the skinny kernels, fp32 / bf16 up to kSkinnyMaxRows rows.
bool gemm_rows_alone(int64_t rows, at::ScalarType dtype);

// The name of the skinny kernel's instruction set on this CPU (avx512bf16, avx512 or generic).
const char* skinny_isa();

// Rows offs[g]:offs[g+1] of a [M, K] times b[g]^T (b [G, N, K]) into c [M, N]; rows at or beyond
// offs[G] are zeroed. offs is a host array of G + 1 validated offsets.
void grouped_gemm(const at::Tensor& a, const at::Tensor& b, const int32_t* offs, at::Tensor& c);

// grad_b[g] = grad_c[rows of g]^T · a[rows of g]: grad_c [M, N], a [M, K] -> grad_b [G, N, K].
void grouped_gemm_wgrad(const at::Tensor& grad_c, const at::Tensor& a, const int32_t* offs,
                        at::Tensor& grad_b);

// The routed experts plus the optional shared expert, fused per expert (gather, gate/up GEMM,
// SiLU·up, down GEMM), then the weighted combine. Inputs are checked and contiguous; topk_ids
// hold only -1 or [0, E).
at::Tensor moe_ffn_routed(const at::Tensor& x, const at::Tensor& topk_weights,
                          const at::Tensor& topk_ids, const at::Tensor& w13, const at::Tensor& w2,
                          const std::optional<at::Tensor>& shared_w13,
                          const std::optional<at::Tensor>& shared_w2);

// The whole MoE FFN (fp32 router, softmax top-k, experts, combine) for a decode- or
// verification-sized call, without ATen calls; each token's router logits and output computed
// the same way whatever the other tokens of the call. Returns false (y untouched) when the call
// is not small or its layouts don't fit, and the caller takes the general path.
bool moe_ffn_small_call(const at::Tensor& x, const at::Tensor& router_w, const at::Tensor& w13,
                        const at::Tensor& w2, int64_t top_k,
                        const std::optional<at::Tensor>& shared_w13,
                        const std::optional<at::Tensor>& shared_w2, bool renormalize,
                        at::Tensor& y);

}  // namespace pearlmoe::cpu

namespace pearlmoe::cpu {

// Causal attention aligned bottom-right: small decode calls in direct loops, the rest as a blocked
// online softmax on BLAS (never an Sq x Skv matrix):
//   q [B, Sq, Hq, D], k/v [B, C, Hkv, D] (unit last stride), kv_lens host [B] (validated)
//   -> o [B, Sq, Hq, D] contiguous.
void attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
               const int32_t* kv_lens, double scale, at::Tensor& o);
// Whether attention computes each query row on its own (an exact softmax over its keys) for
// batch x q_len queries over at most `longest` keys: every row's result is then what a call
// holding that row alone computes.
bool attention_rows_alone(int64_t batch, int64_t q_len, int64_t longest);

// k_cache[b, positions[b, s]] = k[b, s] (v likewise): k, v [B, S, Hkv, D] contiguous, the caches
// one group [B, C, Hkv, D] with a contiguous head dim, positions host [B, S] validated.
void kv_cache_write(const at::Tensor& k, const at::Tensor& v, const int64_t* positions,
                    at::Tensor& k_cache, at::Tensor& v_cache);

// NeoX RoPE then (optionally) RMSNorm times q_weight ⊙ k_weight over x [T, H, D] (unit last
// stride) at positions (host int64 [T]) -> out [T, H, D] contiguous. The weights: [D]
// contiguous, any float dtype, each undefined when absent (folded in the accumulation dtype,
// fp64 for fp64 x, else fp32); inv_freq: fp32 [D/2]. Each token's angles are taken once for all
// its heads. cos_sin (optional, fp32 x or bf16 / fp16 x only): each token's cos then sin of its
// angles [T, D] as rope_cos_sin gives them, which a model step takes once for all its layers.
void rope_norm(const at::Tensor& x, const int64_t* positions, const at::Tensor& q_weight,
               const at::Tensor& k_weight, const float* inv_freq, double eps, bool normalize,
               at::Tensor& out, const float* cos_sin = nullptr);

// cos_sin [T, D] for rope_norm: token t's cos(pos · inv_freq[i]) at [t, i] and sin at
// [t, D/2 + i], in fp32 from the fp32 angle (what rope_norm computes for a non-fp64 x).
void rope_cos_sin(const int64_t* positions, int64_t tokens, const float* inv_freq, int64_t dim,
                  float* cos_sin);

}  // namespace pearlmoe::cpu

namespace pearlmoe::cpu {

// Batched speculative verification, sequences in parallel (inputs checked and contiguous).
void spec_verify(const at::Tensor& target_probs, const at::Tensor& draft_ids,
                 const std::optional<at::Tensor>& draft_probs,
                 const std::optional<at::Tensor>& uniforms, at::Tensor& tokens,
                 at::Tensor& num_accepted);

}  // namespace pearlmoe::cpu

namespace pearlmoe::cpu {

// RMSNorm over the rows of x [rows, H] (unit last stride) into out [rows, H] contiguous, weight [H]
// contiguous in x's dtype; fp32 accumulation (fp64 for fp64), Hugging Face's rounding points.
void rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, at::Tensor& out);

}  // namespace pearlmoe::cpu
