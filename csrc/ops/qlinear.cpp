// qlinear and dequantize: projections whose weight stays in a GGUF block format (Q4_0, Q4_1,
// Q8_0; kernels/quant/gguf_blocks.h) instead of being expanded to bf16 at load. At decode sizes
// the CPU streams the weight once through quant::qlinear_rows (3.2x fewer bytes than bf16 for
// the 4-bit formats); more rows than the skinny kernel takes expand it to fp32 and use BLAS. On
// CUDA a few rows go to the warp-per-column kernel, more to dequantize + cuBLAS.
#include <torch/library.h>

#include <string_view>

#include "../cpu/parallel.h"
#include "../kernels/quant/qlinear_cpu.h"
#include "checks.h"
#include "ops.h"

#ifdef PEARLMOE_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../kernels/quant/qlinear.h"
#endif

namespace pearlmoe {
namespace {

using at::Tensor;
using quant::Format;

constexpr const char* kQLinear = "qlinear";
constexpr const char* kDequantize = "dequantize";

Format parse_format(std::string_view name, const char* op) {
  if (name == "q4_0") return Format::kQ4_0;
  if (name == "q4_1") return Format::kQ4_1;
  if (name == "q8_0") return Format::kQ8_0;
  PM_CHECK(false, op, "format must be 'q4_0', 'q4_1' or 'q8_0', got '", name, "'");
  return Format::kQ4_0;
}

void check_qweight(const Tensor& qweight, const char* op) {
  check_dim(qweight, 2, op, "qweight");
  check_dtype(qweight, at::kByte, op, "qweight");
}

// The format, after checking x [..., K] against qweight [N, K / 32 blocks].
Format check_qlinear(const Tensor& x, const Tensor& qweight, std::string_view format) {
  const Format f = parse_format(format, kQLinear);
  PM_CHECK(x.dim() >= 1, kQLinear, "x must be [..., K], got a 0-D tensor");
  check_qweight(qweight, kQLinear);
  const auto dtype = x.scalar_type();
  PM_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, kQLinear,
           "x must be float32, bfloat16 or float16, got ", dtype);
  PM_CHECK(qweight.device() == x.device(), kQLinear, "qweight is on ", qweight.device(),
           " but x is on ", x.device());
  const int64_t k = x.size(-1);
  PM_CHECK(k % quant::kBlockValues == 0, kQLinear, "x.size(-1) = K must be a multiple of 32 (",
           format, " blocks), got ", k);
  const int64_t row_bytes = k / quant::kBlockValues * quant::block_bytes(f);
  PM_CHECK(qweight.size(1) == row_bytes, kQLinear, "qweight must be [N, ", row_bytes,
           "] for K = ", k, " in ", format, " (", quant::block_bytes(f),
           " bytes per 32 values), got shape ", qweight.sizes());
  return f;
}

Format check_dequantize(const Tensor& qweight, std::string_view format, at::ScalarType dtype) {
  const Format f = parse_format(format, kDequantize);
  check_qweight(qweight, kDequantize);
  PM_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, kDequantize,
           "dtype must be float32, bfloat16 or float16, got ", dtype);
  PM_CHECK(qweight.size(1) % quant::block_bytes(f) == 0, kDequantize, "qweight rows must be whole ",
           format, " blocks of ", quant::block_bytes(f), " bytes, got shape ", qweight.sizes());
  return f;
}

std::vector<int64_t> out_shape(const Tensor& x, int64_t n) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  return shape;
}

// qweight [N, bytes] -> fp32 [N, K], rows split over threads.
Tensor dequantize_fp32_cpu(const Tensor& qweight, Format f) {
  const Tensor w = qweight.contiguous();
  const int64_t n = w.size(0), k = w.size(1) / quant::block_bytes(f) * quant::kBlockValues;
  Tensor out = at::empty({n, k}, w.options().dtype(at::kFloat));
  const uint8_t* src = w.const_data_ptr<uint8_t>();
  float* dst = out.mutable_data_ptr<float>();
  cpu::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    quant::dequantize_rows(f, src, w.size(1), k, begin, end, dst);
  });
  return out;
}

// out [rows, N] (contiguous, a's dtype: fp32 or bf16) = a [rows, K] (contiguous) times the
// expanded blocks, the skinny kernel writing each output once.
void qlinear_rows_out(const Tensor& a, const Tensor& qweight, Format f, Tensor& out) {
  const int64_t rows = a.size(0), k = a.size(1), n = qweight.size(0);
  if (rows == 0 || n == 0) return;
  const Tensor w = qweight.contiguous();
  const uint8_t* wp = w.const_data_ptr<uint8_t>();
  const bool bf16 = a.scalar_type() == at::kBFloat16;
  cpu::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    if (bf16) {
      quant::qlinear_rows(f, static_cast<const moe_gemm::BF16*>(a.const_data_ptr()), k, rows, k, wp,
                          w.size(1), begin, end,
                          static_cast<moe_gemm::BF16*>(out.mutable_data_ptr()), n);
    } else {
      quant::qlinear_rows(f, a.const_data_ptr<float>(), k, rows, k, wp, w.size(1), begin, end,
                          out.mutable_data_ptr<float>(), n);
    }
  });
}

}  // namespace

Tensor qlinear_cpu(const Tensor& x, const Tensor& qweight, c10::string_view format) {
  check_device(x, c10::kCPU, kQLinear, "x");
  const Format f = check_qlinear(x, qweight, format);
  const int64_t rows = leading_rows(x), k = x.size(-1), n = qweight.size(0);
  if (rows > moe_gemm::kSkinnyMaxRows) {  // a prefill: expand once, multiply on BLAS
    const Tensor a = x.reshape({rows, k}).to(at::kFloat);
    return at::mm(a, dequantize_fp32_cpu(qweight, f).t()).to(x.scalar_type()).view(out_shape(x, n));
  }
  // bf16 x is read as it is (the bf16 dot-product path); fp16 is widened to fp32 first.
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  const Tensor a = x.reshape({rows, k}).to(bf16 ? at::kBFloat16 : at::kFloat).contiguous();
  const bool direct = x.scalar_type() != at::kHalf;  // fp32 and bf16 outputs stored by the kernel
  Tensor out = at::empty({rows, n}, x.options().dtype(direct ? x.scalar_type() : at::kFloat));
  qlinear_rows_out(a, qweight, f, out);
  return (direct ? out : out.to(x.scalar_type())).view(out_shape(x, n));
}

void qlinear_out_cpu(const Tensor& x, const Tensor& qweight, c10::string_view format, Tensor& out) {
  check_device(x, c10::kCPU, kQLinear, "x");
  const Format f = check_qlinear(x, qweight, format);
  const int64_t rows = leading_rows(x);
  const bool direct = rows <= moe_gemm::kSkinnyMaxRows && x.dim() == 2 && x.is_contiguous() &&
                      (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat) &&
                      out.scalar_type() == x.scalar_type() && out.is_contiguous() &&
                      out.dim() == 2 && out.size(0) == rows && out.size(1) == qweight.size(0);
  if (direct) {
    qlinear_rows_out(x, qweight, f, out);
  } else {
    out.copy_(qlinear_cpu(x, qweight, format));
  }
}

namespace {

Tensor dequantize_cpu(const Tensor& qweight, c10::string_view format, at::ScalarType dtype) {
  check_device(qweight, c10::kCPU, kDequantize, "qweight");
  const Format f = check_dequantize(qweight, format, dtype);
  return dequantize_fp32_cpu(qweight, f).to(dtype);
}

#ifdef PEARLMOE_WITH_CUDA
quant::DType cuda_dtype(at::ScalarType t) {
  return t == at::kFloat      ? quant::DType::kF32
         : t == at::kBFloat16 ? quant::DType::kBF16
                              : quant::DType::kF16;
}

Tensor dequantize_cuda_impl(const Tensor& qweight, Format f, at::ScalarType dtype) {
  const Tensor w = qweight.contiguous();
  const int64_t n = w.size(0), k = w.size(1) / quant::block_bytes(f) * quant::kBlockValues;
  Tensor out = at::empty({n, k}, w.options().dtype(dtype));
  quant::DequantizeParams p{};
  p.w = w.const_data_ptr<uint8_t>();
  p.out = out.data_ptr();
  p.n = n;
  p.k = k;
  p.w_row_bytes = w.size(1);
  p.format = f;
  p.dtype = cuda_dtype(dtype);
  check_launch(quant::dequantize_cuda(p, c10::cuda::getCurrentCUDAStream().stream()), kDequantize);
  return out;
}

constexpr int64_t kCudaGemvMaxRows = 16;  // more rows: dequantize + cuBLAS

Tensor qlinear_cuda(const Tensor& x, const Tensor& qweight, c10::string_view format) {
  check_device(x, c10::kCUDA, kQLinear, "x");
  const Format f = check_qlinear(x, qweight, format);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = leading_rows(x), k = x.size(-1), n = qweight.size(0);
  const Tensor a = x.reshape({rows, k});
  if (rows > kCudaGemvMaxRows) {
    return at::mm(a, dequantize_cuda_impl(qweight, f, x.scalar_type()).t()).view(out_shape(x, n));
  }
  const Tensor src = a.stride(-1) == 1 ? a : a.contiguous();
  const Tensor w = qweight.contiguous();
  Tensor out = at::empty({rows, n}, x.options());
  quant::QLinearParams p{};
  p.x = src.const_data_ptr();
  p.w = w.const_data_ptr<uint8_t>();
  p.out = out.data_ptr();
  p.rows = rows;
  p.n = n;
  p.k = k;
  p.x_row_stride = src.stride(0);
  p.w_row_bytes = w.size(1);
  p.format = f;
  p.dtype = cuda_dtype(x.scalar_type());
  check_launch(quant::qlinear_cuda(p, c10::cuda::getCurrentCUDAStream().stream()), kQLinear);
  return out.view(out_shape(x, n));
}

Tensor dequantize_cuda(const Tensor& qweight, c10::string_view format, at::ScalarType dtype) {
  check_device(qweight, c10::kCUDA, kDequantize, "qweight");
  const Format f = check_dequantize(qweight, format, dtype);
  const c10::cuda::CUDAGuard guard(qweight.device());
  return dequantize_cuda_impl(qweight, f, dtype);
}
#else
Tensor qlinear_cuda(const Tensor&, const Tensor&, c10::string_view) { fail_no_cuda(kQLinear); }
Tensor dequantize_cuda(const Tensor&, c10::string_view, at::ScalarType) {
  fail_no_cuda(kDequantize);
}
#endif

}  // namespace

TORCH_LIBRARY_IMPL(pearlmoe, CPU, m) {
  m.impl("qlinear", &qlinear_cpu);
  m.impl("dequantize", &dequantize_cpu);
}
TORCH_LIBRARY_IMPL(pearlmoe, CUDA, m) {
  m.impl("qlinear", &qlinear_cuda);
  m.impl("dequantize", &dequantize_cuda);
}

}  // namespace pearlmoe
