// The fused CPU step (model_step.h): Transformer.step's layer loop in C++ over the CPU kernels.
#include "model_step.h"

#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>

#include "../ops/checks.h"
#include "gil.h"
#include "stop_rule.h"
#include "thread_pool.h"
#include "../ops/ops.h"
#include "cpu_kernels.h"
#include "../kernels/spec_decode/spec_verify_cpu.h"

namespace pearlmoe::cpu {
namespace {

using at::Tensor;
constexpr const char* kStep = "ModelStep";

// x += y elementwise in x's dtype (both contiguous, same shape): the residual adds, rounded as
// torch's `x + y` rounds (the sum in fp32, then to x's dtype; fp64 stays fp64).
void add_into(Tensor& x, const Tensor& y) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "residual", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    scalar_t* xp = x.mutable_data_ptr<scalar_t>();
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    const int64_t n = x.numel();
    for (int64_t i = 0; i < n; ++i) {
      xp[i] = static_cast<scalar_t>(static_cast<acc_t>(xp[i]) + static_cast<acc_t>(yp[i]));
    }
  });
}

std::optional<Tensor> maybe(const Tensor& t) {
  return t.numel() > 0 ? std::optional<Tensor>(t) : std::nullopt;
}

}  // namespace

void ModelStep::project(const Tensor& x, const Tensor& w, const std::string& format, Tensor& out) {
  if (format.empty()) {
    gemm_nt_out(x, w, out);
  } else {
    qlinear_out_cpu(x, w, format, out);  // the op's kernel: the eager step's numbers
  }
}

ModelStep::ModelStep(std::vector<Tensor> weights, std::vector<std::string> formats,
                     std::vector<int64_t> ints, std::vector<double> floats) {
  PM_CHECK(ints.size() == 10 && floats.size() == 2, kStep,
           "expected 10 ints and 2 floats of configuration, got ", ints.size(), " and ",
           floats.size());
  const int64_t num_layers = ints[0];
  hidden_ = ints[1], q_heads_ = ints[2], kv_heads_ = ints[3], head_dim_ = ints[4], cla_ = ints[5];
  qk_norm_ = ints[6] != 0, top_k_ = ints[7], renormalize_ = ints[8] != 0, vocab_ = ints[9];
  eps_ = floats[0], rope_base_ = floats[1];
  PM_CHECK(num_layers >= 1 && cla_ >= 1 && kv_heads_ >= 1 && q_heads_ % kv_heads_ == 0, kStep,
           "bad configuration: ", num_layers, " layers, CLA ", cla_, ", ", q_heads_, "/", kv_heads_,
           " heads");
  PM_CHECK(static_cast<int64_t>(weights.size()) == kGlobalSlots + num_layers * kLayerSlots, kStep,
           "expected ", kGlobalSlots + num_layers * kLayerSlots, " weight slots, got ",
           weights.size());
  PM_CHECK(formats.size() == weights.size(), kStep, "expected a format for each of the ",
           weights.size(), " weights, got ", formats.size());
  for (size_t i = 0; i < weights.size(); ++i) {
    const Tensor& w = weights[i];
    PM_CHECK(w.is_cpu() && (w.numel() == 0 || w.is_contiguous()), kStep,
             "every weight must be a contiguous CPU tensor");
    PM_CHECK(formats[i].empty() == (w.scalar_type() != at::kByte), kStep, "weight ", i,
             " must be uint8 GGUF blocks exactly when it has a format, got ", w.scalar_type(),
             " with format '", formats[i], "'");
  }
  for (int i = 0; i < kGlobalSlots; ++i) global_[i] = weights[i];
  head_format_ = formats[kHead];
  layers_.resize(num_layers);
  for (int64_t l = 0; l < num_layers; ++l) {
    Layer& layer = layers_[l];
    for (int s = 0; s < kLayerSlots; ++s) {
      layer.w[s] = weights[kGlobalSlots + l * kLayerSlots + s];
      layer.format[s] = formats[kGlobalSlots + l * kLayerSlots + s];
    }
    layer.owns_kv = l % cla_ == 0;
    if (layer.owns_kv) last_kv_layer_ = l;
    layer.moe = layer.w[kRouter].numel() > 0;
    layer.stacked_qkv = layer.owns_kv && layer.w[kK].numel() == 0 &&
                        layer.w[kQ].size(0) == (q_heads_ + 2 * kv_heads_) * head_dim_;
    PM_CHECK(!layer.owns_kv || layer.w[kK].numel() > 0 || layer.stacked_qkv, kStep, "layer ", l,
             " owns K/V but has no k_proj");
  }
  inv_freq_ = inv_freq_table(rope_base_, head_dim_);
  for (const Layer& layer : layers_) {
    if (layer.moe) continue;
    const int64_t inter = layer.w[kW13].size(0) / 2;
    dense_inter_ = dense_inter_ == 0 || dense_inter_ == inter ? inter : -1;
  }
}

ModelStep::Scratch& ModelStep::scratch_for(int64_t batch, int64_t steps) {
  const std::pair<int64_t, int64_t> key{batch, steps};
  if (steps > kKeptSteps && prefill_scratch_.first == key) return prefill_scratch_.second;
  for (auto& [shape, scratch] : scratch_) {
    if (shape == key) return scratch;
  }
  // A server's shapes come and go: stay bounded.
  if (steps <= kKeptSteps && scratch_.size() >= 16) scratch_.clear();
  const int64_t rows = batch * steps, hq = q_heads_, hkv = kv_heads_, d = head_dim_;
  const auto opts = global_[kEmbed].options();
  Scratch s;
  s.x = at::empty({rows, hidden_}, opts);
  s.h = at::empty({rows, hidden_}, opts);
  s.proj = at::empty({rows, hidden_}, opts);
  s.q = at::empty({rows, hq * d}, opts);
  s.q3 = s.q.view({rows, hq, d});
  s.q_rot = at::empty({batch, steps, hq, d}, opts);
  s.k = at::empty({rows, hkv * d}, opts);
  s.k3 = s.k.view({rows, hkv, d});
  s.v = at::empty({batch, steps, hkv, d}, opts);
  s.v_rows = s.v.view({rows, hkv * d});
  s.k_hat = at::empty({batch, steps, hkv, d}, opts);
  s.o = at::empty({batch, steps, hq, d}, opts);
  s.o_rows = s.o.view({rows, hq * d});
  // A prefill's rows over the vocabulary are made only if a call asks for them (fill does not).
  if (steps <= kKeptSteps) s.out = at::empty({rows, global_[kHead].size(0)}, opts);
  if (dense_inter_ > 0) {
    s.gate_up = at::empty({rows, 2 * dense_inter_}, opts);
    s.gate = s.gate_up.narrow(1, 0, dense_inter_);
    s.up = s.gate_up.narrow(1, dense_inter_, dense_inter_);
    s.act = at::empty({rows, dense_inter_}, opts);
  }
  if (steps > kKeptSteps) {
    prefill_scratch_ = {key, std::move(s)};
    return prefill_scratch_.second;
  }
  scratch_.emplace_back(key, std::move(s));
  return scratch_.back().second;
}

void ModelStep::check_call(const Tensor& ids, const Tensor& k_cache, const Tensor& v_cache,
                           const Tensor& lens) const {
  check_dim(ids, 2, kStep, "ids");
  check_dtype(ids, at::kLong, kStep, "ids");
  check_dim(k_cache, 5, kStep, "k_cache");
  check_dtype(lens, at::kInt, kStep, "lens");
  PM_CHECK(ids.is_cpu() && k_cache.is_cpu() && v_cache.is_cpu() && lens.is_cpu(), kStep,
           "ids, the caches and lens must be CPU tensors");
  const int64_t groups = (static_cast<int64_t>(layers_.size()) + cla_ - 1) / cla_;
  PM_CHECK(k_cache.sizes() == v_cache.sizes() && k_cache.size(0) == groups &&
               k_cache.size(1) == ids.size(0) && k_cache.size(3) == kv_heads_ &&
               k_cache.size(4) == head_dim_,
           kStep, "k_cache and v_cache must be [G=", groups, ", B=", ids.size(0), ", C, ",
           kv_heads_, ", ", head_dim_, "], got ", k_cache.sizes(), " and ", v_cache.sizes());
  PM_CHECK(k_cache.scalar_type() == global_[kEmbed].scalar_type() &&
               v_cache.scalar_type() == k_cache.scalar_type(),
           kStep, "the caches must have the weights' dtype ", global_[kEmbed].scalar_type());
  PM_CHECK(
      k_cache.stride(4) == 1 && v_cache.stride(4) == 1 && k_cache.strides() == v_cache.strides(),
      kStep, "the caches must share strides with a contiguous head dim");
  PM_CHECK(lens.dim() == 1 && lens.size(0) == ids.size(0) && lens.is_contiguous(), kStep,
           "lens must be contiguous [B=", ids.size(0), "], got ", lens.sizes());
}

Tensor ModelStep::head_rows(const Tensor& ids_in, const Tensor& k_cache, const Tensor& v_cache,
                            const int32_t* lens, bool fresh_out, bool kv_only, bool last_only) {
  const int64_t batch = ids_in.size(0), steps = ids_in.size(1), rows = batch * steps;
  const int64_t capacity = k_cache.size(2), hq = q_heads_, hkv = kv_heads_, d = head_dim_;
  const Tensor ids = ids_in.contiguous();
  const int64_t* idp = ids.const_data_ptr<int64_t>();
  std::vector<int64_t> positions(rows);
  std::vector<int32_t> kv_lens(batch);
  for (int64_t b = 0; b < batch; ++b) {
    PM_CHECK(lens[b] >= 0 && lens[b] + steps <= capacity, kStep, "sequence ", b, " holds ", lens[b],
             " tokens: ", steps, " more exceed the cache's capacity ", capacity);
    kv_lens[b] = static_cast<int32_t>(lens[b] + steps);
    for (int64_t s = 0; s < steps; ++s) positions[b * steps + s] = lens[b] + s;
  }

  // A fresh output is made first, outside inference mode, so callers may update it in place;
  // the scratch is made inside it, which skips autograd's view and version bookkeeping (a
  // draft step took 147 us without it, 69 us with it).
  const Tensor& embed = global_[kEmbed];
  const auto opts = embed.options();
  Tensor fresh = fresh_out ? at::empty({rows, global_[kHead].size(0)}, opts) : Tensor();  // [T, V]
  const c10::InferenceMode inference;
  Scratch& s = scratch_for(batch, steps);
  Tensor& x = s.x;  // [T, H]
  // Embedding rows (a trimmed vocabulary maps tokens to rows through vocab_rows).
  const int64_t row_bytes = hidden_ * embed.element_size();
  const int64_t* vocab_rows =
      global_[kVocabRows].numel() > 0 ? global_[kVocabRows].const_data_ptr<int64_t>() : nullptr;
  for (int64_t t = 0; t < rows; ++t) {
    PM_CHECK(idp[t] >= 0 && idp[t] < vocab_, kStep, "ids[", t / steps, ", ", t % steps,
             "] = ", idp[t], " is outside the vocabulary [0, ", vocab_, ")");
    const int64_t row = vocab_rows ? vocab_rows[idp[t]] : idp[t];
    std::memcpy(static_cast<char*>(x.data_ptr()) + t * row_bytes,
                static_cast<const char*>(embed.const_data_ptr()) + row * row_bytes, row_bytes);
  }

  // Each row's rotation angles' cos and sin once for every layer, not per layer and head group.
  std::vector<float> cos_sin(rows * d);
  rope_cos_sin(positions.data(), rows, inv_freq_.data(), d, cos_sin.data());
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  const Tensor none;
  Tensor kc, vc;  // the current CLA group's cache [B, C, Hkv, D]
  for (size_t l = 0; l < layers_.size(); ++l) {
    const Layer& layer = layers_[l];
    const auto& w = layer.w;
    const auto& fmt = layer.format;
    // kv_only: the last layer that writes the cache stops after writing it.
    const bool last = kv_only && static_cast<int64_t>(l) == last_kv_layer_;
    rms_norm(x, w[kInNorm], eps_, s.h);
    if (layer.stacked_qkv) {  // one quantised [q; k; v] projection, split as the eager step does
      const Tensor qkv = qlinear_cpu(s.h, w[kQ], fmt[kQ]);  // [T, (Hq + 2 Hkv) D]
      s.q.copy_(qkv.narrow(1, 0, hq * d));
      s.k.copy_(qkv.narrow(1, hq * d, hkv * d));
      s.v_rows.copy_(qkv.narrow(1, (hq + hkv) * d, hkv * d));
    } else if (!last) {
      project(s.h, w[kQ], fmt[kQ], s.q);
    }
    if (!last) {
      rope_norm(s.q3, positions.data(), qk_norm_ ? w[kQNorm] : none, qk_norm_ ? w[kKNorm] : none,
                inv_freq_.data(), eps_, qk_norm_, s.q_rot, cos_sin.data());
    }
    if (static_cast<int64_t>(l) % cla_ == 0) {
      const int64_t group = static_cast<int64_t>(l) / cla_;
      kc = k_cache.select(0, group), vc = v_cache.select(0, group);
    }
    if (layer.owns_kv) {
      if (!layer.stacked_qkv) {
        project(s.h, w[kK], fmt[kK], s.k);
        project(s.h, w[kV], fmt[kV], s.v_rows);
      }
      rope_norm(s.k3, positions.data(), none, none, inv_freq_.data(), eps_, qk_norm_, s.k_hat,
                cos_sin.data());
      kv_cache_write(s.k_hat, s.v, positions.data(), kc, vc);
    }
    if (last) return Tensor();
    attention(s.q_rot, kc, vc, kv_lens.data(), scale, s.o);
    project(s.o_rows, w[kO], fmt[kO], s.proj);
    add_into(x, s.proj);
    rms_norm(x, w[kPostNorm], eps_, s.h);
    if (layer.moe) {
      const Tensor y = moe_ffn_cpu(s.h, w[kRouter], w[kW13], w[kW2], top_k_, maybe(w[kSharedW13]),
                                   maybe(w[kSharedW2]), renormalize_);
      add_into(x, y);
    } else {
      const int64_t inter = w[kW13].size(0) / 2;
      const bool cached = inter == dense_inter_;
      Tensor gate_up = cached ? s.gate_up : at::empty({rows, 2 * inter}, opts);
      project(s.h, w[kW13], fmt[kW13], gate_up);
      // F.silu(gate) * up in the model dtype, as the eager step computes it
      Tensor act = cached ? s.act : at::empty({rows, inter}, opts);
      silu_mul_out(cached ? s.gate : gate_up.narrow(1, 0, inter),
                   cached ? s.up : gate_up.narrow(1, inter, inter), act);
      project(act, w[kW2], fmt[kW2], s.proj);
      add_into(x, s.proj);
    }
  }
  if (last_only && steps > 1) {  // each sequence's last row: [B, H] -> [B, V or V']
    const Tensor last_rows = x.view({batch, steps, hidden_}).select(1, steps - 1).contiguous();
    Tensor normed = at::empty_like(last_rows),
           rows_out = at::empty({batch, global_[kHead].size(0)}, opts);
    rms_norm(last_rows, global_[kFinalNorm], eps_, normed);
    project(normed, global_[kHead], head_format_, rows_out);
    return rows_out;
  }
  rms_norm(x, global_[kFinalNorm], eps_, s.h);
  if (!fresh_out && !s.out.defined()) s.out = at::empty({rows, global_[kHead].size(0)}, opts);
  Tensor& out = fresh_out ? fresh : s.out;
  project(s.h, global_[kHead], head_format_, out);
  return out;
}

Tensor ModelStep::checked_head_rows(const Tensor& ids, const Tensor& k_cache, const Tensor& v_cache,
                                    const Tensor& lens) {
  check_call(ids, k_cache, v_cache, lens);
  const GilRelease no_gil;
  const PoolScope pool_scope;
  const std::lock_guard<std::mutex> lock(mutex_);
  return head_rows(ids, k_cache, v_cache, lens.const_data_ptr<int32_t>(), true);
}

Tensor ModelStep::logits(const Tensor& ids, const Tensor& k_cache, const Tensor& v_cache,
                         const Tensor& lens) {
  const int64_t batch = ids.size(0), steps = ids.size(1);
  const Tensor rows = checked_head_rows(ids, k_cache, v_cache, lens).to(at::kFloat);
  if (global_[kVocabIds].numel() == 0) return rows.view({batch, steps, vocab_});
  Tensor full =
      at::full({batch * steps, vocab_}, -std::numeric_limits<float>::infinity(), rows.options());
  full.index_copy_(1, global_[kVocabIds].to(at::kLong), rows);
  return full.view({batch, steps, vocab_});
}

// torch.argmax over the full-vocabulary logits: the first maximum by token id, NaN above all.
Tensor ModelStep::argmax_rows(const Tensor& rows, int64_t batch, int64_t steps) const {
  Tensor tokens = at::empty({batch, steps}, rows.options().dtype(at::kLong));
  int64_t* out = tokens.mutable_data_ptr<int64_t>();
  const int64_t width = rows.size(1);
  const int32_t* ids =
      global_[kVocabIds].numel() > 0 ? global_[kVocabIds].const_data_ptr<int32_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, rows.scalar_type(), "argmax", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* p = rows.const_data_ptr<scalar_t>();
    for (int64_t r = 0; r < batch * steps; ++r, p += width) {
      // Every logit -inf (the unscored tokens of a trimmed vocabulary are): token 0 wins.
      acc_t best = -std::numeric_limits<acc_t>::infinity();
      int64_t best_token = 0, nan_token = -1;
      for (int64_t i = 0; i < width; ++i) {
        const acc_t value = static_cast<acc_t>(p[i]);
        const int64_t token = ids ? ids[i] : i;
        if (value != value) {  // NaN: the first one by token id is the argmax
          if (nan_token < 0 || token < nan_token) nan_token = token;
        } else if (value > best || (ids && value == best && token < best_token)) {
          best = value, best_token = token;
        }
      }
      out[r] = nan_token >= 0 ? nan_token : best_token;
    }
  });
  return tokens;
}

void ModelStep::fill(const Tensor& ids, const Tensor& k_cache, const Tensor& v_cache,
                     const Tensor& lens) {
  check_call(ids, k_cache, v_cache, lens);
  const GilRelease no_gil;
  const PoolScope pool_scope;
  const std::lock_guard<std::mutex> lock(mutex_);
  int32_t* lp = lens.mutable_data_ptr<int32_t>();
  const int64_t batch = ids.size(0), steps = ids.size(1);
  int64_t longest = 0;
  for (int64_t b = 0; b < batch; ++b) longest = std::max<int64_t>(longest, lp[b] + steps);
  // One call while every kernel computes each row as it would for its sequence alone (what the
  // eager prefill, one sequence at a time, computes): the projections' and experts' skinny
  // kernels (BLAS beyond) and attention's per-row path. Else one sequence at a time.
  if (gemm_rows_alone(batch * steps, global_[kEmbed].scalar_type()) &&
      attention_rows_alone(batch, steps, longest)) {
    head_rows(ids, k_cache, v_cache, lp, false, true);
  } else {
    for (int64_t b = 0; b < batch; ++b) {
      head_rows(ids.narrow(0, b, 1), k_cache.narrow(1, b, 1), v_cache.narrow(1, b, 1), lp + b,
                false, true);
    }
  }
  for (int64_t b = 0; b < batch; ++b) lp[b] += static_cast<int32_t>(steps);
  // A decode follows: ATen's OpenMP team (the caches' zeros were an OpenMP region) would spin
  // for milliseconds beside the pool's helpers (measured: ~9 ms a request, and the pool judging
  // the machine loaded).
  if (pool_claims()) rest_openmp();
}

Tensor ModelStep::greedy(const Tensor& ids, const Tensor& k_cache, const Tensor& v_cache,
                         const Tensor& lens) {
  check_call(ids, k_cache, v_cache, lens);
  const GilRelease no_gil;
  const PoolScope pool_scope;
  const std::lock_guard<std::mutex> lock(mutex_);  // held while the scratch rows are read
  return argmax_rows(head_rows(ids, k_cache, v_cache, lens.const_data_ptr<int32_t>(), false),
                     ids.size(0), ids.size(1));
}

Tensor ModelStep::greedy_steps(const Tensor& ids, const Tensor& k_cache, const Tensor& v_cache,
                               const Tensor& lens, int64_t n, const Tensor& eos,
                               const Tensor& done) {
  return decode_steps(ids, k_cache, v_cache, lens, n, eos, done, nullptr);
}

Tensor ModelStep::sample_steps(const Tensor& ids, const Tensor& k_cache, const Tensor& v_cache,
                               const Tensor& lens, int64_t n, const Tensor& eos, const Tensor& done,
                               const c10::intrusive_ptr<Sampler>& sampler) {
  PM_CHECK(sampler, kStep, "sample_steps needs a sampler");
  return decode_steps(ids, k_cache, v_cache, lens, n, eos, done, sampler.get());
}

Tensor ModelStep::decode_steps(const Tensor& ids, const Tensor& k_cache, const Tensor& v_cache,
                               const Tensor& lens, int64_t n, const Tensor& eos, const Tensor& done,
                               Sampler* sampler) {
  check_call(ids, k_cache, v_cache, lens);
  const int64_t batch = ids.size(0);
  const char* name = sampler != nullptr ? "sample_steps" : "greedy_steps";
  PM_CHECK(ids.size(1) == 1, kStep, name, " needs one token per sequence, ids [B, 1], got ",
           ids.sizes());
  PM_CHECK(n >= 1, kStep, name, " needs n >= 1 steps, got ", n);
  const StopRule stops(kStep, eos, Tensor(), batch);
  check_dtype(done, at::kBool, kStep, "done");
  PM_CHECK(done.is_cpu(), kStep, name, "' done must be a CPU tensor");
  PM_CHECK(done.dim() == 1 && done.size(0) == batch, kStep, "done must be [B=", batch, "], got ",
           done.sizes());
  const Tensor was = done.contiguous();
  std::vector<uint8_t> finished(was.const_data_ptr<bool>(), was.const_data_ptr<bool>() + batch);
  int32_t* lp = lens.mutable_data_ptr<int32_t>();
  for (int64_t b = 0; b < batch; ++b) {  // refused before any step moves a length
    PM_CHECK(lp[b] >= 0 && lp[b] + n <= k_cache.size(2), kStep, "sequence ", b, " holds ", lp[b],
             " tokens: ", name, "' ", n, " more exceed the cache's capacity ", k_cache.size(2));
  }
  const GilRelease no_gil;
  const PoolScope pool_scope;
  const std::lock_guard<std::mutex> lock(mutex_);
  Tensor out = at::empty({batch, n}, ids.options());  // [B, n]
  int64_t* op = out.mutable_data_ptr<int64_t>();
  Tensor step = ids.contiguous().clone();  // [B, 1]: each step's input
  int64_t* sp = step.mutable_data_ptr<int64_t>();
  int64_t taken = 0;
  std::vector<float> probs(sampler != nullptr ? vocab_ : 0);  // [V]
  std::vector<int64_t> drawn(batch);
  while (taken < n) {
    const Tensor rows = head_rows(step, k_cache, v_cache, lp, false);  // [B, V or V']
    const int64_t* np = drawn.data();
    if (sampler != nullptr) {
      for (int64_t b = 0; b < batch; ++b) {
        sampler->row_probs(kStep, rows, b, vocab_ids(), vocab_, probs.data());
        drawn[b] = sampler->draw_row(probs.data(), vocab_);
      }
    } else {
      const Tensor next = argmax_rows(rows, batch, 1);
      std::copy_n(next.const_data_ptr<int64_t>(), batch, drawn.begin());
    }
    bool all_done = true;
    for (int64_t b = 0; b < batch; ++b) {
      lp[b] += 1;  // the step's input is cached
      op[b * n + taken] = sp[b] = np[b];
      if (!finished[b]) finished[b] = stops.is_eos(np[b]);
      all_done = all_done && finished[b];
    }
    ++taken;
    if (all_done) break;
  }
  return taken == n ? out : out.narrow(1, 0, taken).contiguous();
}

Contexts contexts_from(const char* op, const Tensor& history, const Tensor& history_lens,
                       int64_t batch, int64_t room) {
  PM_CHECK(history.dim() == 2 && history.size(0) == batch && history.scalar_type() == at::kLong &&
               history.is_contiguous() && history.is_cpu() && history_lens.dim() == 1 &&
               history_lens.size(0) == batch && history_lens.scalar_type() == at::kLong &&
               history_lens.is_contiguous() && history_lens.is_cpu(),
           op, "history must be contiguous int64 CPU [B=", batch,
           ", C] and history_lens contiguous int64 CPU [B]");
  const int64_t* hp = history.const_data_ptr<int64_t>();
  const int64_t* hl = history_lens.const_data_ptr<int64_t>();
  const int64_t cap = history.size(1);
  Contexts contexts(batch);
  for (int64_t b = 0; b < batch; ++b) {
    PM_CHECK(hl[b] >= 1 && hl[b] + room <= cap, op, "history_lens[", b, "] = ", hl[b],
             " must be in [1, ", cap - room, "] (history holds ", cap, " tokens, ", room,
             " kept free)");
    contexts[b].reserve(hl[b] + room);
    contexts[b].assign(hp + b * cap, hp + b * cap + hl[b]);
  }
  return contexts;
}

Tensor ModelStep::draft_history(const Tensor& ids, const Tensor& k_cache, const Tensor& v_cache,
                                const Tensor& lens, int64_t n, const Tensor& history,
                                const Tensor& history_lens, int64_t ngram, int64_t extend) {
  PM_CHECK(ngram >= 0, kStep, "draft_history's ngram must be >= 0, got ", ngram);
  Contexts contexts = contexts_from(kStep, history, history_lens, ids.size(0), 0);
  return draft_lookup(ids, k_cache, v_cache, lens, n, &contexts, ngram, extend);
}

Tensor ModelStep::draft(const Tensor& ids, const Tensor& k_cache, const Tensor& v_cache,
                        const Tensor& lens, int64_t n) {
  return draft_lookup(ids, k_cache, v_cache, lens, n, nullptr, 0);
}

Tensor ModelStep::draft_lookup(const Tensor& ids, const Tensor& k_cache, const Tensor& v_cache,
                               const Tensor& lens, int64_t n, Contexts* contexts, int64_t ngram,
                               int64_t extend, std::vector<uint8_t>* origins, int64_t* model_steps,
                               Sampler* sampler, std::vector<float>* q) {
  check_call(ids, k_cache, v_cache, lens);
  PM_CHECK(n >= 1, kStep, "draft needs n >= 1 tokens, got ", n);
  PM_CHECK(extend >= 0, kStep, "draft's extend must be >= 0, got ", extend);
  const int64_t batch = ids.size(0);
  const bool lookup = contexts != nullptr && ngram > 0;
  PM_CHECK(!lookup || static_cast<int64_t>(contexts->size()) == batch, kStep,
           "draft's lookup needs a context per sequence: ", contexts ? contexts->size() : 0,
           " for ", batch);
  const GilRelease no_gil;
  const PoolScope pool_scope;
  const std::lock_guard<std::mutex> lock(mutex_);
  int32_t* lp = lens.mutable_data_ptr<int32_t>();
  const int64_t most = lookup ? n + extend : n;
  Tensor tokens = at::empty({batch, most}, ids.options());
  int64_t* out = tokens.mutable_data_ptr<int64_t>();
  // Tokens not yet cached, [B, width] row-major: a step whose next tokens all come from the
  // lookup needs no logits, so its tokens wait and are cached with the next step that runs the
  // model (or at the end) in one multi-token step, which reads the weights once for all of them.
  // Each row's K/V is the same in any step (the kernels are row-independent), so the cache
  // holds what one-token steps write. At most kMaxPending wait, so a step stays a decode shape.
  constexpr int64_t kMaxPending = 8;
  const Tensor first = ids.contiguous();
  std::vector<int64_t> pending(first.const_data_ptr<int64_t>(),
                               first.const_data_ptr<int64_t>() + first.numel());
  int64_t width = ids.size(1);
  auto step_ids = [&] {  // the waiting tokens as a [B, width] tensor
    return at::from_blob(pending.data(), {batch, width}, ids.options()).clone();
  };
  auto append = [&](const std::vector<int64_t>& column) {  // one more token per sequence
    std::vector<int64_t> grown(batch * (width + 1));
    for (int64_t b = 0; b < batch; ++b) {
      std::copy_n(pending.begin() + b * width, width, grown.begin() + b * (width + 1));
      grown[b * (width + 1) + width] = column[b];
    }
    pending.swap(grown);
    ++width;
  };
  auto cached = [&] {  // the waiting tokens are in the cache now
    for (int64_t b = 0; b < batch; ++b) lp[b] += static_cast<int32_t>(width);
    pending.clear();
    width = 0;
  };
  std::vector<int64_t> found(batch, -1), previous(batch);
  std::vector<uint8_t> made(batch * most, 0);  // 1: the model's token
  int64_t drafted = 0, steps = 0;
  PM_CHECK(sampler == nullptr || q != nullptr, kStep, "a sampled draft needs its q buffer");
  if (sampler != nullptr) q->resize(batch * most * vocab_);
  auto q_row = [&](int64_t b, int64_t i) { return q->data() + (b * most + i) * vocab_; };
  auto all_on = [&](int64_t b, int64_t i, int64_t token) {  // the lookup's proposal
    float* row = q_row(b, i);
    std::fill_n(row, vocab_, 0.f);
    row[token] = 1.f;
  };
  for (int64_t i = 0; i < most; ++i) {
    bool all_found = lookup;
    for (int64_t b = 0; lookup && b < batch; ++b) {
      found[b] = lookup_next((*contexts)[b], ngram);
      all_found = all_found && found[b] >= 0;
    }
    if (i >= n && !all_found) break;  // past n tokens only while every sequence looks up
    if (i > 0) append(previous);      // this step's input: the token drafted last
    if (!all_found) {
      // Only each sequence's last row needs logits: the head runs on those alone.
      const Tensor rows = head_rows(step_ids(), k_cache, v_cache, lp, false, false, true);
      if (sampler != nullptr) {
        for (int64_t b = 0; b < batch; ++b) {
          if (found[b] >= 0) {
            all_on(b, i, found[b]);
            continue;
          }
          sampler->row_probs(kStep, rows, b, vocab_ids(), vocab_, q_row(b, i));
          found[b] = sampler->draw_row(q_row(b, i), vocab_), made[b * most + i] = 1;
        }
      } else {
        const Tensor step = argmax_rows(rows, batch, 1);
        const int64_t* sp = step.const_data_ptr<int64_t>();
        for (int64_t b = 0; b < batch; ++b) {
          if (found[b] < 0) found[b] = sp[b], made[b * most + i] = 1;
        }
      }
      cached();
      ++steps;
    } else {
      for (int64_t b = 0; sampler != nullptr && b < batch; ++b) all_on(b, i, found[b]);
      if (width >= kMaxPending) {  // every next token is the lookup's: no logits needed
        head_rows(step_ids(), k_cache, v_cache, lp, false, true);
        cached();
      }
    }
    for (int64_t b = 0; b < batch; ++b) {
      if (lookup) (*contexts)[b].push_back(found[b]);
      out[b * most + i] = previous[b] = found[b];
      found[b] = -1;
    }
    ++drafted;
  }
  if (width > 0) {  // the inputs still waiting (never the last drafted token, which is not cached)
    head_rows(step_ids(), k_cache, v_cache, lp, false, true);
    cached();
  }
  if (model_steps != nullptr) *model_steps = steps;
  if (origins != nullptr) {
    origins->resize(batch * drafted);
    for (int64_t b = 0; b < batch; ++b) {
      std::copy_n(made.begin() + b * most, drafted, origins->begin() + b * drafted);
    }
  }
  return drafted == most ? tokens : tokens.narrow(1, 0, drafted).contiguous();
}

void ModelStep::window_probs(const Tensor& ids, const Tensor& k_cache, const Tensor& v_cache,
                             const Tensor& lens, Sampler& sampler, std::vector<float>& out) {
  check_call(ids, k_cache, v_cache, lens);
  const GilRelease no_gil;
  const PoolScope pool_scope;
  const std::lock_guard<std::mutex> lock(mutex_);  // held while the scratch rows are read
  const Tensor rows = head_rows(ids, k_cache, v_cache, lens.const_data_ptr<int32_t>(), false);
  out.resize(rows.size(0) * vocab_);
  for (int64_t r = 0; r < rows.size(0); ++r) {
    sampler.row_probs(kStep, rows, r, vocab_ids(), vocab_, out.data() + r * vocab_);
  }
}

std::tuple<Tensor, Tensor, int64_t> ModelStep::speculative_round(
    const c10::intrusive_ptr<ModelStep>& draft, const Tensor& feed, const Tensor& prev,
    const Tensor& last, int64_t gamma, const Tensor& t_k, const Tensor& t_v, const Tensor& t_lens,
    const Tensor& d_k, const Tensor& d_v, const Tensor& d_lens, const Tensor& active,
    const Tensor& history, const Tensor& history_lens, int64_t ngram, int64_t extend) {
  return round_impl(draft, feed, prev, last, gamma, t_k, t_v, t_lens, d_k, d_v, d_lens, active,
                    history, history_lens, ngram, extend, nullptr);
}

std::tuple<Tensor, Tensor, int64_t> ModelStep::round_impl(
    const c10::intrusive_ptr<ModelStep>& draft, const Tensor& feed, const Tensor& prev,
    const Tensor& last, int64_t gamma, const Tensor& t_k, const Tensor& t_v, const Tensor& t_lens,
    const Tensor& d_k, const Tensor& d_v, const Tensor& d_lens, const Tensor& active,
    const Tensor& history, const Tensor& history_lens, int64_t ngram, int64_t extend,
    Sampler* sampler) {
  const int64_t batch = feed.size(0), width = feed.dim() == 2 ? feed.size(1) : 0;
  PM_CHECK(gamma >= 1, kStep, "speculative_round needs gamma >= 1, got ", gamma);
  for (const Tensor* t : {&prev, &last}) {
    PM_CHECK(t->dim() == 1 && t->size(0) == batch && t->scalar_type() == at::kLong &&
                 t->is_contiguous() && t->is_cpu(),
             kStep, "prev and last must be contiguous int64 CPU [B=", batch, "]");
  }
  PM_CHECK(active.dim() == 1 && active.size(0) == batch && active.scalar_type() == at::kBool &&
               active.is_contiguous() && active.is_cpu(),
           kStep, "active must be a contiguous bool CPU [B=", batch, "]");
  PM_CHECK(
      t_lens.dim() == 1 && d_lens.dim() == 1 && t_lens.size(0) == batch && d_lens.size(0) == batch,
      kStep, "t_lens and d_lens must be [B=", batch, "]");
  PM_CHECK(ngram >= 0 && extend >= 0, kStep,
           "speculative_round's ngram and extend must be >= 0, got ", ngram, " and ", extend);
  if (ngram == 0) extend = 0;
  const int64_t most = gamma + extend;  // the drafts this round may hold
  Contexts contexts;
  int64_t* hp = nullptr;
  int64_t* hl = nullptr;
  int64_t hcap = 0;
  if (ngram > 0) {
    contexts = contexts_from(kStep, history, history_lens, batch, most + 1);
    hp = history.mutable_data_ptr<int64_t>();
    hl = history_lens.mutable_data_ptr<int64_t>();
    hcap = history.size(1);
  }
  Tensor rows = at::full({batch, most + 2}, -1, feed.options().dtype(at::kLong));
  Tensor seconds = at::zeros({5}, feed.options().dtype(at::kDouble));
  const GilRelease no_gil;
  const PoolScope pool_scope;
  const auto start = std::chrono::steady_clock::now();
  std::vector<uint8_t> made;  // [B, gamma] row-major: 1 where the model drafted the token
  int64_t model_steps = 0;
  const Tensor drafted =
      draft->draft_lookup(feed, d_k, d_v, d_lens, gamma, ngram > 0 ? &contexts : nullptr, ngram,
                          extend, &made, &model_steps, sampler, &sample_q_);
  gamma = drafted.size(1);  // [B, gamma]: the lookup may have drafted past it
  const auto drafted_at = std::chrono::steady_clock::now();
  Tensor window = at::empty({batch, gamma + 1}, rows.options());  // [last, d_1..d_gamma]
  int64_t* wp = window.mutable_data_ptr<int64_t>();
  const int64_t* dp = drafted.const_data_ptr<int64_t>();
  int64_t* lastp = last.mutable_data_ptr<int64_t>();
  int64_t* prevp = prev.mutable_data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b) {
    wp[b * (gamma + 1)] = lastp[b];
    std::copy_n(dp + b * gamma, gamma, wp + b * (gamma + 1) + 1);
  }
  // Each sequence's accepted count and the token after its accepted drafts (the correction, or
  // the bonus when all are accepted).
  std::vector<int64_t> accepted(batch), after(batch);
  if (sampler == nullptr) {
    const Tensor scored = greedy(window, t_k, t_v, t_lens);  // [B, gamma + 1]
    const int64_t* sp = scored.const_data_ptr<int64_t>();
    for (int64_t b = 0; b < batch; ++b) {
      const int64_t* d = dp + b * gamma;
      const int64_t* t = sp + b * (gamma + 1);
      int64_t a = 0;
      while (a < gamma && d[a] == t[a]) ++a;
      accepted[b] = a, after[b] = t[a];
    }
  } else {
    window_probs(window, t_k, t_v, t_lens, *sampler, sample_p_);  // [B, gamma + 1, V]
    std::vector<float> u(gamma + 1);
    std::vector<int64_t> kept(gamma + 1);
    for (int64_t b = 0; b < batch; ++b) {
      for (float& x : u) x = sampler->uniform();
      const int64_t a = spec_decode::spec_verify_sequence(
          sample_p_.data() + b * (gamma + 1) * vocab_, dp + b * gamma,
          sample_q_.data() + b * most * vocab_, u.data(), gamma, vocab_, true, kept.data());
      accepted[b] = a, after[b] = kept[a];
    }
  }
  const auto scored_at = std::chrono::steady_clock::now();
  const bool* on = active.const_data_ptr<bool>();
  int32_t* tl = t_lens.mutable_data_ptr<int32_t>();
  int32_t* dl = d_lens.mutable_data_ptr<int32_t>();
  int64_t* rp = rows.mutable_data_ptr<int64_t>();
  int64_t model_tested = 0, model_accepted = 0;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t* d = dp + b * gamma;
    const int64_t a = accepted[b];
    if (on[b]) count_model_drafts(made.data() + b * gamma, gamma, a, model_tested, model_accepted);
    int64_t* row = rp + b * (most + 2);
    row[0] = a;
    std::copy_n(d, a, row + 1);
    row[a + 1] = after[b];
    if (!on[b]) {  // keeps its state: the draft back to where it was
      dl[b] -= static_cast<int32_t>(width + gamma - 1);
      continue;
    }
    if (hp != nullptr) {  // the kept tokens join the history
      std::copy_n(row + 1, a + 1, hp + b * hcap + hl[b]);
      hl[b] += a + 1;
    }
    tl[b] += static_cast<int32_t>(a + 1);      // last and the accepted drafts
    dl[b] -= static_cast<int32_t>(gamma - a);  // all but the last accepted (re-fed) and after
    prevp[b] = a > 0 ? d[a - 1] : lastp[b];
    lastp[b] = after[b];
  }
  double* sec = seconds.mutable_data_ptr<double>();
  sec[0] = std::chrono::duration<double>(drafted_at - start).count();
  sec[1] = std::chrono::duration<double>(scored_at - drafted_at).count();
  sec[2] = static_cast<double>(model_steps);
  sec[3] = static_cast<double>(model_tested);
  sec[4] = static_cast<double>(model_accepted);
  return {rows, seconds, gamma};
}

std::tuple<Tensor, Tensor, Tensor> ModelStep::speculative_rounds(
    const c10::intrusive_ptr<ModelStep>& draft, const Tensor& feed, const Tensor& prev,
    const Tensor& last, int64_t gamma, const Tensor& t_k, const Tensor& t_v, const Tensor& t_lens,
    const Tensor& d_k, const Tensor& d_v, const Tensor& d_lens, const Tensor& active,
    const Tensor& history, const Tensor& history_lens, int64_t ngram, int64_t extend,
    int64_t rounds, const Tensor& eos, const Tensor& budget) {
  return rounds_impl(draft, feed, prev, last, gamma, t_k, t_v, t_lens, d_k, d_v, d_lens, active,
                     history, history_lens, ngram, extend, rounds, eos, budget, nullptr);
}

std::tuple<Tensor, Tensor, Tensor> ModelStep::sampled_rounds(
    const c10::intrusive_ptr<ModelStep>& draft, const Tensor& feed, const Tensor& prev,
    const Tensor& last, int64_t gamma, const Tensor& t_k, const Tensor& t_v, const Tensor& t_lens,
    const Tensor& d_k, const Tensor& d_v, const Tensor& d_lens, const Tensor& active,
    const Tensor& history, const Tensor& history_lens, int64_t ngram, int64_t extend,
    int64_t rounds, const Tensor& eos, const Tensor& budget,
    const c10::intrusive_ptr<Sampler>& sampler) {
  PM_CHECK(sampler, kStep, "sampled_rounds needs a sampler");
  PM_CHECK(draft->vocab_ == vocab_, kStep, "sampled_rounds: the draft's vocabulary (",
           draft->vocab_, ") is not the target's (", vocab_, ")");
  const GilRelease no_gil;
  const std::lock_guard<std::mutex> lock(sample_mutex_);
  return rounds_impl(draft, feed, prev, last, gamma, t_k, t_v, t_lens, d_k, d_v, d_lens, active,
                     history, history_lens, ngram, extend, rounds, eos, budget, sampler.get());
}

std::tuple<Tensor, Tensor, Tensor> ModelStep::rounds_impl(
    const c10::intrusive_ptr<ModelStep>& draft, const Tensor& feed, const Tensor& prev,
    const Tensor& last, int64_t gamma, const Tensor& t_k, const Tensor& t_v, const Tensor& t_lens,
    const Tensor& d_k, const Tensor& d_v, const Tensor& d_lens, const Tensor& active,
    const Tensor& history, const Tensor& history_lens, int64_t ngram, int64_t extend,
    int64_t rounds, const Tensor& eos, const Tensor& budget, Sampler* sampler) {
  const int64_t batch = feed.size(0);
  PM_CHECK(rounds >= 1, kStep, "speculative_rounds needs rounds >= 1, got ", rounds);
  StopRule stops(kStep, eos, budget, batch);
  PM_CHECK(active.dim() == 1 && active.size(0) == batch && active.scalar_type() == at::kBool &&
               active.is_contiguous() && active.is_cpu(),
           kStep, "active must be a contiguous bool CPU [B=", batch, "]");
  const bool* on = active.const_data_ptr<bool>();
  std::vector<Tensor> all_rows, all_seconds;
  std::vector<int64_t> drafted;
  Tensor step_feed = feed;
  const GilRelease no_gil;
  for (int64_t r = 0; r < rounds; ++r) {
    auto [rows, seconds, g] =
        round_impl(draft, step_feed, prev, last, gamma, t_k, t_v, t_lens, d_k, d_v, d_lens, active,
                   history, history_lens, ngram, extend, sampler);
    all_rows.push_back(rows);
    all_seconds.push_back(seconds);
    drafted.push_back(g);
    const int64_t width = rows.size(1);
    const int64_t* rp = rows.const_data_ptr<int64_t>();
    bool ended = false;
    for (int64_t b = 0; b < batch; ++b) {  // a row: a, then the a + 1 kept tokens
      if (on[b]) ended = stops.kept(b, rp + b * width + 1, rp[b * width] + 1) || ended;
    }
    if (ended) break;
    step_feed = at::stack({prev, last}, 1);  // [B, 2]
  }
  Tensor counts = at::empty({static_cast<int64_t>(drafted.size())}, prev.options());
  std::copy(drafted.begin(), drafted.end(), counts.mutable_data_ptr<int64_t>());
  return {at::stack(all_rows), at::stack(all_seconds), counts};
}

}  // namespace pearlmoe::cpu
