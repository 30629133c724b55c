// spec_verify: argument checks (shapes, and the values: every row a distribution, ids and
// uniforms in range) and the CPU / CUDA registrations.
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

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

// The data checks: every probability row a distribution (finite, >= 0, some mass), draft ids in
// [0, V), uniforms in [0, 1). Per-row statistics and flags are computed where the tensors live and
// read back in one copy (one device sync on CUDA). Layout of the read-back, all float:
// target [min, max, sum] x B(n+1) rows | draft [min, max, sum] x Bn rows | id flags Bn | u flags.
void check_values(const Checked& c) {
  const int64_t batch = c.target.size(0), n = c.drafts.size(1), vocab = c.target.size(2);
  auto row_stats = [](const Tensor& p) {  // [B, R, V] -> [3, B R]
    return at::stack({p.amin(-1), p.amax(-1), p.sum(-1)}).reshape({3, -1});
  };
  std::vector<Tensor> parts{row_stats(c.target).reshape(-1)};
  if (c.draft.has_value()) parts.push_back(row_stats(*c.draft).reshape(-1));
  parts.push_back((c.drafts < 0).logical_or_(c.drafts >= vocab).reshape(-1).to(at::kFloat));
  if (c.uniforms.has_value()) {
    const Tensor& u = *c.uniforms;
    parts.push_back((u >= 0).logical_and_(u < 1).logical_not_().reshape(-1).to(at::kFloat));
  }
  const Tensor host = host_values(at::cat(parts));
  const float* v = host.const_data_ptr<float>();

  auto check_rows = [&](const char* name, int64_t rows_per_seq) {
    const int64_t rows = batch * rows_per_seq;
    for (int64_t r = 0; r < rows; ++r) {
      const float lo = v[r], hi = v[rows + r], sum = v[2 * rows + r];
      const int64_t b = r / rows_per_seq, i = r % rows_per_seq;
      PM_CHECK(!std::isnan(hi), kVerify, name, " contains NaN (row [", b, ", ", i, "])");
      PM_CHECK(lo >= 0, kVerify, name, " contains negative probabilities (row [", b, ", ", i, "])");
      PM_CHECK(!std::isinf(hi), kVerify, name, " contains inf (row [", b, ", ", i, "])");
      PM_CHECK(sum > 0, kVerify, name, "[", b, ", ", i,
               "] has no probability mass (all zeros): nothing to sample or rank");
    }
    v += 3 * rows;
  };
  check_rows("target_probs", n + 1);
  if (c.draft.has_value()) check_rows("draft_probs", n);
  for (int64_t j = 0; j < batch * n; ++j) {
    PM_CHECK(v[j] == 0, kVerify, "draft_ids must be in [0, V=", vocab, "), got draft_ids[", j / n,
             ", ", j % n, "] = ", c.drafts.reshape(-1)[j].item<int64_t>());
  }
  v += batch * n;
  if (c.uniforms.has_value()) {
    for (int64_t j = 0; j < batch * (n + 1); ++j) {
      PM_CHECK(v[j] == 0, kVerify, "uniforms must be in [0, 1), got uniforms[", j / (n + 1), ", ",
               j % (n + 1), "] = ", c.uniforms->reshape(-1)[j].item<float>());
    }
  }
}

// Shapes, dtypes and devices; then the data (check_values), except while a CUDA graph is being
// captured, where the kernels are still memory-safe on bad values (spec_verify_cpu.h).
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
  PM_CHECK(!uniforms.has_value() || draft_probs.has_value(), kVerify,
           "uniforms given without draft_probs: greedy verification draws nothing");
  if (draft_probs.has_value()) {
    check_dim(*draft_probs, 3, kVerify, "draft_probs");
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
    for (auto [t, name] :
         {std::pair{&*draft_probs, "draft_probs"}, std::pair{&*uniforms, "uniforms"}}) {
      PM_CHECK(t->device() == target_probs.device(), kVerify, name,
               " must be on target_probs' device ", target_probs.device(), ", got ", t->device());
    }
  }
  Checked c{target_probs.contiguous(), draft_ids.to(at::kLong).contiguous(),
            draft_probs.has_value() ? OptTensor(draft_probs->contiguous()) : std::nullopt,
            uniforms.has_value() ? OptTensor(uniforms->contiguous()) : std::nullopt};
#ifdef PEARLMOE_WITH_CUDA
  if (target_probs.is_cuda() && stream_is_capturing()) return c;
#endif
  if (batch > 0) check_values(c);
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
      c.target.size(2),
      c.draft.has_value()};
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
