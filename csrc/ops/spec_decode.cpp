// spec_verify: argument checks (including NaN / negative probabilities) and the CPU / CUDA
// registrations.
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../cpu/cpu_kernels.h"
#include "checks.h"
#include "ops.h"

#ifdef PEARLMOE_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../kernels/spec_decode/spec_verify.h"
#endif

namespace pearlmoe {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
constexpr const char* kVerify = "spec_verify";

struct Checked {
  Tensor target, drafts;
  OptTensor draft, uniforms;
};

// Shapes, dtypes and devices; then the data: probabilities finite and >= 0, draft ids in range
// (one host sync on CUDA, skipped while a CUDA graph is being captured).
Checked check_spec_verify(const Tensor& target_probs, const Tensor& draft_ids,
                          const OptTensor& draft_probs, const OptTensor& uniforms) {
  check_dim(target_probs, 3, kVerify, "target_probs");
  check_dtype(target_probs, at::kFloat, kVerify, "target_probs");
  check_dim(draft_ids, 2, kVerify, "draft_ids");
  check_int_dtype(draft_ids, kVerify, "draft_ids");
  const int64_t batch = target_probs.size(0), vocab = target_probs.size(2);
  const int64_t n = draft_ids.size(1);
  PM_CHECK(vocab >= 1, kVerify, "target_probs needs a vocabulary, got shape ",
           target_probs.sizes());
  PM_CHECK(draft_ids.size(0) == batch && target_probs.size(1) == n + 1, kVerify,
           "target_probs must be [B, n+1, V] for draft_ids [B, n] = ", draft_ids.sizes(), ", got ",
           target_probs.sizes());
  PM_CHECK(draft_ids.device() == target_probs.device(), kVerify,
           "draft_ids must be on target_probs' device ", target_probs.device());
  if (draft_probs.has_value()) {
    check_dtype(*draft_probs, at::kFloat, kVerify, "draft_probs");
    PM_CHECK(draft_probs->sizes() == at::IntArrayRef({batch, n, vocab}), kVerify,
             "draft_probs must be [B, n, V] = [", batch, ", ", n, ", ", vocab, "], got ",
             draft_probs->sizes());
    PM_CHECK(uniforms.has_value(), kVerify,
             "sampling (draft_probs given) needs uniforms [B, n+1] (pearlmoe.ops.spec_verify "
             "draws them from its generator)");
    check_dtype(*uniforms, at::kFloat, kVerify, "uniforms");
    PM_CHECK(uniforms->sizes() == at::IntArrayRef({batch, n + 1}), kVerify,
             "uniforms must be [B, n+1] = [", batch, ", ", n + 1, "], got ", uniforms->sizes());
    for (const Tensor* t : {&*draft_probs, &*uniforms}) {
      PM_CHECK(t->device() == target_probs.device(), kVerify,
               "all inputs must be on target_probs' device ", target_probs.device());
    }
  }
  Checked c{target_probs.contiguous(), draft_ids.to(at::kLong).contiguous(),
            draft_probs.has_value() ? OptTensor(draft_probs->contiguous()) : std::nullopt,
            uniforms.has_value() ? OptTensor(uniforms->contiguous()) : std::nullopt};
#ifdef PEARLMOE_WITH_CUDA
  if (target_probs.is_cuda() && stream_is_capturing()) return c;
#endif
  auto check_probs = [](const Tensor& p, const char* name) {
    PM_CHECK(!(p.isnan().any().item<bool>()), kVerify, name, " contains NaN");
    PM_CHECK(!((p < 0).any().item<bool>()), kVerify, name, " contains negative probabilities");
  };
  check_probs(c.target, "target_probs");
  if (c.draft.has_value()) check_probs(*c.draft, "draft_probs");
  if (n > 0) {
    PM_CHECK(!((c.drafts < 0).logical_or_(c.drafts >= vocab).any().item<bool>()), kVerify,
             "draft_ids must be in [0, V=", vocab, ")");
  }
  return c;
}

std::tuple<Tensor, Tensor> alloc_outputs(const Tensor& target, int64_t n) {
  const int64_t batch = target.size(0);
  return {at::empty({batch, n + 1}, target.options().dtype(at::kLong)),
          at::empty({batch}, target.options().dtype(at::kInt))};
}

std::tuple<Tensor, Tensor> spec_verify_cpu(const Tensor& target_probs, const Tensor& draft_ids,
                                           const OptTensor& draft_probs,
                                           const OptTensor& uniforms) {
  check_device(target_probs, c10::kCPU, kVerify, "target_probs");
  const Checked c = check_spec_verify(target_probs, draft_ids, draft_probs, uniforms);
  auto [tokens, accepted] = alloc_outputs(c.target, draft_ids.size(1));
  cpu::spec_verify(c.target, c.drafts, c.draft, c.uniforms, tokens, accepted);
  return {tokens, accepted};
}

#ifdef PEARLMOE_WITH_CUDA

std::tuple<Tensor, Tensor> spec_verify_cuda(const Tensor& target_probs, const Tensor& draft_ids,
                                            const OptTensor& draft_probs,
                                            const OptTensor& uniforms) {
  check_device(target_probs, c10::kCUDA, kVerify, "target_probs");
  const c10::cuda::CUDAGuard guard(target_probs.device());
  const Checked c = check_spec_verify(target_probs, draft_ids, draft_probs, uniforms);
  auto [tokens, accepted] = alloc_outputs(c.target, draft_ids.size(1));
  spec_decode::SpecVerifyParams p{
      c.target.const_data_ptr<float>(),
      c.drafts.const_data_ptr<int64_t>(),
      c.draft.has_value() ? c.draft->const_data_ptr<float>() : nullptr,
      c.uniforms.has_value() ? c.uniforms->const_data_ptr<float>() : nullptr,
      tokens.mutable_data_ptr<int64_t>(),
      accepted.mutable_data_ptr<int32_t>(),
      c.target.size(0),
      draft_ids.size(1),
      c.target.size(2)};
  check_launch(spec_decode::spec_verify_cuda(p, c10::cuda::getCurrentCUDAStream().stream()),
               kVerify);
  return {tokens, accepted};
}

#else

std::tuple<Tensor, Tensor> spec_verify_cuda(const Tensor&, const Tensor&, const OptTensor&,
                                            const OptTensor&) {
  fail_no_cuda(kVerify);
}

#endif

}  // namespace

TORCH_LIBRARY_IMPL(pearlmoe, CPU, m) { m.impl("spec_verify", &spec_verify_cpu); }
TORCH_LIBRARY_IMPL(pearlmoe, CUDA, m) { m.impl("spec_verify", &spec_verify_cuda); }

}  // namespace pearlmoe
