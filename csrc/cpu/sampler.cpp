#include "sampler.h"

#include <limits>

#include "../ops/checks.h"

namespace pearlmoe::cpu {
namespace {
constexpr const char* kSampler = "CpuSampler";
}  // namespace

Sampler::Sampler(double temperature, int64_t top_k, double top_p, int64_t seed)
    : rng_(static_cast<uint64_t>(seed)) {
  PM_CHECK(temperature > 0 && std::isfinite(temperature), kSampler,
           "temperature must be a finite number > 0, got ", temperature);
  PM_CHECK(top_k >= 0, kSampler, "top_k must be >= 0 (0: all tokens), got ", top_k);
  PM_CHECK(top_p > 0 && top_p <= 1, kSampler, "top_p must be in (0, 1], got ", top_p);
  params_.temperature = static_cast<float>(temperature);
  params_.top_k = top_k;
  params_.top_p = static_cast<float>(top_p);
}

void Sampler::row_probs(const char* op, const at::Tensor& rows, int64_t r, const int32_t* ids,
                        int64_t vocab, float* out) {
  const int64_t width = rows.size(1);
  if (ids != nullptr) std::fill_n(out, vocab, -std::numeric_limits<float>::infinity());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, rows.scalar_type(), "row_probs", [&] {
    const scalar_t* p = rows.const_data_ptr<scalar_t>() + r * width;
    for (int64_t i = 0; i < width; ++i) out[ids ? ids[i] : i] = static_cast<float>(p[i]);
  });
  PM_CHECK(sampling_cpu::probs_in_place(out, vocab, params_, scratch_, order_), op,
           "cannot sample: row ", r, " of the logits has no finite maximum (NaN or all -inf)");
}

at::Tensor Sampler::probs(const at::Tensor& logits) {
  PM_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.is_cpu(), kSampler,
           "probs: logits must be fp32 CPU [R, V], got ", logits.scalar_type(), " ",
           logits.sizes());
  const at::Tensor in = logits.contiguous();
  at::Tensor out = at::empty_like(in);
  for (int64_t r = 0; r < in.size(0); ++r) {
    row_probs(kSampler, in, r, nullptr, in.size(1), out.mutable_data_ptr<float>() + r * in.size(1));
  }
  return out;
}

at::Tensor Sampler::draw(const at::Tensor& probs) {
  PM_CHECK(
      probs.dim() == 2 && probs.scalar_type() == at::kFloat && probs.is_cpu() && probs.size(1) > 0,
      kSampler, "draw: probs must be fp32 CPU [R, V > 0], got ", probs.scalar_type(), " ",
      probs.sizes());
  const at::Tensor in = probs.contiguous();
  const int64_t rows = in.size(0), vocab = in.size(1);
  at::Tensor out = at::empty({rows}, in.options().dtype(at::kLong));
  for (int64_t r = 0; r < rows; ++r) {
    const float* p = in.const_data_ptr<float>() + r * vocab;
    double total = 0.0;
    for (int64_t v = 0; v < vocab; ++v) {
      PM_CHECK(p[v] >= 0 && std::isfinite(p[v]), kSampler, "draw: probs[", r, ", ", v, "] = ", p[v],
               " is not a probability");
      total += p[v];
    }
    PM_CHECK(total > 0, kSampler, "draw: probs row ", r, " has no mass");
    out.mutable_data_ptr<int64_t>()[r] = draw_row(p, vocab);
  }
  return out;
}

}  // namespace pearlmoe::cpu
