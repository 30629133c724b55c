// A model's whole decode / verification step on the CPU in one call (the "fused" backend of
// pearlmoe.decode.runner). The same kernels, in the same order and with the same rounding
// points as Transformer.step on the eager ops, so its logits are bit-identical to theirs; what
// it removes is everything between the kernels: ~45-100 dispatcher calls, output allocations and
// Python (or a compiled graph's wrappers and guards) per step, which on the small models decode
// and draft with cost more than the arithmetic.
//
// Supported: Llama and Hunyuan-style layers (GQA, CLA, QK-norm after RoPE, softmax top-k MoE
// with an ungated shared expert, dense SwiGLU), tied or untied heads, a trimmed draft
// vocabulary, fp32 / bf16 / fp16 weights. The Python side (pearlmoe.decode.fused) refuses other
// configurations with the reason, and they run on the compile backend.
#pragma once

#include <ATen/ATen.h>
#include <torch/custom_class.h>

#include <array>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "lookup.h"
#include "sampler.h"

namespace pearlmoe::cpu {

// The lookup's contexts from history [B, C] and history_lens [B] (both int64 CPU), checked for
// op's error messages: each length in [1, C - room].
Contexts contexts_from(const char* op, const at::Tensor& history, const at::Tensor& history_lens,
                       int64_t batch, int64_t room);

class ModelStep : public torch::CustomClassHolder {
 public:
  // Layer slots in `weights`, kLayerSlots per layer after the kGlobalSlots model tensors; an
  // absent tensor is an empty one. formats[i]: "" for a dense weight, else the GGUF block format
  // of a uint8 projection weight (pearlmoe.qlinear's 'q4_0', 'q4_1', 'q8_0'); a layer whose
  // kQ slot holds q, k and v stacked (one quantised qkv_proj) has empty kK and kV slots.
  // ints: {layers, hidden, q_heads, kv_heads, head_dim, cla_share_factor, qk_norm_after_rope,
  // moe_top_k, renormalize, vocab_size}; floats: {rms_norm_eps, rope_base}.
  enum Global { kEmbed, kFinalNorm, kHead, kVocabRows, kVocabIds, kGlobalSlots };
  enum Slot {
    kInNorm,
    kQ,
    kK,
    kV,
    kO,
    kQNorm,
    kKNorm,
    kPostNorm,
    kRouter,
    kW13,
    kW2,
    kSharedW13,
    kSharedW2,
    kLayerSlots
  };

  ModelStep(std::vector<at::Tensor> weights, std::vector<std::string> formats,
            std::vector<int64_t> ints, std::vector<double> floats);

  // fp32 logits [B, S, V] over the whole vocabulary for ids [B, S] (int64) appended after each
  // sequence's lens[b] (int32 [B]) in the cache k/v [G, B, C, Hkv, D]; lens are not moved.
  at::Tensor logits(const at::Tensor& ids, const at::Tensor& k_cache, const at::Tensor& v_cache,
                    const at::Tensor& lens);
  // A prompt's prefill: caches ids [B, S] after lens and moves lens by S, computing only what
  // the cache holds (the layers up to the last one that writes K/V, no head); the cache's
  // contents are the eager step's bit for bit, one sequence at a time as the eager prefill is
  // (the batch goes in one pass only where that computes each row the same).
  void fill(const at::Tensor& ids, const at::Tensor& k_cache, const at::Tensor& v_cache,
            const at::Tensor& lens);
  // The greedy tokens [B, S] (int64) of the same step: torch.argmax of those logits.
  at::Tensor greedy(const at::Tensor& ids, const at::Tensor& k_cache, const at::Tensor& v_cache,
                    const at::Tensor& lens);
  // n greedy tokens [B, n] after ids [B, S]: the step over ids, then n - 1 one-token steps on
  // its own argmaxes; lens advance by S + n - 1 (the last token is not cached), as n calls of
  // greedy() with the caller moving lens would.
  at::Tensor draft(const at::Tensor& ids, const at::Tensor& k_cache, const at::Tensor& v_cache,
                   const at::Tensor& lens, int64_t n);
  // Autoregressive greedy decoding in one call: up to n one-token steps from ids [B, 1], each
  // feeding the token the step before chose, as n calls of greedy() with the caller moving lens
  // would (bit for bit); lens advance by the steps taken. It stops after the step at which every
  // sequence not already done (bool [B]) has chosen one of eos (int64 [E], E >= 0): [B, n']
  // tokens, n' <= n. A sequence that is done decodes on, unused, as in a per-step loop.
  at::Tensor greedy_steps(const at::Tensor& ids, const at::Tensor& k_cache,
                          const at::Tensor& v_cache, const at::Tensor& lens, int64_t n,
                          const at::Tensor& eos, const at::Tensor& done);
  // The distributions [B * S, V] (row-major into out, fp32, sampler's temperature, top-k and
  // top-p) of the step over ids [B, S] at lens; lens are not moved.
  void window_probs(const at::Tensor& ids, const at::Tensor& k_cache, const at::Tensor& v_cache,
                    const at::Tensor& lens, Sampler& sampler, std::vector<float>& out);
  int64_t vocab() const { return vocab_; }
  // greedy_steps with each step's token drawn by sampler from the step's distribution
  // (temperature, top-k, top-p: pearlmoe.decode.sampling's rules) instead of its argmax.
  at::Tensor sample_steps(const at::Tensor& ids, const at::Tensor& k_cache,
                          const at::Tensor& v_cache, const at::Tensor& lens, int64_t n,
                          const at::Tensor& eos, const at::Tensor& done,
                          const c10::intrusive_ptr<Sampler>& sampler);
  // draft_lookup over history [B, C] (int64: each sequence's tokens, the first history_lens[b]
  // of a row; int64 [B]), for tests and callers that keep their tokens in tensors.
  at::Tensor draft_history(const at::Tensor& ids, const at::Tensor& k_cache,
                           const at::Tensor& v_cache, const at::Tensor& lens, int64_t n,
                           const at::Tensor& history, const at::Tensor& history_lens, int64_t ngram,
                           int64_t extend);
  // draft() with a prompt lookup of ngram tokens (lookup.h) over contexts (one per sequence,
  // ending at the token before the first drafted one): where it finds a match, its token is
  // drafted (and fed on) instead of the model's argmax. Each drafted token is appended to its
  // sequence's context. After n tokens, up to extend more while every sequence's next token is
  // found by the lookup: [B, n..n + extend] tokens. With origins, it is set to [B, drafted]
  // (row-major) flags: 1 where the model drafted the token, 0 where the lookup did; and
  // model_steps to the steps that ran the model's head (the drafting's cost). With a sampler,
  // the model's tokens are drawn from its distributions instead of taken by argmax, and q is
  // set to each drafted token's proposal distribution, [B, n (+ extend with the lookup), V]
  // row-major (rows past the tokens drafted unset): the model's distribution, or all the mass
  // on the lookup's token.
  at::Tensor draft_lookup(const at::Tensor& ids, const at::Tensor& k_cache,
                          const at::Tensor& v_cache, const at::Tensor& lens, int64_t n,
                          Contexts* contexts, int64_t ngram, int64_t extend = 0,
                          std::vector<uint8_t>* origins = nullptr, int64_t* model_steps = nullptr,
                          Sampler* sampler = nullptr, std::vector<float>* q = nullptr);
  // One greedy speculative round with this model as the target, in one call: `draft` drafts
  // gamma tokens after feed [B, w] on its cache (d_lens advance by w + gamma - 1), this model
  // scores [last, drafts] at t_lens, and each sequence with active[b] keeps its accepted drafts
  // and the token after them: t_lens += a + 1, d_lens -= gamma - a, prev and last ([B] int64)
  // move on; an inactive one keeps its state. With ngram > 0 the drafts use a prompt lookup
  // over history [B, C] (int64: each sequence's committed tokens, last included, in its first
  // history_lens[b] entries), each active sequence's kept tokens are appended to it, and the
  // drafts may run up to extend past gamma while the lookup finds every sequence's next token
  // (a loop in the output verifies in one long window); with ngram == 0 history may be empty
  // and extend is ignored.
  // Returns the rows [B, gamma + extend + 2] (int64: the accepted count a, the a drafts and the
  // token after them, then -1), the sides' seconds and the draft model's own counts [5] (fp64:
  // draft seconds, target seconds, the draft's steps that ran the model, and over the active
  // sequences the model's drafts the target tested, to the first rejected, and accepted; the
  // lookup's tokens cost nearly nothing and are accepted far more often, so a γ policy fed
  // them would read drafting as cheap and acceptance as high) and the number of tokens drafted,
  // g (the window was g + 1; lens moved as for gamma = g).
  std::tuple<at::Tensor, at::Tensor, int64_t> speculative_round(
      const c10::intrusive_ptr<ModelStep>& draft, const at::Tensor& feed, const at::Tensor& prev,
      const at::Tensor& last, int64_t gamma, const at::Tensor& t_k, const at::Tensor& t_v,
      const at::Tensor& t_lens, const at::Tensor& d_k, const at::Tensor& d_v,
      const at::Tensor& d_lens, const at::Tensor& active, const at::Tensor& history,
      const at::Tensor& history_lens, int64_t ngram, int64_t extend);
  // Up to `rounds` speculative_round()s in one call, the first fed `feed`, each later one
  // [prev, last] (as the caller's next round would be): the ~0.1 ms of host work a round costs
  // from Python is paid once. It stops after a round in which an active sequence commits one of
  // eos (int64 [E]) or its budget[b] tokens (int64 [B]: what it may still commit), so the
  // caller finishes sequences between calls. Returns each round's rows [R, B, W] and seconds
  // [R, 5] as speculative_round() gives them (W = gamma + extend + 2 with ngram > 0, else
  // gamma + 2), and the tokens each drafted [R] (int64). An error in a later round leaves the
  // earlier rounds' moves made and their rows lost: the decode cannot go on from there.
  std::tuple<at::Tensor, at::Tensor, at::Tensor> speculative_rounds(
      const c10::intrusive_ptr<ModelStep>& draft, const at::Tensor& feed, const at::Tensor& prev,
      const at::Tensor& last, int64_t gamma, const at::Tensor& t_k, const at::Tensor& t_v,
      const at::Tensor& t_lens, const at::Tensor& d_k, const at::Tensor& d_v,
      const at::Tensor& d_lens, const at::Tensor& active, const at::Tensor& history,
      const at::Tensor& history_lens, int64_t ngram, int64_t extend, int64_t rounds,
      const at::Tensor& eos, const at::Tensor& budget);
  // speculative_rounds sampled: the draft's tokens drawn from its distributions (the lookup's
  // proposed with all their mass), the window verified by rejection sampling against the
  // target's distributions (spec_verify's rule, its uniforms from sampler), so the kept tokens
  // follow the target's distribution exactly. Rows, seconds and counts as speculative_rounds.
  std::tuple<at::Tensor, at::Tensor, at::Tensor> sampled_rounds(
      const c10::intrusive_ptr<ModelStep>& draft, const at::Tensor& feed, const at::Tensor& prev,
      const at::Tensor& last, int64_t gamma, const at::Tensor& t_k, const at::Tensor& t_v,
      const at::Tensor& t_lens, const at::Tensor& d_k, const at::Tensor& d_v,
      const at::Tensor& d_lens, const at::Tensor& active, const at::Tensor& history,
      const at::Tensor& history_lens, int64_t ngram, int64_t extend, int64_t rounds,
      const at::Tensor& eos, const at::Tensor& budget, const c10::intrusive_ptr<Sampler>& sampler);

 private:
  // greedy_steps / sample_steps (sampler null: greedy).
  at::Tensor decode_steps(const at::Tensor& ids, const at::Tensor& k_cache,
                          const at::Tensor& v_cache, const at::Tensor& lens, int64_t n,
                          const at::Tensor& eos, const at::Tensor& done, Sampler* sampler);
  // speculative_round(s) greedy (sampler null) or sampled.
  std::tuple<at::Tensor, at::Tensor, int64_t> round_impl(
      const c10::intrusive_ptr<ModelStep>& draft, const at::Tensor& feed, const at::Tensor& prev,
      const at::Tensor& last, int64_t gamma, const at::Tensor& t_k, const at::Tensor& t_v,
      const at::Tensor& t_lens, const at::Tensor& d_k, const at::Tensor& d_v,
      const at::Tensor& d_lens, const at::Tensor& active, const at::Tensor& history,
      const at::Tensor& history_lens, int64_t ngram, int64_t extend, Sampler* sampler);
  std::tuple<at::Tensor, at::Tensor, at::Tensor> rounds_impl(
      const c10::intrusive_ptr<ModelStep>& draft, const at::Tensor& feed, const at::Tensor& prev,
      const at::Tensor& last, int64_t gamma, const at::Tensor& t_k, const at::Tensor& t_v,
      const at::Tensor& t_lens, const at::Tensor& d_k, const at::Tensor& d_v,
      const at::Tensor& d_lens, const at::Tensor& active, const at::Tensor& history,
      const at::Tensor& history_lens, int64_t ngram, int64_t extend, int64_t rounds,
      const at::Tensor& eos, const at::Tensor& budget, Sampler* sampler);
  const int32_t* vocab_ids() const {
    return global_[kVocabIds].numel() > 0 ? global_[kVocabIds].const_data_ptr<int32_t>() : nullptr;
  }

  struct Layer {
    std::array<at::Tensor, kLayerSlots> w;
    std::array<std::string, kLayerSlots> format;  // "" dense, else the weight's block format
    bool owns_kv = false, moe = false, stacked_qkv = false;
  };

  // out = x · w^T for a dense weight (the skinny GEMM) or a GGUF-block one (qlinear).
  static void project(const at::Tensor& x, const at::Tensor& w, const std::string& format,
                      at::Tensor& out);

  // A step's buffers for one (batch, steps) shape and the views of them it reads, made once and
  // reused: allocating ~12 tensors and ~8 views per layer per call cost the embedded draft's
  // one-token step ~30 of its ~120 us. Decode and verification shapes (up to kKeptSteps tokens)
  // are kept; a prefill's, whose lengths vary, only until the next prefill.
  struct Scratch {
    at::Tensor x, h, proj, q, q3, q_rot, k, k3, v, v_rows, k_hat, o, o_rows, out;
    at::Tensor gate_up, gate, up, act;  // the dense SwiGLU's, at width dense_inter_
  };
  Scratch& scratch_for(int64_t batch, int64_t steps);

  // head_rows into a fresh tensor after checking the call, without the GIL, holding the lock.
  at::Tensor checked_head_rows(const at::Tensor& ids, const at::Tensor& k_cache,
                               const at::Tensor& v_cache, const at::Tensor& lens);
  // The head's rows [B*S, V or V'] in the model dtype for ids [B, S] at lens: a new tensor when
  // fresh_out, else this step's scratch (valid until its next call). kv_only: only the cache
  // writes (the layers up to the last one that owns K/V, that one up to its write), no rows.
  // last_only: the rows [B, V or V'] of each sequence's last token alone (a new tensor).
  at::Tensor head_rows(const at::Tensor& ids, const at::Tensor& k_cache, const at::Tensor& v_cache,
                       const int32_t* lens, bool fresh_out, bool kv_only = false,
                       bool last_only = false);
  void check_call(const at::Tensor& ids, const at::Tensor& k_cache, const at::Tensor& v_cache,
                  const at::Tensor& lens) const;
  at::Tensor argmax_rows(const at::Tensor& rows, int64_t batch, int64_t steps) const;

  std::array<at::Tensor, kGlobalSlots> global_;
  std::string head_format_;
  std::vector<Layer> layers_;
  int64_t hidden_, q_heads_, kv_heads_, head_dim_, cla_, top_k_, vocab_;
  bool qk_norm_, renormalize_;
  double eps_, rope_base_;
  std::array<float, 64> inv_freq_{};
  int64_t dense_inter_ = 0;    // the dense layers' intermediate width (0: none, -1: they differ)
  int64_t last_kv_layer_ = 0;  // the last layer that writes K/V (later ones share its cache)
  static constexpr int64_t kKeptSteps = 16;
  std::vector<std::pair<std::pair<int64_t, int64_t>, Scratch>> scratch_;  // by (batch, steps)
  std::pair<std::pair<int64_t, int64_t>, Scratch> prefill_scratch_{{0, 0}, {}};
  std::mutex mutex_;  // one step at a time per model (scratch is not shared, the caches may be)
  // A sampled round's distributions, kept between rounds (a SmolLM2 window's are megabytes):
  // the target's [B, g + 1, V] and the draft's [B, g, V]; one sampled call at a time.
  std::vector<float> sample_p_, sample_q_;
  std::mutex sample_mutex_;
};

}  // namespace pearlmoe::cpu
