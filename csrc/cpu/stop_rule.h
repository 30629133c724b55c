// When a C++ call that runs several decode steps or rounds stops early: after the one in which a
// sequence keeps one of the EOS ids or the last token of its budget, so the caller finishes
// sequences between calls exactly where its per-step loop would (common.emit's rule).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../ops/checks.h"

namespace pearlmoe::cpu {

class StopRule {
 public:
  // eos: int64 [E] (E >= 0); budget: int64 [B], the tokens each sequence may still keep, or
  // undefined where the caller bounds the call itself. `op` names the caller in errors.
  StopRule(const char* op, const at::Tensor& eos, const at::Tensor& budget, int64_t batch) {
    check_dim(eos, 1, op, "eos");
    check_dtype(eos, at::kLong, op, "eos");
    PM_CHECK(eos.is_cpu(), op, "eos must be a CPU tensor");
    eos_ = eos.contiguous();
    if (!budget.defined()) return;
    check_dtype(budget, at::kLong, op, "budget");
    PM_CHECK(budget.is_cpu(), op, "budget must be a CPU tensor");
    PM_CHECK(budget.dim() == 1 && budget.size(0) == batch, op, "budget must be [B=", batch,
             "], got ", budget.sizes());
    const at::Tensor left = budget.contiguous();
    left_.assign(left.const_data_ptr<int64_t>(), left.const_data_ptr<int64_t>() + batch);
  }

  bool is_eos(int64_t token) const {
    const int64_t* ep = eos_.const_data_ptr<int64_t>();
    return std::find(ep, ep + eos_.numel(), token) != ep + eos_.numel();
  }

  // Sequence b kept tokens[0..n): whether that ends the call (an EOS among them, or its budget
  // spent; the budget counts down by n).
  bool kept(int64_t b, const int64_t* tokens, int64_t n) {
    const bool eos = std::any_of(tokens, tokens + n, [this](int64_t t) { return is_eos(t); });
    left_[b] -= n;
    return eos || left_[b] <= 0;
  }

 private:
  at::Tensor eos_;
  std::vector<int64_t> left_;
};

}  // namespace pearlmoe::cpu
