// PEARL's greedy rounds on the CPU in one C++ call each (pearlmoe.decode.pearl with the fused
// backend): the state of pearl_rounds.HostRounds (each sequence's last committed token, its
// committed length, its mode and unverified drafts) kept here, the draft side a DraftWorker
// thread, the target's step on the calling thread. A round is: hand the draft its first token,
// score the target's window, collect the drafts, verify and commit, write both lengths.
#pragma once

#include <ATen/ATen.h>
#include <torch/custom_class.h>

#include <tuple>
#include <vector>

#include "draft_worker.h"
#include "model_step.h"

namespace pearlmoe::cpu {

class PearlRounds : public torch::CustomClassHolder {
 public:
  // last: each sequence's last committed token (fed to neither side yet); committed: its
  // committed length (prompt included). The caches hold committed - 1 tokens on each side.
  // With ngram > 0 the draft uses a prompt lookup (lookup.h) over each sequence's tokens, which
  // start as history (int64 [B, C]: the prompts, the first history_lens[b] entries of a row).
  // With lend, the draft's thread runs the target's work once it has drafted (a PoolGuest of
  // the calling thread's pool): the target's step then runs with the calling thread's torch
  // thread count, which should count the draft's thread.
  PearlRounds(c10::intrusive_ptr<ModelStep> target, c10::intrusive_ptr<DraftWorker> draft,
              at::Tensor t_k, at::Tensor t_v, at::Tensor t_lens, at::Tensor d_k, at::Tensor d_v,
              at::Tensor d_lens, std::vector<int64_t> last, std::vector<int64_t> committed,
              at::Tensor history, at::Tensor history_lens, int64_t ngram, bool lend);
  ~PearlRounds() override;
  PearlRounds(const PearlRounds&) = delete;
  PearlRounds& operator=(const PearlRounds&) = delete;

  // One round at draft length gamma; with the lookup, the draft runs on up to extend more
  // tokens while it finds every sequence's next one. A post-verify sequence's window is its
  // unverified drafts, however many the round before drafted. Returns rows [B, 3 + max(gamma +
  // extend, width)] (int64: was post-verify, accepted, kept, then the kept tokens, then -1), the
  // sides' seconds [2] (fp64: draft, target), the target's window width (a post-verify
  // sequence verified width tokens, a pre-verify one 1) and the number of tokens drafted.
  std::tuple<at::Tensor, at::Tensor, int64_t, int64_t> round(int64_t gamma, int64_t extend);
  // Sequence b stops: it keeps its committed tokens, both caches roll back to them.
  void finish(int64_t b);
  // The decode is over: the target thread's pool stops keeping a part of its jobs for the
  // draft's thread (also done when the rounds are destroyed; Python may hold them longer).
  void close();

 private:
  void write_lens();

  c10::intrusive_ptr<ModelStep> target_;
  c10::intrusive_ptr<DraftWorker> draft_;
  at::Tensor t_k_, t_v_, t_lens_, d_k_, d_v_, d_lens_;
  std::vector<int64_t> last_, committed_, t_len_, d_len_;
  std::vector<std::vector<int64_t>> unverified_;  // e_2..e_gamma of a post-verify sequence
  Contexts tokens_;  // each sequence's committed tokens, kept for the lookup when ngram_ > 0
  int64_t ngram_ = 0;
  std::vector<bool> post_, active_;
  std::shared_ptr<PoolGuest> guest_;  // the draft thread's place in this thread's pool (lend)
};

}  // namespace pearlmoe::cpu
