// Expert-FFN ops: grouped_gemm, grouped_gemm_wgrad, moe_ffn_routed, moe_ffn. Argument checks,
// output allocation, the CPU / CUDA registrations, and the CUDA orchestration of the kernels.
#include <torch/library.h>

#include <climits>
#include <optional>
#include <vector>

#include "../cpu/cpu_kernels.h"
#include "../kernels/routing/routing_common.h"
#include "checks.h"
#include "ops.h"

#ifdef PEARLMOE_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../kernels/moe_gemm/grouped_gemm.h"
#include "../kernels/moe_gemm/moe_elementwise.h"
#include "../kernels/routing/routing.h"
#endif

namespace pearlmoe {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
constexpr const char* kGemm = "grouped_gemm";
constexpr const char* kWgrad = "grouped_gemm_wgrad";
constexpr const char* kRouted = "moe_ffn_routed";
constexpr const char* kMoe = "moe_ffn";

bool is_float(const Tensor& t) { return at::isFloatingType(t.scalar_type()); }

void check_same_device(const Tensor& t, const Tensor& ref, const char* op, const char* name,
                       const char* ref_name) {
  PM_CHECK(t.device() == ref.device(), op, name, " is on ", t.device(), " but ", ref_name,
           " is on ", ref.device());
}

// CUDA kernels take bf16 and fp16; the CPU kernels any floating dtype.
void check_compute_dtype(const Tensor& t, const char* op, const char* name) {
  PM_CHECK(is_float(t), op, name, " must be a floating-point tensor, got ", t.scalar_type());
  if (t.is_cuda()) {
    PM_CHECK(t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf, op, name,
             " must be BFloat16 or Half on CUDA, got ", t.scalar_type(),
             " (float32/float64 run on the CPU)");
  }
}

// ---- grouped_gemm ------------------------------------------------------------------------------

void check_grouped_gemm(const Tensor& a, const Tensor& b, const Tensor& offs, const char* op) {
  check_dim(a, 2, op, "a");
  check_dim(b, 3, op, "b");
  check_dim(offs, 1, op, "group_offsets");
  check_compute_dtype(a, op, "a");
  PM_CHECK(b.scalar_type() == a.scalar_type(), op, "b must have a's dtype ", a.scalar_type(),
           ", got ", b.scalar_type());
  check_dtype(offs, at::kInt, op, "group_offsets");
  check_same_device(b, a, op, "b", "a");
  check_same_device(offs, a, op, "group_offsets", "a");
  PM_CHECK(b.size(0) >= 1, op, "b must hold at least one group, got shape ", b.sizes());
  PM_CHECK(b.size(2) == a.size(1), op, "b must be [G, N, K] with K = a.size(1) = ", a.size(1),
           ", got shape ", b.sizes());
  PM_CHECK(offs.size(0) == b.size(0) + 1, op, "group_offsets must have G + 1 = ", b.size(0) + 1,
           " entries for b of shape ", b.sizes(), ", got ", offs.size(0));
  PM_CHECK(a.size(0) < INT_MAX, op, "a has ", a.size(0), " rows; at most INT_MAX - 1 supported");
}

// offs[0] == 0, nondecreasing, offs[G] <= rows, on the offsets' host_values (which the CPU
// kernels then read: one read of the values).
void check_offset_values(const Tensor& host, int64_t rows, const char* op) {
  const int32_t* o = host.const_data_ptr<int32_t>();
  const int64_t groups = host.size(0) - 1;
  PM_CHECK(o[0] == 0, op, "group_offsets[0] must be 0, got ", o[0]);
  for (int64_t g = 0; g < groups; ++g) {
    PM_CHECK(o[g + 1] >= o[g], op, "group_offsets must be nondecreasing, but group_offsets[", g + 1,
             "] = ", o[g + 1], " < group_offsets[", g, "] = ", o[g]);
  }
  PM_CHECK(o[groups] <= rows, op, "group_offsets[G] = ", o[groups], " exceeds the ", rows,
           " rows of a");
}

// check_offset_values for offsets a CUDA kernel reads on the device: one host sync, skipped while
// a CUDA graph is being captured (the kernels clamp the offsets then).
void check_offsets(const Tensor& offs, int64_t rows, const char* op) {
#ifdef PEARLMOE_WITH_CUDA
  if (offs.is_cuda() && stream_is_capturing()) return;
#endif
  check_offset_values(host_values(offs), rows, op);
}

Tensor grouped_gemm_cpu(const Tensor& a_in, const Tensor& b_in, const Tensor& offs_in) {
  check_device(a_in, c10::kCPU, kGemm, "a");
  check_grouped_gemm(a_in, b_in, offs_in, kGemm);
  const Tensor offs = host_values(offs_in);
  check_offset_values(offs, a_in.size(0), kGemm);
  const Tensor a = a_in.contiguous(), b = b_in.contiguous();
  Tensor c = at::empty({a.size(0), b.size(1)}, a.options());  // [M, N]
  cpu::grouped_gemm(a, b, offs.const_data_ptr<int32_t>(), c);
  return c;
}

void check_wgrad(const Tensor& grad_c, const Tensor& a, const Tensor& offs) {
  check_dim(grad_c, 2, kWgrad, "grad_c");
  check_dim(a, 2, kWgrad, "a");
  check_dim(offs, 1, kWgrad, "group_offsets");
  check_dtype(offs, at::kInt, kWgrad, "group_offsets");
  check_compute_dtype(a, kWgrad, "a");
  PM_CHECK(grad_c.scalar_type() == a.scalar_type(), kWgrad, "grad_c must have a's dtype ",
           a.scalar_type(), ", got ", grad_c.scalar_type());
  check_same_device(grad_c, a, kWgrad, "grad_c", "a");
  check_same_device(offs, a, kWgrad, "group_offsets", "a");
  PM_CHECK(grad_c.size(0) == a.size(0), kWgrad, "grad_c and a must have the same rows, got ",
           grad_c.sizes(), " and ", a.sizes());
  PM_CHECK(offs.size(0) >= 2, kWgrad, "group_offsets needs at least 2 entries, got ", offs.size(0));
}

Tensor grouped_gemm_wgrad_cpu(const Tensor& grad_c_in, const Tensor& a_in, const Tensor& offs_in) {
  check_device(a_in, c10::kCPU, kWgrad, "a");
  check_wgrad(grad_c_in, a_in, offs_in);
  const Tensor offs = host_values(offs_in);
  check_offset_values(offs, a_in.size(0), kWgrad);
  const Tensor grad_c = grad_c_in.contiguous(), a = a_in.contiguous();
  Tensor grad_b = at::empty({offs.size(0) - 1, grad_c.size(1), a.size(1)}, a.options());
  cpu::grouped_gemm_wgrad(grad_c, a, offs.const_data_ptr<int32_t>(), grad_b);
  return grad_b;
}

// ---- moe_ffn_routed / moe_ffn ------------------------------------------------------------------

void check_experts(const Tensor& x, const Tensor& w13, const Tensor& w2, const OptTensor& sw13,
                   const OptTensor& sw2, const char* op) {
  check_dim(x, 2, op, "x");
  check_compute_dtype(x, op, "x");
  const int64_t hidden = x.size(1);
  check_dim(w13, 3, op, "w13");
  check_dim(w2, 3, op, "w2");
  for (auto [t, name] : {std::pair{&w13, "w13"}, std::pair{&w2, "w2"}}) {
    PM_CHECK(t->scalar_type() == x.scalar_type(), op, name, " must have x's dtype ",
             x.scalar_type(), ", got ", t->scalar_type());
    check_same_device(*t, x, op, name, "x");
  }
  const int64_t experts = w13.size(0), inter = w13.size(1) / 2;
  PM_CHECK(experts >= 1 && experts <= routing::kMoeAlignMaxExperts, op,
           "w13 must hold between 1 and ", routing::kMoeAlignMaxExperts, " experts, got shape ",
           w13.sizes());
  PM_CHECK(w13.size(1) % 2 == 0 && w13.size(1) > 0 && w13.size(2) == hidden, op,
           "w13 must be [E, 2*I, H] with H = x.size(1) = ", hidden, ", got shape ", w13.sizes());
  PM_CHECK(w2.size(0) == experts && w2.size(1) == hidden && w2.size(2) == inter, op,
           "w2 must be [E, H, I] = [", experts, ", ", hidden, ", ", inter, "] to match w13 ",
           w13.sizes(), " and x ", x.sizes(), ", got ", w2.sizes());
  PM_CHECK(sw13.has_value() == sw2.has_value(), op,
           "shared_w13 and shared_w2 must be given together");
  if (sw13.has_value()) {
    check_dim(*sw13, 2, op, "shared_w13");
    check_dim(*sw2, 2, op, "shared_w2");
    for (auto [t, name] : {std::pair{&*sw13, "shared_w13"}, std::pair{&*sw2, "shared_w2"}}) {
      PM_CHECK(t->scalar_type() == x.scalar_type(), op, name, " must have x's dtype ",
               x.scalar_type(), ", got ", t->scalar_type());
      check_same_device(*t, x, op, name, "x");
    }
    const int64_t shared_inter = sw13->size(0) / 2;
    PM_CHECK(sw13->size(0) % 2 == 0 && sw13->size(0) > 0 && sw13->size(1) == hidden, op,
             "shared_w13 must be [2*Is, H] with H = ", hidden, ", got shape ", sw13->sizes());
    PM_CHECK(sw2->size(0) == hidden && sw2->size(1) == shared_inter, op,
             "shared_w2 must be [H, Is] = [", hidden, ", ", shared_inter, "], got shape ",
             sw2->sizes());
  }
}

void check_routing(const Tensor& x, const Tensor& weights, const Tensor& ids, const char* op) {
  check_dim(weights, 2, op, "topk_weights");
  check_dim(ids, 2, op, "topk_ids");
  check_int_dtype(ids, op, "topk_ids");
  PM_CHECK(is_float(weights), op, "topk_weights must be floating point, got ",
           weights.scalar_type());
  PM_CHECK(weights.sizes() == ids.sizes() && ids.size(0) == x.size(0), op,
           "topk_weights and topk_ids must both be [T, k] with T = x.size(0) = ", x.size(0),
           ", got ", weights.sizes(), " and ", ids.sizes());
  PM_CHECK(ids.size(1) >= 1, op, "top_k must be >= 1, got topk_ids of shape ", ids.sizes());
  PM_CHECK(ids.numel() < INT_MAX, op, "T * k must be below INT_MAX");
  check_same_device(weights, x, op, "topk_weights", "x");
  check_same_device(ids, x, op, "topk_ids", "x");
}

OptTensor contiguous(const OptTensor& t) {
  return t.has_value() ? OptTensor(t->contiguous()) : std::nullopt;
}

Tensor router_logits(const Tensor& x, const Tensor& router_w) {
  return at::mm(x.to(at::kFloat), router_w.to(at::kFloat).t());  // [T, E] in fp32
}

void check_router(const Tensor& x, const Tensor& router_w, const Tensor& w13, int64_t top_k) {
  check_dim(router_w, 2, kMoe, "router_w");
  PM_CHECK(is_float(router_w), kMoe, "router_w must be floating point, got ",
           router_w.scalar_type());
  check_same_device(router_w, x, kMoe, "router_w", "x");
  PM_CHECK(router_w.size(0) == w13.size(0) && router_w.size(1) == x.size(1), kMoe,
           "router_w must be [E, H] = [", w13.size(0), ", ", x.size(1), "], got ",
           router_w.sizes());
  PM_CHECK(top_k >= 1 && top_k <= w13.size(0), kMoe, "top_k must be in [1, E=", w13.size(0),
           "], got ", top_k);
}

}  // namespace

void check_moe_ffn_routed_args(const Tensor& x, const Tensor& topk_weights, const Tensor& topk_ids,
                               const Tensor& w13, const Tensor& w2, const OptTensor& shared_w13,
                               const OptTensor& shared_w2) {
  check_experts(x, w13, w2, shared_w13, shared_w2, kRouted);
  check_routing(x, topk_weights, topk_ids, kRouted);
}

void check_moe_ffn_args(const Tensor& x, const Tensor& router_w, const Tensor& w13,
                        const Tensor& w2, int64_t top_k, const OptTensor& shared_w13,
                        const OptTensor& shared_w2) {
  check_experts(x, w13, w2, shared_w13, shared_w2, kMoe);
  check_router(x, router_w, w13, top_k);
}

namespace {

Tensor moe_ffn_routed_cpu(const Tensor& x, const Tensor& topk_weights, const Tensor& topk_ids,
                          const Tensor& w13, const Tensor& w2, const OptTensor& shared_w13,
                          const OptTensor& shared_w2) {
  check_device(x, c10::kCPU, kRouted, "x");
  check_experts(x, w13, w2, shared_w13, shared_w2, kRouted);
  check_routing(x, topk_weights, topk_ids, kRouted);
  check_expert_ids(topk_ids, w13.size(0), kRouted);
  return cpu::moe_ffn_routed(x.contiguous(), topk_weights.contiguous(), topk_ids.contiguous(),
                             w13.contiguous(), w2.contiguous(), contiguous(shared_w13),
                             contiguous(shared_w2));
}

}  // namespace

Tensor moe_ffn_cpu(const Tensor& x, const Tensor& router_w, const Tensor& w13, const Tensor& w2,
                   int64_t top_k, const OptTensor& shared_w13, const OptTensor& shared_w2,
                   bool renormalize) {
  check_device(x, c10::kCPU, kMoe, "x");
  check_experts(x, w13, w2, shared_w13, shared_w2, kMoe);
  check_router(x, router_w, w13, top_k);
  Tensor y;
  if (cpu::moe_ffn_small_call(x, router_w, w13, w2, top_k, shared_w13, shared_w2, renormalize, y)) {
    return y;
  }
  auto [weights, ids] = topk_softmax_cpu(router_logits(x, router_w), top_k, renormalize);
  return cpu::moe_ffn_routed(x.contiguous(), weights, ids, w13.contiguous(), w2.contiguous(),
                             contiguous(shared_w13), contiguous(shared_w2));
}

namespace {

// ---- CUDA --------------------------------------------------------------------------------------

#ifdef PEARLMOE_WITH_CUDA

moe_gemm::DType gemm_dtype(const Tensor& t) {
  return t.scalar_type() == at::kBFloat16 ? moe_gemm::DType::kBF16 : moe_gemm::DType::kFP16;
}

int device_major(const Tensor& t) {
  int major = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, t.get_device());
  return major;
}

// Hopper runs prefill-sized problems on the CUTLASS kernel; decode-sized ones (few rows per
// group, where a 128-row tile would be mostly padding) and other GPUs on the mma.sync kernel.
void run_grouped_gemm(const moe_gemm::GroupedGemmParams& p, const Tensor& like, const char* op) {
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  if (device_major(like) == 9 && p.m > moe_gemm::kDecodeMaxRowsPerGroup * p.num_groups &&
      moe_gemm::grouped_gemm_sm90_supported(p)) {
    const size_t bytes = moe_gemm::grouped_gemm_sm90_workspace_bytes(p);
    const Tensor workspace =
        at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
    const cudaError_t err = moe_gemm::grouped_gemm_sm90(p, workspace.data_ptr(), bytes, stream);
    if (err != cudaErrorNotSupported && err != cudaErrorInvalidValue) {
      check_launch(err, op);
      return;
    }
    (void)cudaGetLastError();  // CUTLASS declined this problem: the mma.sync kernel takes it
  }
  check_launch(moe_gemm::grouped_gemm_sm80(p, stream), op);
}

// The GEMM kernels load 16-byte chunks: a view starting mid-allocation is copied once.
Tensor aligned16(const Tensor& t) {
  const Tensor c = t.contiguous();
  return reinterpret_cast<uintptr_t>(c.const_data_ptr()) % 16 == 0 ? c : c.clone();
}

void check_cuda_gemm_shape(int64_t n, int64_t k, const char* op) {
  PM_CHECK(n % 8 == 0 && k % 8 == 0, op,
           "on CUDA the GEMM sizes N and K must be multiples of 8 (16-byte rows), got N = ", n,
           ", K = ", k);
}

Tensor grouped_gemm_cuda(const Tensor& a_in, const Tensor& b_in, const Tensor& offs_in) {
  check_device(a_in, c10::kCUDA, kGemm, "a");
  check_grouped_gemm(a_in, b_in, offs_in, kGemm);
  check_cuda_gemm_shape(b_in.size(1), b_in.size(2), kGemm);
  const c10::cuda::CUDAGuard guard(a_in.device());
  check_offsets(offs_in, a_in.size(0), kGemm);
  const Tensor a = aligned16(a_in), b = aligned16(b_in), offs = offs_in.contiguous();
  Tensor c = at::empty({a.size(0), b.size(1)}, a.options());  // [M, N]
  if (a.size(0) == 0) return c;
  moe_gemm::GroupedGemmParams p{a.const_data_ptr(),
                                a.size(1),
                                nullptr,
                                b.const_data_ptr(),
                                offs.const_data_ptr<int32_t>(),
                                c.mutable_data_ptr(),
                                a.size(0),
                                b.size(1),
                                b.size(2),
                                static_cast<int>(b.size(0)),
                                gemm_dtype(a),
                                moe_gemm::Epilogue::kNone};
  run_grouped_gemm(p, a, kGemm);
  check_launch(
      moe_gemm::zero_tail_rows(c.mutable_data_ptr(), c.size(0), c.size(1), p.group_offsets,
                               p.num_groups, p.dtype, c10::cuda::getCurrentCUDAStream().stream()),
      kGemm);
  return c;
}

// Training only (the backward of grouped_gemm): one cuBLAS GEMM per group, after one host sync
// to read the offsets, so it cannot be captured in a CUDA graph.
Tensor grouped_gemm_wgrad_cuda(const Tensor& grad_c, const Tensor& a, const Tensor& offs) {
  check_device(a, c10::kCUDA, kWgrad, "a");
  check_wgrad(grad_c, a, offs);
  const c10::cuda::CUDAGuard guard(a.device());
  PM_CHECK(!stream_is_capturing(), kWgrad,
           "cannot run under CUDA-graph capture (it reads the group offsets on the host)");
  const Tensor host_offs = host_values(offs);
  check_offset_values(host_offs, a.size(0), kWgrad);
  const int32_t* o = host_offs.const_data_ptr<int32_t>();
  Tensor grad_b = at::empty({offs.size(0) - 1, grad_c.size(1), a.size(1)}, a.options());
  for (int64_t g = 0; g + 1 < offs.size(0); ++g) {
    Tensor out = grad_b[g];
    if (o[g + 1] == o[g]) {
      out.zero_();
    } else {
      at::mm_out(out, grad_c.narrow(0, o[g], o[g + 1] - o[g]).t(),
                 a.narrow(0, o[g], o[g + 1] - o[g]));
    }
  }
  return grad_b;
}

// The fused routed-expert path: align, gate/up GEMM with SwiGLU (row gather fused on sm80),
// down GEMM, weighted combine with the shared expert.
Tensor moe_ffn_routed_cuda_impl(const Tensor& x, const Tensor& topk_weights, const Tensor& topk_ids,
                                const Tensor& w13, const Tensor& w2, const OptTensor& shared_w13,
                                const OptTensor& shared_w2) {
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  const int64_t tokens = x.size(0), hidden = x.size(1), top_k = topk_ids.size(1);
  const int64_t experts = w13.size(0), inter = w2.size(2), slots = tokens * top_k;
  const auto dtype = gemm_dtype(x);
  const auto int_opts = x.options().dtype(at::kInt);
  check_cuda_gemm_shape(2 * inter, hidden, kRouted);
  check_cuda_gemm_shape(hidden, inter, kRouted);
  Tensor y = at::empty({tokens, hidden}, x.options());  // [T, H]
  if (tokens == 0) return y;

  Tensor sorted = at::empty({slots}, int_opts), slot_to_row = at::empty({slots}, int_opts);
  Tensor offs = at::empty({experts + 1}, int_opts);
  const Tensor align_ws = at::empty(
      {static_cast<int64_t>(routing::moe_align_workspace_bytes(slots, static_cast<int>(experts)))},
      x.options().dtype(at::kByte));
  check_launch(
      AT_DISPATCH_INDEX_TYPES(topk_ids.scalar_type(), "moe_ffn_align",
                              [&] {
                                return routing::moe_align_cuda<index_t>(
                                    topk_ids.const_data_ptr<index_t>(), slots,
                                    static_cast<int>(experts), sorted.mutable_data_ptr<int32_t>(),
                                    slot_to_row.mutable_data_ptr<int32_t>(),
                                    offs.mutable_data_ptr<int32_t>(), align_ws.data_ptr(), stream);
                              }),
      kRouted);
  const Tensor token_of_row = sorted.div(top_k, "floor");  // [N] int32

  // Gate/up GEMM + SwiGLU -> act [N, I].
  Tensor act = at::empty({slots, inter}, x.options());
  moe_gemm::GroupedGemmParams up{x.const_data_ptr(),
                                 hidden,
                                 token_of_row.const_data_ptr<int32_t>(),
                                 w13.const_data_ptr(),
                                 offs.const_data_ptr<int32_t>(),
                                 act.mutable_data_ptr(),
                                 slots,
                                 2 * inter,
                                 hidden,
                                 static_cast<int>(experts),
                                 dtype,
                                 moe_gemm::Epilogue::kSwiGLU};
  bool done = false;
  if (device_major(x) == 9 && slots > moe_gemm::kDecodeMaxRowsPerGroup * experts) {
    // CUTLASS takes contiguous rows per group: gather first, SwiGLU as a separate pass.
    const Tensor x_rows = x.index_select(0, token_of_row);  // [N, H]
    Tensor h = at::empty({slots, 2 * inter}, x.options());  // [N, 2I]
    moe_gemm::GroupedGemmParams plain = up;
    plain.a = x_rows.const_data_ptr();
    plain.a_rows = nullptr;
    plain.c = h.mutable_data_ptr();
    plain.epilogue = moe_gemm::Epilogue::kNone;
    if (moe_gemm::grouped_gemm_sm90_supported(plain)) {
      run_grouped_gemm(plain, x, kRouted);
      // Rows past offs[E] (dropped slots) were not written by the GEMM: leave them alone.
      check_launch(moe_gemm::silu_and_mul(h.const_data_ptr(), act.mutable_data_ptr(), slots, inter,
                                          offs.const_data_ptr<int32_t>() + experts, dtype, stream),
                   kRouted);
      done = true;
    }
  }
  if (!done) check_launch(moe_gemm::grouped_gemm_sm80(up, stream), kRouted);

  // Down GEMM -> expert_out [N, H].
  Tensor expert_out = at::empty({slots, hidden}, x.options());
  moe_gemm::GroupedGemmParams down{act.const_data_ptr(),
                                   inter,
                                   nullptr,
                                   w2.const_data_ptr(),
                                   offs.const_data_ptr<int32_t>(),
                                   expert_out.mutable_data_ptr(),
                                   slots,
                                   hidden,
                                   inter,
                                   static_cast<int>(experts),
                                   dtype,
                                   moe_gemm::Epilogue::kNone};
  run_grouped_gemm(down, x, kRouted);

  // Shared expert on cuBLAS, then the weighted combine.
  Tensor shared;
  if (shared_w13.has_value()) {
    const Tensor hs = at::mm(x, shared_w13->t());  // [T, 2Is]
    Tensor act_s = at::empty({tokens, hs.size(1) / 2}, x.options());
    check_launch(moe_gemm::silu_and_mul(hs.const_data_ptr(), act_s.mutable_data_ptr(), tokens,
                                        hs.size(1) / 2, nullptr, dtype, stream),
                 kRouted);
    shared = at::mm(act_s, shared_w2->t());  // [T, H]
  }
  const Tensor weights = topk_weights.to(at::kFloat).contiguous();
  check_launch(moe_gemm::moe_combine(
                   expert_out.const_data_ptr(), weights.const_data_ptr<float>(),
                   slot_to_row.const_data_ptr<int32_t>(), offs.const_data_ptr<int32_t>(),
                   static_cast<int>(experts), shared.defined() ? shared.const_data_ptr() : nullptr,
                   y.mutable_data_ptr(), tokens, static_cast<int>(top_k), hidden, dtype, stream),
               kRouted);
  return y;
}

Tensor moe_ffn_routed_cuda(const Tensor& x, const Tensor& topk_weights, const Tensor& topk_ids,
                           const Tensor& w13, const Tensor& w2, const OptTensor& shared_w13,
                           const OptTensor& shared_w2) {
  check_device(x, c10::kCUDA, kRouted, "x");
  check_experts(x, w13, w2, shared_w13, shared_w2, kRouted);
  check_routing(x, topk_weights, topk_ids, kRouted);
  const c10::cuda::CUDAGuard guard(x.device());
  check_expert_ids(topk_ids, w13.size(0), kRouted);
  return moe_ffn_routed_cuda_impl(aligned16(x), topk_weights, topk_ids.contiguous(), aligned16(w13),
                                  aligned16(w2), contiguous(shared_w13), contiguous(shared_w2));
}

Tensor moe_ffn_cuda(const Tensor& x, const Tensor& router_w, const Tensor& w13, const Tensor& w2,
                    int64_t top_k, const OptTensor& shared_w13, const OptTensor& shared_w2,
                    bool renormalize) {
  check_device(x, c10::kCUDA, kMoe, "x");
  check_experts(x, w13, w2, shared_w13, shared_w2, kMoe);
  check_router(x, router_w, w13, top_k);
  const c10::cuda::CUDAGuard guard(x.device());
  auto [weights, ids] = topk_softmax_cuda(router_logits(x, router_w), top_k, renormalize);
  return moe_ffn_routed_cuda_impl(aligned16(x), weights, ids, aligned16(w13), aligned16(w2),
                                  contiguous(shared_w13), contiguous(shared_w2));
}

#else  // !PEARLMOE_WITH_CUDA

Tensor grouped_gemm_cuda(const Tensor&, const Tensor&, const Tensor&) { fail_no_cuda(kGemm); }
Tensor grouped_gemm_wgrad_cuda(const Tensor&, const Tensor&, const Tensor&) {
  fail_no_cuda(kWgrad);
}
Tensor moe_ffn_routed_cuda(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                           const Tensor&, const OptTensor&, const OptTensor&) {
  fail_no_cuda(kRouted);
}
Tensor moe_ffn_cuda(const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t,
                    const OptTensor&, const OptTensor&, bool) {
  fail_no_cuda(kMoe);
}

#endif

}  // namespace

TORCH_LIBRARY_IMPL(pearlmoe, CPU, m) {
  m.impl("grouped_gemm", &grouped_gemm_cpu);
  m.impl("grouped_gemm_wgrad", &grouped_gemm_wgrad_cpu);
  m.impl("moe_ffn_routed", &moe_ffn_routed_cpu);
  m.impl("moe_ffn", &moe_ffn_cpu);
}

TORCH_LIBRARY_IMPL(pearlmoe, CUDA, m) {
  m.impl("grouped_gemm", &grouped_gemm_cuda);
  m.impl("grouped_gemm_wgrad", &grouped_gemm_wgrad_cuda);
  m.impl("moe_ffn_routed", &moe_ffn_routed_cuda);
  m.impl("moe_ffn", &moe_ffn_cuda);
}

}  // namespace pearlmoe
