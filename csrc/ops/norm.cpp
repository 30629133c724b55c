// rms_norm: the model's RMSNorm as one op, with Hugging Face's rounding points. One call instead
// of seven ATen ops per norm in a decode step, and each row reduced in a fixed order, so a token's
// output does not depend on how many tokens share the call (decode step vs verification window):
// what keeps compiled speculative decoding token-for-token equal to autoregressive decoding.
#include <torch/library.h>

#include "../cpu/cpu_kernels.h"
#include "checks.h"
#include "ops.h"

#ifdef PEARLMOE_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../kernels/norm/rms_norm.h"
#endif

namespace pearlmoe {
namespace {

using at::Tensor;

constexpr const char* kNorm = "rms_norm";

void check_rms_norm(const Tensor& x, const Tensor& weight, double eps) {
  PM_CHECK(x.dim() >= 1, kNorm, "x must be [..., H], got a 0-D tensor");
  check_dim(weight, 1, kNorm, "weight");
  PM_CHECK(at::isFloatingType(x.scalar_type()), kNorm, "x must be floating point, got ",
           x.scalar_type());
  PM_CHECK(weight.scalar_type() == x.scalar_type(), kNorm, "weight must have x's dtype ",
           x.scalar_type(), ", got ", weight.scalar_type());
  PM_CHECK(weight.device() == x.device(), kNorm, "weight is on ", weight.device(), " but x is on ",
           x.device());
  PM_CHECK(weight.size(0) == x.size(-1), kNorm,
           "weight must be [H] with H = x.size(-1) = ", x.size(-1), ", got shape ", weight.sizes());
  PM_CHECK(std::isfinite(eps) && eps >= 0, kNorm, "eps must be finite and >= 0, got ", eps);
}

Tensor rms_norm_cpu(const Tensor& x, const Tensor& weight, double eps) {
  check_device(x, c10::kCPU, kNorm, "x");
  check_rms_norm(x, weight, eps);
  const Tensor rows = x.reshape({leading_rows(x), x.size(-1)});
  const Tensor src = rows.stride(-1) == 1 ? rows : rows.contiguous();
  Tensor out = at::empty(src.sizes(), x.options());
  if (src.numel() > 0) cpu::rms_norm(src, weight.contiguous(), eps, out);
  return out.view(x.sizes());
}

#ifdef PEARLMOE_WITH_CUDA
Tensor rms_norm_cuda(const Tensor& x, const Tensor& weight, double eps) {
  check_device(x, c10::kCUDA, kNorm, "x");
  check_rms_norm(x, weight, eps);
  PM_CHECK(x.scalar_type() != at::kDouble, kNorm,
           "x must be float32, bfloat16 or float16 on "
           "CUDA, got Double");
  const c10::cuda::CUDAGuard guard(x.device());
  const Tensor rows = x.reshape({leading_rows(x), x.size(-1)});
  const Tensor src = rows.stride(-1) == 1 ? rows : rows.contiguous();
  const Tensor w = weight.contiguous();
  Tensor out = at::empty(src.sizes(), x.options());
  norm::RmsNormParams p{};
  p.x = src.const_data_ptr();
  p.weight = w.const_data_ptr();
  p.out = out.data_ptr();
  p.rows = src.size(0);
  p.hidden = src.size(1);
  p.x_row_stride = src.stride(0);
  p.eps = static_cast<float>(eps);
  p.dtype = x.scalar_type() == at::kFloat      ? norm::DType::kF32
            : x.scalar_type() == at::kBFloat16 ? norm::DType::kBF16
                                               : norm::DType::kF16;
  check_launch(norm::rms_norm_cuda(p, c10::cuda::getCurrentCUDAStream().stream()), kNorm);
  return out.view(x.sizes());
}
#else
Tensor rms_norm_cuda(const Tensor&, const Tensor&, double) { fail_no_cuda(kNorm); }
#endif

// Without gradients straight to the kernel; with them, the same math in differentiable ATen ops.
Tensor rms_norm_autograd(const Tensor& x, const Tensor& weight, double eps) {
  if (at::GradMode::is_enabled() && (x.requires_grad() || weight.requires_grad())) {
    check_rms_norm(x, weight, eps);
    const Tensor x32 = x.to(x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
    const Tensor normed = x32 * at::rsqrt(x32.pow(2).mean(-1, /*keepdim=*/true) + eps);
    return weight * normed.to(x.scalar_type());
  }
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("pearlmoe::rms_norm", "")
                       .typed<Tensor(const Tensor&, const Tensor&, double)>();
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(x, weight, eps);
}

}  // namespace

TORCH_LIBRARY_IMPL(pearlmoe, CPU, m) { m.impl("rms_norm", &rms_norm_cpu); }
TORCH_LIBRARY_IMPL(pearlmoe, CUDA, m) { m.impl("rms_norm", &rms_norm_cuda); }
TORCH_LIBRARY_IMPL(pearlmoe, Autograd, m) { m.impl("rms_norm", &rms_norm_autograd); }

}  // namespace pearlmoe
