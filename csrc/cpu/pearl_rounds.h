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
  // thread count, which should count the draft's thread. With lookahead (and the lookup), a
  // round's target window also scores the first tokens this round's draft will draft where the
  // lookup already knows them: a pre-verify round then verifies a run of them at once instead
  // of only its first token (and a post-verify one verifies past f_1). In a batch the lookahead
  // only fills the padding of the round's longest window.
  PearlRounds(c10::intrusive_ptr<ModelStep> target, c10::intrusive_ptr<DraftWorker> draft,
              at::Tensor t_k, at::Tensor t_v, at::Tensor t_lens, at::Tensor d_k, at::Tensor d_v,
              at::Tensor d_lens, std::vector<int64_t> last, std::vector<int64_t> committed,
              at::Tensor history, at::Tensor history_lens, int64_t ngram, bool lend,
              bool lookahead);
  ~PearlRounds() override;
  PearlRounds(const PearlRounds&) = delete;
  PearlRounds& operator=(const PearlRounds&) = delete;

  // One round at draft length gamma; with the lookup, the draft runs on up to extend more
  // tokens while it finds every sequence's next one. A post-verify sequence's window is its
  // unverified drafts, however many the round before drafted, then this round's first draft (a
  // pre-verify one's: that first draft alone); the lookahead adds the drafts it scored. Returns
  // rows [B, 4 + max(gamma + extend, width)] (int64: was post-verify, tokens verified, accepted,
  // kept, then the kept tokens, then -1), the sides' seconds and counts [6] (fp64: draft
  // seconds, target seconds, the draft job's hand-off latency, then the model's drafts apart
  // from the lookup's, whose tokens cost nearly nothing to draft and are accepted far more
  // often: the draft's steps that ran the model, and over the active sequences the model's
  // tokens the target tested (those up to the first rejected) and accepted; a γ policy fed the
  // lookup's tokens too would count drafting as cheap and acceptance as high), the
  // target's window width (the longest [last, known tokens]; shorter rows right-padded) and the
  // number of tokens drafted.
  std::tuple<at::Tensor, at::Tensor, int64_t, int64_t> round(int64_t gamma, int64_t extend);
  // Up to n round()s in one call (the ~0.1 ms of host work a round costs from Python paid
  // once), stopping after a round in which an active sequence keeps one of eos (int64 [E]) or
  // its budget[b] tokens (int64 [B]: what it may still keep), so the caller finishes sequences
  // between calls. Returns each round's rows [R, B, W] (round()'s, right-padded with -1 to the
  // widest), its seconds and counts [R, 7] (round()'s six, then the round's wall seconds) and
  // its target window width and tokens drafted [R, 2] (int64). An error in a later round leaves
  // the earlier rounds' moves made and their rows lost: the decode cannot go on from there.
  std::tuple<at::Tensor, at::Tensor, at::Tensor> rounds(int64_t n, int64_t gamma, int64_t extend,
                                                        const at::Tensor& eos,
                                                        const at::Tensor& budget);
  // Plain steps (the speculation gate's other arm, cost_model.SpeculationGate): `steps`
  // greedy steps of the target alone on every active sequence, after its unverified drafts are
  // dropped (it goes back to pre-verify). The draft falls behind by the tokens committed; the
  // next round first caches them on the draft (a fill), then drafts as usual. Returns rows
  // [B, 4 + steps] in round()'s layout (0, 0, 0, kept, the kept tokens, then -1).
  at::Tensor plain(int64_t steps);
  // Sampled rounds from here on: the draft draws its tokens with draft_sampler (on its thread)
  // and the window is verified by rejection sampling against the target's distributions with
  // target_sampler (spec_verify's rule; a fully accepted window has no bonus token), so the
  // kept tokens follow the target's distribution. The unverified drafts keep their proposal
  // distributions until a later round verifies them. Plain steps stay greedy.
  void sample_with(c10::intrusive_ptr<Sampler> target_sampler,
                   c10::intrusive_ptr<Sampler> draft_sampler);
  // The lookahead's tokens scored so far (all rounds, all sequences).
  int64_t ahead_tokens() const { return ahead_tokens_; }
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
  std::vector<std::vector<int64_t>> unverified_;       // e_2..e_gamma of a post-verify sequence
  std::vector<std::vector<uint8_t>> unverified_made_;  // theirs: 1 where the model drafted it
  std::vector<std::vector<float>> unverified_q_;       // sampled: theirs proposal rows [n, V]
  c10::intrusive_ptr<Sampler> t_sampler_, d_sampler_;  // sampled rounds (else null)
  std::vector<float> p_;                               // the target's window distributions
  Contexts tokens_;  // each sequence's committed tokens, kept for the lookup when ngram_ > 0
  int64_t ngram_ = 0;
  bool lookahead_ = false;
  bool lend_ = false;         // the draft's thread is lent to the target's pool in rounds
  bool after_plain_ = false;  // plain steps ran since the last round
  int64_t ahead_tokens_ = 0;
  std::vector<bool> post_, active_;
  // Committed tokens the draft has not cached (after plain steps), but the last one: the next
  // round fills them on the draft first. Every active sequence holds as many.
  std::vector<std::vector<int64_t>> behind_;
  void catch_up();
  std::shared_ptr<PoolGuest> guest_;  // the draft thread's place in this thread's pool (lend)
};

}  // namespace pearlmoe::cpu
