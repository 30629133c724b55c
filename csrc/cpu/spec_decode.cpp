#include <ATen/Parallel.h>

#include "../kernels/spec_decode/spec_verify_cpu.h"
#include "cpu_kernels.h"
#include "parallel.h"

namespace pearlmoe::cpu {

void spec_verify(const at::Tensor& target_probs, const at::Tensor& draft_ids,
                 const std::optional<at::Tensor>& draft_probs,
                 const std::optional<at::Tensor>& uniforms, at::Tensor& tokens,
                 at::Tensor& num_accepted) {
  const bool sampling = draft_probs.has_value();
  const int64_t batch = target_probs.size(0), n = draft_ids.size(1), vocab = target_probs.size(2);
  const float* target = target_probs.const_data_ptr<float>();
  const int64_t* drafts = draft_ids.const_data_ptr<int64_t>();
  const float* draft = draft_probs.has_value() ? draft_probs->const_data_ptr<float>() : nullptr;
  const float* u = uniforms.has_value() ? uniforms->const_data_ptr<float>() : nullptr;
  int64_t* out = tokens.mutable_data_ptr<int64_t>();
  int32_t* accepted = num_accepted.mutable_data_ptr<int32_t>();
  cpu::parallel_for(0, batch, 16, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      accepted[b] = spec_decode::spec_verify_sequence(
          target + b * (n + 1) * vocab, drafts + b * n,
          draft == nullptr ? nullptr : draft + b * n * vocab,
          u == nullptr ? nullptr : u + b * (n + 1), n, vocab, sampling, out + b * (n + 1));
    }
  });
}

}  // namespace pearlmoe::cpu
