// The fused CPU decode loops' sampler (torch.classes.pearlmoe.CpuSampler): temperature, top-k
// and top-p as pearlmoe.decode.sampling applies them, and its own random stream, seeded from
// the caller's torch.Generator, so a sampled decode draws every token inside its C++ calls and
// is reproducible from the generator's state. One decode at a time: a sampler is not shared
// between threads.
#pragma once

#include <ATen/ATen.h>
#include <torch/custom_class.h>

#include <cstdint>
#include <random>
#include <vector>

#include "../kernels/spec_decode/sample_cpu.h"

namespace pearlmoe::cpu {

class Sampler : public torch::CustomClassHolder {
 public:
  // temperature > 0; top_k >= 0 (0: all tokens); top_p in (0, 1] (1: all); any seed.
  Sampler(double temperature, int64_t top_k, double top_p, int64_t seed);

  // For tests and callers outside the loops: the distributions [R, V] (fp32) of logits [R, V]
  // (fp32), and a token [R] (int64) drawn from each row of probs [R, V] (fp32).
  at::Tensor probs(const at::Tensor& logits);
  at::Tensor draw(const at::Tensor& probs);

  // Row r of a head's output rows [R, W] (fp32, bf16 or fp16; W = vocab, or a trimmed
  // vocabulary's width with ids [W] naming each column's token, the rest of the vocabulary
  // getting no mass) as probabilities over the whole vocabulary, into out [vocab]. `op` names the
  // caller in the error for a row with no finite logit.
  void row_probs(const char* op, const at::Tensor& rows, int64_t r, const int32_t* ids,
                 int64_t vocab, float* out);
  // A token drawn from probs [vocab] with the next uniform.
  int64_t draw_row(const float* probs, int64_t vocab) {
    return sampling_cpu::draw(probs, vocab, uniform());
  }
  // The next uniform in [0, 1) (24 bits, as a float holds them).
  float uniform() { return static_cast<float>(rng_() >> 40) * 0x1.0p-24f; }

 private:
  sampling_cpu::SampleParams params_;
  std::mt19937_64 rng_;
  std::vector<float> scratch_;
  std::vector<int32_t> order_;
};

}  // namespace pearlmoe::cpu
