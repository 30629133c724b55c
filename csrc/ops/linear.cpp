// linear: a dense projection y = x · w^T, the model's attention and dense-MLP projections and its
// output head. It is an op of its own for the CPU, where decode and verification multiply a few
// rows by each weight and BLAS's fixed cost per call and its packing of w dominate: up to
// kSkinnyMaxRows rows go through the skinny AVX-512 kernel (bf16 weights via AVX512-BF16 dot
// products), which streams w once. On CUDA it is cuBLAS (at::linear), the right kernel there.
#include <torch/library.h>

#include "../cpu/cpu_kernels.h"
#include "checks.h"
#include "ops.h"

namespace pearlmoe {
namespace {

using at::Tensor;

constexpr const char* kLinear = "linear";

void check_linear(const Tensor& x, const Tensor& w) {
  PM_CHECK(x.dim() >= 1, kLinear, "x must be [..., K], got a 0-D tensor");
  check_dim(w, 2, kLinear, "weight");
  PM_CHECK(at::isFloatingType(x.scalar_type()), kLinear, "x must be floating point, got ",
           x.scalar_type());
  PM_CHECK(w.scalar_type() == x.scalar_type(), kLinear, "weight must have x's dtype ",
           x.scalar_type(), ", got ", w.scalar_type());
  PM_CHECK(w.device() == x.device(), kLinear, "weight is on ", w.device(), " but x is on ",
           x.device());
  PM_CHECK(w.size(1) == x.size(-1), kLinear,
           "weight must be [N, K] with K = x.size(-1) = ", x.size(-1), ", got shape ", w.sizes());
}

std::vector<int64_t> out_shape(const Tensor& x, const Tensor& w) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = w.size(0);
  return shape;
}

Tensor linear_cpu(const Tensor& x, const Tensor& w) {
  check_device(x, c10::kCPU, kLinear, "x");
  check_linear(x, w);
  const Tensor a = x.reshape({leading_rows(x), x.size(-1)});  // [M, K]
  Tensor out = at::empty({a.size(0), w.size(0)}, x.options());
  if (a.size(0) > 0) cpu::gemm_nt_out(a.stride(-1) == 1 ? a : a.contiguous(), w.contiguous(), out);
  return out.view(out_shape(x, w));
}

Tensor linear_cuda(const Tensor& x, const Tensor& w) {
  check_device(x, c10::kCUDA, kLinear, "x");
  check_linear(x, w);
  return at::linear(x, w);
}

// Without gradients straight to the kernel; with them, at::linear (same math, differentiable).
Tensor linear_autograd(const Tensor& x, const Tensor& w) {
  if (at::GradMode::is_enabled() && (x.requires_grad() || w.requires_grad())) {
    check_linear(x, w);
    return at::linear(x, w);
  }
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("pearlmoe::linear", "")
                       .typed<Tensor(const Tensor&, const Tensor&)>();
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(x, w);
}

}  // namespace

TORCH_LIBRARY_IMPL(pearlmoe, CPU, m) { m.impl("linear", &linear_cpu); }
TORCH_LIBRARY_IMPL(pearlmoe, CUDA, m) { m.impl("linear", &linear_cuda); }
TORCH_LIBRARY_IMPL(pearlmoe, Autograd, m) { m.impl("linear", &linear_autograd); }

}  // namespace pearlmoe
