// Argument checks shared by the op launchers: every failure names the op and the argument.
#pragma once

#include <ATen/ATen.h>

#define PM_CHECK(cond, op, ...) TORCH_CHECK(cond, "pearlmoe.", op, ": ", __VA_ARGS__)

namespace pearlmoe {

inline void check_dim(const at::Tensor& t, int64_t dim, const char* op, const char* name) {
  PM_CHECK(t.dim() == dim, op, name, " must be ", dim, "-D, got shape ", t.sizes());
}

inline void check_dtype(const at::Tensor& t, at::ScalarType dtype, const char* op,
                        const char* name) {
  PM_CHECK(t.scalar_type() == dtype, op, name, " must be ", dtype, ", got ", t.scalar_type());
}

inline void check_int_dtype(const at::Tensor& t, const char* op, const char* name) {
  PM_CHECK(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, op, name,
           " must be int32 or int64, got ", t.scalar_type());
}

// The values of t for a check that reads them: a contiguous CPU tensor, made with one copy (one
// device sync for a CUDA tensor) and none for a contiguous CPU tensor. Every value check goes
// through this, so a strided, expanded or offset view is checked element for element as the
// kernels, which take t.contiguous(), will read it.
inline at::Tensor host_values(const at::Tensor& t) {
  return t.is_cpu() ? t.contiguous() : t.contiguous().cpu();
}

// Kernels run on the device the inputs live on; a CUDA launcher given a CPU tensor (or the
// reverse) would read garbage, so each launcher states which device type it serves.
inline void check_device(const at::Tensor& t, c10::DeviceType type, const char* op,
                         const char* name) {
  PM_CHECK(t.device().type() == type, op, name, " must be a ", c10::DeviceTypeName(type),
           " tensor, got one on ", t.device());
}

// Rows of x [..., K], the product of its leading dims (reshape(-1, K) cannot tell them when K = 0).
inline int64_t leading_rows(const at::Tensor& x) {
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) rows *= x.size(d);
  return rows;
}

}  // namespace pearlmoe
