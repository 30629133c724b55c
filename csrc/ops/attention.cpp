// Attention ops: attention (prefill / decode / verification over a compressed KV cache) and
// rope_qk_norm (NeoX RoPE, QK RMSNorm with the key-norm weight folded into the query).
#include <torch/library.h>

#include <array>
#include <cmath>
#include <cstring>
#include <map>
#include <mutex>
#include <optional>

#include "../cpu/cpu_kernels.h"
#include "checks.h"
#include "ops.h"

#ifdef PEARLMOE_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../kernels/attention/attention.h"
#include "../kernels/attention/rope_norm.h"
#endif

namespace pearlmoe {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
constexpr const char* kAttn = "attention";
constexpr const char* kRope = "rope_qk_norm";

// ---- attention ---------------------------------------------------------------------------------

void check_attention(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& kv_lens) {
  check_dim(q, 4, kAttn, "q");
  check_dim(k, 4, kAttn, "k");
  check_dim(v, 4, kAttn, "v");
  check_dim(kv_lens, 1, kAttn, "kv_lens");
  check_dtype(kv_lens, at::kInt, kAttn, "kv_lens");
  PM_CHECK(at::isFloatingType(q.scalar_type()), kAttn, "q must be floating point, got ",
           q.scalar_type());
  if (q.is_cuda()) {
    PM_CHECK(q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf, kAttn,
             "q must be BFloat16 or Half on CUDA, got ", q.scalar_type(),
             " (float32 runs on the CPU)");
  }
  for (auto [t, name] : {std::pair{&k, "k"}, std::pair{&v, "v"}}) {
    PM_CHECK(t->device() == q.device(), kAttn, name, " is on ", t->device(), " but q is on ",
             q.device());
  }
  PM_CHECK(kv_lens.device() == q.device() || kv_lens.is_cpu(), kAttn,
           "kv_lens must be on q's device or on the CPU, got ", kv_lens.device());
  PM_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), kAttn,
           "q, k and v must share a dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
           v.scalar_type());
  PM_CHECK(k.sizes() == v.sizes(), kAttn, "k and v must have the same shape, got ", k.sizes(),
           " and ", v.sizes());
  const int64_t batch = q.size(0), q_heads = q.size(2), dim = q.size(3), kv_heads = k.size(2);
  PM_CHECK(k.size(0) == batch && k.size(3) == dim, kAttn,
           "k must be [B, Skv, Hkv, D] with B = ", batch, " and D = ", dim, " to match q ",
           q.sizes(), ", got ", k.sizes());
  PM_CHECK(kv_heads >= 1 && q_heads % kv_heads == 0, kAttn, "the ", q_heads,
           " query heads must be a multiple of the ", kv_heads, " KV heads");
  PM_CHECK(kv_lens.size(0) == batch, kAttn, "kv_lens must have B = ", batch, " entries, got ",
           kv_lens.size(0));
  PM_CHECK(dim >= 1, kAttn, "head_dim must be positive");
}

// kv_lens on the CPU: every sequence's queries must each see a key, q_len <= kv_lens[b] <= Skv.
// Returns the checked values (contiguous, on the CPU), which the caller then uses.
Tensor check_kv_lens(const Tensor& kv_lens, int64_t q_len, int64_t capacity) {
  const Tensor host = host_values(kv_lens);
  const int32_t* lens = host.const_data_ptr<int32_t>();
  for (int64_t b = 0; b < host.size(0); ++b) {
    PM_CHECK(lens[b] <= capacity, kAttn, "kv_lens[", b, "] = ", lens[b],
             " exceeds the K/V buffer length ", capacity);
    PM_CHECK(lens[b] >= q_len, kAttn, "kv_lens[", b, "] = ", lens[b],
             " is smaller than Sq = ", q_len,
             ": the first query would see no key (kv_lens counts the queries' own keys)");
  }
  return host;
}

Tensor unit_last_stride(const Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

double default_scale(const Tensor& q, std::optional<double> scale) {
  return scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(q.size(3)));
}

Tensor attention_cpu(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& kv_lens,
                     std::optional<double> scale) {
  check_device(q, c10::kCPU, kAttn, "q");
  check_attention(q, k, v, kv_lens);
  const Tensor lens = check_kv_lens(kv_lens, q.size(1), k.size(1));
  Tensor o = at::empty(q.sizes(), q.options());
  if (o.numel() == 0) return o;
  cpu::attention(q, unit_last_stride(k), unit_last_stride(v), lens.const_data_ptr<int32_t>(),
                 default_scale(q, scale), o);
  return o;
}

// ---- rope_qk_norm ------------------------------------------------------------------------------

void check_rope(const Tensor& q, const Tensor& k, const Tensor& positions, const OptTensor& q_w,
                const OptTensor& k_w, bool normalize) {
  check_dim(q, 3, kRope, "q");
  check_dim(k, 3, kRope, "k");
  check_dim(positions, 1, kRope, "positions");
  check_int_dtype(positions, kRope, "positions");
  PM_CHECK(at::isFloatingType(q.scalar_type()) && k.scalar_type() == q.scalar_type(), kRope,
           "q and k must share a floating dtype, got ", q.scalar_type(), " and ", k.scalar_type());
  const int64_t tokens = q.size(0), dim = q.size(2);
  PM_CHECK(k.size(0) == tokens && k.size(2) == dim, kRope, "k must be [T, Hkv, D] = [", tokens,
           ", *, ", dim, "] to match q, got ", k.sizes());
  PM_CHECK(positions.size(0) == tokens, kRope, "positions must have T = ", tokens, " entries, got ",
           positions.size(0));
  PM_CHECK(dim % 2 == 0 && dim >= 2 && dim <= 128, kRope,
           "head_dim must be even and at most 128, got ", dim);
  for (auto [w, name] : {std::pair{&q_w, "q_weight"}, std::pair{&k_w, "k_weight"}}) {
    if (!w->has_value()) continue;
    PM_CHECK(normalize, kRope, name, " given, but normalize=False applies no norm");
    check_dim(**w, 1, kRope, name);
    PM_CHECK((*w)->size(0) == dim, kRope, name, " must have head_dim = ", dim, " entries, got ",
             (*w)->size(0));
    PM_CHECK((*w)->device() == q.device(), kRope, name, " is on ", (*w)->device(), " but q is on ",
             q.device());
  }
  for (const Tensor* t : {&k, &positions}) {
    PM_CHECK(t->device() == q.device(), kRope, "all inputs must be on q's device ", q.device());
  }
}

void check_rope_base(double base) {
  PM_CHECK(std::isfinite(base) && base > 0, kRope,
           "rope_base must be a positive finite number, got ", base);
}

}  // namespace

// inv_freq[i] = 1 / base^(2i/D) in fp32, computed exactly as HF (and reference.rope) do, on the
// CPU, once per (base, D) for the process: every device rotates by bit-identical angles, and a
// call neither builds nor copies a table (CUDA takes it by value in the kernel's parameters).
const InvFreq& inv_freq_table(double base, int64_t dim) {
  static std::mutex mutex;
  static std::map<std::pair<uint64_t, int64_t>, InvFreq> tables;  // stable references
  uint64_t bits;
  std::memcpy(&bits, &base, sizeof bits);
  const std::lock_guard<std::mutex> lock(mutex);
  auto [it, inserted] = tables.try_emplace({bits, dim});
  if (inserted) {
    const Tensor exponent = at::arange(0, dim, 2, at::kFloat) / static_cast<double>(dim);
    const Tensor table = at::pow(base, exponent).reciprocal().contiguous();
    it->second.fill(0.f);
    std::memcpy(it->second.data(), table.const_data_ptr<float>(), table.numel() * sizeof(float));
  }
  return it->second;
}

namespace {

std::tuple<Tensor, Tensor> rope_qk_norm_cpu(const Tensor& q, const Tensor& k,
                                            const Tensor& positions, double rope_base,
                                            const OptTensor& q_weight, const OptTensor& k_weight,
                                            double eps, bool normalize) {
  check_device(q, c10::kCPU, kRope, "q");
  check_rope(q, k, positions, q_weight, k_weight, normalize);
  check_rope_base(rope_base);
  const Tensor pos = positions.scalar_type() == at::kLong ? positions.contiguous()
                                                          : positions.to(at::kLong).contiguous();
  const Tensor q_w = q_weight.has_value() ? q_weight->contiguous() : Tensor();
  const Tensor k_w = k_weight.has_value() ? k_weight->contiguous() : Tensor();
  const InvFreq& inv_freq = inv_freq_table(rope_base, q.size(2));
  Tensor q_out = at::empty(q.sizes(), q.options()), k_hat = at::empty(k.sizes(), k.options());
  cpu::rope_norm(unit_last_stride(q), pos.const_data_ptr<int64_t>(), q_w, k_w, inv_freq.data(), eps,
                 normalize, q_out);
  if (k.numel() > 0) {
    cpu::rope_norm(unit_last_stride(k), pos.const_data_ptr<int64_t>(), Tensor(), Tensor(),
                   inv_freq.data(), eps, normalize, k_hat);
  }
  return {q_out, k_hat};
}

// ---- CUDA --------------------------------------------------------------------------------------

#ifdef PEARLMOE_WITH_CUDA

// The query's weight times the key's (folded: q·(w⊙k̂) = (q⊙w)·k̂) in `acc` (fp32, or fp64 for
// fp64 inputs, which the reference computes in fp64), or undefined.
Tensor folded_weight(const OptTensor& q_w, const OptTensor& k_w, at::ScalarType acc) {
  Tensor w;
  if (q_w.has_value()) w = q_w->to(acc);
  if (k_w.has_value()) w = w.defined() ? w * k_w->to(acc) : k_w->to(acc);
  return w.defined() ? w.contiguous() : w;
}

int sm_count(const Tensor& t) {
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, t.get_device());
  return sms;
}

Tensor attention_cuda(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
                      const Tensor& kv_lens, std::optional<double> scale) {
  check_device(q_in, c10::kCUDA, kAttn, "q");
  check_attention(q_in, k_in, v_in, kv_lens);
  const int64_t dim = q_in.size(3);
  PM_CHECK(dim == 64 || dim == 80 || dim == 128, kAttn,
           "head_dim must be 64, 80 or 128 on CUDA, got ", dim);
  const c10::cuda::CUDAGuard guard(q_in.device());
  // kv_lens on q's device are read only by the kernels, which clamp them into [0, Skv]: no host
  // sync, no copy, capturable. On the CPU they are checked here (free) and copied to the device
  // from pinned memory without a sync, which a CUDA graph would replay with stale lengths.
  Tensor lens;
  if (kv_lens.is_cuda()) {
    lens = kv_lens.contiguous();
  } else {
    PM_CHECK(!stream_is_capturing(), kAttn,
             "kv_lens on the CPU cannot be used under CUDA-graph capture (the graph would replay "
             "the lengths of the capture); pass kv_lens on q's device");
    lens = check_kv_lens(kv_lens, q_in.size(1), k_in.size(1))
               .pin_memory()
               .to(q_in.device(), /*non_blocking=*/true);
  }
  // The kernels load 16-byte chunks: unit last stride, other strides (of dimensions longer than
  // 1) multiples of 8 elements, 16-byte aligned data; anything else is copied once.
  auto ready = [](const Tensor& t) {
    bool ok = t.stride(3) == 1 && reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0;
    for (int d = 0; d < 3; ++d) ok = ok && (t.size(d) == 1 || t.stride(d) % 8 == 0);
    return ok;
  };
  auto fix = [](const Tensor& t) { return t.clone(at::MemoryFormat::Contiguous); };
  const Tensor q = ready(q_in) ? q_in : fix(q_in);
  const bool kv_ready = ready(k_in) && ready(v_in) && k_in.strides() == v_in.strides();
  const Tensor k = kv_ready ? k_in : fix(k_in), v = kv_ready ? v_in : fix(v_in);
  Tensor o = at::empty(q.sizes(), q.options());
  if (o.numel() == 0) return o;
  attention::AttentionParams p{
      q.const_data_ptr(),
      k.const_data_ptr(),
      v.const_data_ptr(),
      o.mutable_data_ptr(),
      lens.const_data_ptr<int32_t>(),
      q.stride(0),
      q.stride(1),
      q.stride(2),
      k.stride(0),
      k.stride(1),
      k.stride(2),
      static_cast<int>(q.size(0)),
      static_cast<int>(q.size(1)),
      static_cast<int>(q.size(2)),
      static_cast<int>(k.size(2)),
      static_cast<int>(dim),
      k.size(1),
      static_cast<float>(default_scale(q, scale)),
      q.scalar_type() == at::kBFloat16 ? attention::DType::kBF16 : attention::DType::kFP16};
  const int sms = sm_count(q);
  const size_t bytes = attention::attention_workspace_bytes(p, sms);
  const Tensor workspace = at::empty({static_cast<int64_t>(bytes)}, q.options().dtype(at::kByte));
  check_launch(attention::attention_cuda(p, workspace.data_ptr(), bytes, sms,
                                         c10::cuda::getCurrentCUDAStream().stream()),
               kAttn);
  return o;
}

attention::RopeDType rope_dtype(const Tensor& t) {
  if (t.scalar_type() == at::kBFloat16) return attention::RopeDType::kBF16;
  if (t.scalar_type() == at::kHalf) return attention::RopeDType::kF16;
  return attention::RopeDType::kF32;
}

std::tuple<Tensor, Tensor> rope_qk_norm_cuda(const Tensor& q_in, const Tensor& k_in,
                                             const Tensor& positions, double rope_base,
                                             const OptTensor& q_weight, const OptTensor& k_weight,
                                             double eps, bool normalize) {
  check_device(q_in, c10::kCUDA, kRope, "q");
  check_rope(q_in, k_in, positions, q_weight, k_weight, normalize);
  check_rope_base(rope_base);
  PM_CHECK(q_in.scalar_type() != at::kDouble, kRope, "float64 runs on the CPU only");
  const c10::cuda::CUDAGuard guard(q_in.device());
  const Tensor q = unit_last_stride(q_in), k = unit_last_stride(k_in);
  const Tensor pos = positions.to(at::kLong).contiguous();
  const Tensor w = folded_weight(q_weight, k_weight, at::kFloat);
  Tensor q_out = at::empty(q.sizes(), q.options()), k_hat = at::empty(k.sizes(), k.options());
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  attention::RopeInvFreq inv_freq{};
  const InvFreq& table = inv_freq_table(rope_base, q.size(2));
  std::copy(table.begin(), table.end(), inv_freq.v);
  for (auto [x, out, weight] :
       {std::tuple{&q, &q_out, w.defined() ? w.const_data_ptr<float>() : nullptr},
        std::tuple{&k, &k_hat, static_cast<const float*>(nullptr)}}) {
    attention::RopeNormParams p{x->const_data_ptr(),
                                out->mutable_data_ptr(),
                                pos.const_data_ptr<int64_t>(),
                                weight,
                                inv_freq,
                                x->size(0),
                                x->size(1),
                                x->size(2),
                                x->stride(0),
                                x->stride(1),
                                static_cast<float>(eps),
                                normalize,
                                rope_dtype(*x)};
    check_launch(attention::rope_norm_cuda(p, stream), kRope);
  }
  return {q_out, k_hat};
}

#else  // !PEARLMOE_WITH_CUDA

Tensor attention_cuda(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                      std::optional<double>) {
  fail_no_cuda(kAttn);
}
std::tuple<Tensor, Tensor> rope_qk_norm_cuda(const Tensor&, const Tensor&, const Tensor&, double,
                                             const OptTensor&, const OptTensor&, double, bool) {
  fail_no_cuda(kRope);
}

#endif

}  // namespace

TORCH_LIBRARY_IMPL(pearlmoe, CPU, m) {
  m.impl("attention", &attention_cpu);
  m.impl("rope_qk_norm", &rope_qk_norm_cpu);
}

TORCH_LIBRARY_IMPL(pearlmoe, CUDA, m) {
  m.impl("attention", &attention_cuda);
  m.impl("rope_qk_norm", &rope_qk_norm_cuda);
}

}  // namespace pearlmoe
