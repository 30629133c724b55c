// Torch-free batched speculative-decoding verification (Leviathan / Chen rejection sampling, and
// its greedy special case): the semantics and the CPU kernel (one sequence at a time). The CUDA
// kernel (spec_verify.cu, one block per sequence) follows the same rules.
//
// For sequence b with n drafts x_i (proposed with draft distribution q_i) and target rows p_0..p_n:
//   greedy (no q): accept x_i iff x_i == argmax p_i (ties to the lower id);
//   sampling:      accept x_i iff u_i · q_i(x_i) <= p_i(x_i)   (u_i ~ U[0, 1): u_i <= p/q);
// the first rejection at i emits argmax p_i (greedy) or a sample of normalise(max(p_i - q_i, 0))
// drawn with u_n by inverse CDF, and stops; if all n are accepted, the bonus token is argmax p_n
// or a sample of p_n with u_n. tokens = the accepted drafts, then that token, then -1.
//
// Defined for any input, so that unchecked values (the op skips its data checks under CUDA-graph
// capture) cannot fault or hang: a draft id outside [0, V) is rejected without being read, and a
// row without mass samples token 0 (the op's checks reject such rows otherwise).
#pragma once

#include <cmath>
#include <cstdint>

namespace pearlmoe::spec_decode {

struct SpecVerifyParams {
  const float* target_probs;  // [B, n+1, V]
  const int64_t* draft_ids;   // [B, n], each in [0, V)
  const float* draft_probs;   // [B, n, V] (sampling; may be null when n = 0)
  const float* uniforms;      // [B, n+1] in [0, 1) (sampling)
  int64_t* tokens;            // [B, n+1] out
  int32_t* num_accepted;      // [B] out
  int64_t batch, num_drafts, vocab;
  bool sampling;  // stated, not inferred from draft_probs: an empty tensor's pointer may be null
};

// Index of the largest value, ties to the lower index.
inline int64_t argmax(const float* p, int64_t vocab) {
  int64_t best = 0;
  for (int64_t v = 1; v < vocab; ++v) {
    if (p[v] > p[best]) best = v;
  }
  return best;
}

// Rejection sampling's test: draft token x, proposed with probabilities q, is kept against the
// target's p with probability min(1, p[x] / q[x]), here for the uniform u in [0, 1).
inline bool keeps_draft(const float* p, const float* q, int64_t x, float u) {
  return u * q[x] <= p[x];
}

// Inverse-CDF sample of the weights max(p - q, 0) (q may be null: the weights are p) with
// u in [0, 1); falls back to p if the weights carry no mass, and to token 0 if p has none either.
inline int64_t sample_residual(const float* p, const float* q, int64_t vocab, float u) {
  auto weight = [&](int64_t v) { return q == nullptr ? p[v] : std::fmax(p[v] - q[v], 0.f); };
  double total = 0.0;
  for (int64_t v = 0; v < vocab; ++v) total += weight(v);
  if (!(total > 0.0)) return q == nullptr ? 0 : sample_residual(p, nullptr, vocab, u);
  const double threshold = static_cast<double>(u) * total;
  double cum = 0.0;
  int64_t last = 0;
  for (int64_t v = 0; v < vocab; ++v) {
    const double w = weight(v);
    if (w <= 0.0) continue;
    cum += w;
    last = v;
    if (cum > threshold) return v;
  }
  return last;  // rounding left the threshold at the very top
}

// One sequence (pointers already offset to it).
inline int32_t spec_verify_sequence(const float* target, const int64_t* drafts, const float* draft,
                                    const float* uniforms, int64_t n, int64_t vocab, bool sampling,
                                    int64_t* tokens) {
  for (int64_t i = 0; i <= n; ++i) tokens[i] = -1;
  for (int64_t i = 0; i < n; ++i) {
    const float* p = target + i * vocab;
    const int64_t x = drafts[i];
    const bool in_range = x >= 0 && x < vocab;
    const int64_t best = sampling ? -1 : argmax(p, vocab);  // the correction too, if rejected
    const bool accept =
        in_range && (sampling ? keeps_draft(p, draft + i * vocab, x, uniforms[i]) : x == best);
    if (!accept) {
      tokens[i] = sampling ? sample_residual(p, draft + i * vocab, vocab, uniforms[n]) : best;
      return static_cast<int32_t>(i);
    }
    tokens[i] = x;
  }
  const float* p = target + n * vocab;
  tokens[n] = sampling ? sample_residual(p, nullptr, vocab, uniforms[n]) : argmax(p, vocab);
  return static_cast<int32_t>(n);
}

}  // namespace pearlmoe::spec_decode
