// CPU RMSNorm: each row reduced on its own with 16 partial sums in a fixed order (the compiler
// vectorises them), so a row's result does not depend on the other rows of the call.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <type_traits>

#include "cpu_kernels.h"
#include "parallel.h"

namespace pearlmoe::cpu {
namespace {

template <typename scalar_t>
void rms_norm_rows(const at::Tensor& x, const at::Tensor& weight, double eps, at::Tensor& out) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t rows = x.size(0), hidden = x.size(1), stride = x.stride(0);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* wp = weight.const_data_ptr<scalar_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(hidden, 1));
  cpu::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* xr = xp + r * stride;
      acc_t lanes[16] = {};
      int64_t i = 0;
      for (; i + 16 <= hidden; i += 16) {
        for (int j = 0; j < 16; ++j) {
          const acc_t v = static_cast<acc_t>(xr[i + j]);
          lanes[j] += v * v;
        }
      }
      for (int j = 0; i < hidden; ++i, ++j) {
        const acc_t v = static_cast<acc_t>(xr[i]);
        lanes[j] += v * v;
      }
      for (int width = 8; width > 0; width /= 2) {
        for (int j = 0; j < width; ++j) lanes[j] += lanes[j + width];
      }
      const acc_t inv_rms = acc_t(1) / std::sqrt(lanes[0] / static_cast<acc_t>(hidden) + eps);
      scalar_t* dst = op + r * hidden;
      for (i = 0; i < hidden; ++i) {
        const scalar_t normed = static_cast<scalar_t>(static_cast<acc_t>(xr[i]) * inv_rms);
        dst[i] = static_cast<scalar_t>(static_cast<acc_t>(wp[i]) * static_cast<acc_t>(normed));
      }
    }
  });
}

}  // namespace

void rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm",
                                  [&] { rms_norm_rows<scalar_t>(x, weight, eps, out); });
}

}  // namespace pearlmoe::cpu
