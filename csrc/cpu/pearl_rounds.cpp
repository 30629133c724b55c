// PEARL's greedy rounds in C++ (pearl_rounds.h); the same rules as pearl_rounds.HostRounds.
#include "pearl_rounds.h"

#include <algorithm>
#include <chrono>

#include "../kernels/spec_decode/spec_verify_cpu.h"
#include "../ops/checks.h"
#include "gil.h"
#include "lookup.h"
#include "stop_rule.h"
#include "thread_pool.h"

namespace pearlmoe::cpu {
namespace {

constexpr const char* kRounds = "PearlRounds";

}  // namespace

PearlRounds::PearlRounds(c10::intrusive_ptr<ModelStep> target,
                         c10::intrusive_ptr<DraftWorker> draft, at::Tensor t_k, at::Tensor t_v,
                         at::Tensor t_lens, at::Tensor d_k, at::Tensor d_v, at::Tensor d_lens,
                         std::vector<int64_t> last, std::vector<int64_t> committed,
                         at::Tensor history, at::Tensor history_lens, int64_t ngram, bool lend,
                         bool lookahead)
    : target_(std::move(target)),
      draft_(std::move(draft)),
      t_k_(std::move(t_k)),
      t_v_(std::move(t_v)),
      t_lens_(std::move(t_lens)),
      d_k_(std::move(d_k)),
      d_v_(std::move(d_v)),
      d_lens_(std::move(d_lens)),
      last_(std::move(last)),
      committed_(std::move(committed)),
      ngram_(ngram),
      lookahead_(lookahead) {
  const size_t batch = last_.size();
  PM_CHECK(batch >= 1 && committed_.size() == batch, kRounds,
           "last and committed must give every sequence, got ", last_.size(), " and ",
           committed_.size());
  for (const at::Tensor* t : {&t_lens_, &d_lens_}) {
    PM_CHECK(t->dim() == 1 && t->size(0) == static_cast<int64_t>(batch) &&
                 t->scalar_type() == at::kInt && t->is_contiguous() && t->is_cpu(),
             kRounds, "both lengths must be contiguous int32 CPU [B=", batch, "]");
  }
  const int32_t* tl = t_lens_.const_data_ptr<int32_t>();
  const int32_t* dl = d_lens_.const_data_ptr<int32_t>();
  t_len_.assign(tl, tl + batch);
  d_len_.assign(dl, dl + batch);
  PM_CHECK(ngram_ >= 0, kRounds, "ngram must be >= 0, got ", ngram_);
  if (ngram_ > 0) {
    tokens_ = contexts_from(kRounds, history, history_lens, static_cast<int64_t>(batch), 0);
  }
  unverified_.resize(batch);
  unverified_made_.resize(batch);
  unverified_q_.resize(batch);
  behind_.resize(batch);
  post_.assign(batch, false);
  active_.assign(batch, true);
  // The rounds split the cores between the sides. The caller's OpenMP helpers, left by a
  // prefill on all of them, spin at their barrier for milliseconds on the draft's (measured:
  // the draft starting 2-7 ms late in ~1 of 10 rounds of a call; PEARL's rounds 1.31-1.34x
  // their slower side, 1.12-1.15x without). End them, and send this thread's pool's helpers
  // to sleep until its next job.
  rest_openmp();
  pool_rest();
  lend_ = lend;
  if (lend) guest_ = std::make_shared<PoolGuest>();
}

PearlRounds::~PearlRounds() { close(); }

void PearlRounds::close() {
  lend_ = false;
  if (guest_) guest_->leave();
}

void PearlRounds::sample_with(c10::intrusive_ptr<Sampler> target_sampler,
                              c10::intrusive_ptr<Sampler> draft_sampler) {
  PM_CHECK(target_sampler && draft_sampler, kRounds, "sample_with needs both samplers");
  PM_CHECK(target_sampler.get() != draft_sampler.get(), kRounds,
           "sample_with needs a sampler per side (the draft's runs on its own thread)");
  PM_CHECK(draft_->step()->vocab() == target_->vocab(), kRounds, "the draft's vocabulary (",
           draft_->step()->vocab(), ") is not the target's (", target_->vocab(), ")");
  for (size_t b = 0; b < last_.size(); ++b) {
    PM_CHECK(!post_[b], kRounds, "sample_with before the first round only");
  }
  t_sampler_ = std::move(target_sampler);
  d_sampler_ = std::move(draft_sampler);
}

void PearlRounds::write_lens() {
  int32_t* tl = t_lens_.mutable_data_ptr<int32_t>();
  int32_t* dl = d_lens_.mutable_data_ptr<int32_t>();
  for (size_t b = 0; b < last_.size(); ++b) {
    tl[b] = static_cast<int32_t>(t_len_[b]);
    dl[b] = static_cast<int32_t>(d_len_[b]);
  }
}

std::tuple<at::Tensor, at::Tensor, int64_t, int64_t> PearlRounds::round(int64_t gamma,
                                                                        int64_t extend) {
  PM_CHECK(gamma >= 1 && extend >= 0, kRounds, "gamma must be positive and extend >= 0, got ",
           gamma, " and ", extend);
  const int64_t batch = static_cast<int64_t>(last_.size());
  if (after_plain_) {  // back from plain steps: the sides split the cores again
    after_plain_ = false;
    catch_up();  // on the pool's own helper still: a guest now would be the sleeping worker
    // The pool's helper that ran them would spin for 5 ms on the draft thread's core
    // (measured: PEARL's first rounds after plain steps read slow enough that the gate kept
    // choosing plain steps, 65-84% of the tokens at batch 1).
    pool_rest();
    if (lend_) guest_ = std::make_shared<PoolGuest>();
  }
  // The draft's context: the committed tokens, then any unverified ones (without the lookup,
  // ngram_ 0, none, and extend is unused).
  Contexts contexts;
  if (ngram_ > 0) {
    contexts = tokens_;
    for (int64_t b = 0; b < batch; ++b) {
      contexts[b].insert(contexts[b].end(), unverified_[b].begin(), unverified_[b].end());
    }
  }
  // Each sequence's known tokens, scored this round after last: its unverified drafts (post-
  // verify), then with the lookahead the first tokens its draft will draft this round where the
  // lookup already knows them (the draft takes the lookup's token wherever it finds one, so
  // those are its tokens): alone, up to a window of gamma + extend; in a batch, only into the
  // padding the longest window leaves the others (measured at batch 4: widening every row to
  // one sequence's run cost more than the runs gained, 0.96x).
  int64_t width = 1;  // the target's feed: [last, known...], right-padded
  for (int64_t b = 0; b < batch; ++b) {
    if (post_[b]) width = std::max(width, static_cast<int64_t>(unverified_[b].size()) + 1);
  }
  const int64_t room = batch == 1 ? gamma + extend : width;
  std::vector<std::vector<int64_t>> known(batch);
  std::vector<int64_t> ahead(batch, 0);  // each sequence's lookahead tokens this round
  for (int64_t b = 0; b < batch; ++b) {
    auto& kn = known[b];
    if (post_[b]) kn = unverified_[b];
    if (lookahead_ && ngram_ > 0 && active_[b]) {
      auto& ctx = contexts[b];
      const size_t base = ctx.size();
      while (static_cast<int64_t>(kn.size()) + 1 < room) {
        const int64_t next = lookup_next(ctx, ngram_);
        if (next < 0) break;
        ctx.push_back(next);
        kn.push_back(next);
      }
      ahead[b] = static_cast<int64_t>(ctx.size() - base);
      ahead_tokens_ += ahead[b];
      ctx.resize(base);  // the worker's lookup walks the same chain from here
    }
    width = std::max(width, static_cast<int64_t>(kn.size()) + 1);
  }
  const auto opts = at::TensorOptions().dtype(at::kLong);
  // The draft's first token: e_gamma after the unverified ones (post-verify), else last.
  at::Tensor first = at::empty({batch, 1}, opts), feed = at::zeros({batch, width}, opts);
  int64_t* fp = first.mutable_data_ptr<int64_t>();
  int64_t* wp = feed.mutable_data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b) {
    const auto& u = unverified_[b];
    fp[b] = post_[b] && !u.empty() ? u.back() : last_[b];
    wp[b * width] = last_[b];
    std::copy(known[b].begin(), known[b].end(), wp + b * width + 1);
  }
  at::Tensor rows = at::full({batch, 4 + std::max(gamma + extend, width)}, -1, opts);
  // The sides' seconds and the round's counts in one tensor: the caller reads them with the
  // rows, where each method call on these classes cost it 3-36 us a round, its caches cold
  // from the round's work.
  at::Tensor seconds = at::zeros({6}, opts.dtype(at::kDouble));
  at::Tensor drafted, scored;
  const bool sampled = static_cast<bool>(t_sampler_);
  {
    const GilRelease no_gil;
    draft_->submit_lookup(first, d_k_, d_v_, d_lens_, gamma, std::move(contexts), ngram_, extend,
                          guest_, d_sampler_.get());
    const auto start = std::chrono::steady_clock::now();
    try {
      if (sampled) {
        target_->window_probs(feed, t_k_, t_v_, t_lens_, *t_sampler_, p_);  // [B, width, V]
      } else {
        scored = target_->greedy(feed, t_k_, t_v_, t_lens_);  // [B, width]
      }
    } catch (...) {
      try {
        draft_->result();  // the worker's job ends before the target's error leaves
      } catch (...) {
      }
      throw;
    }
    seconds.mutable_data_ptr<double>()[1] =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    drafted = draft_->result();  // [B, g]: gamma, or more where the lookup ran on
    seconds.mutable_data_ptr<double>()[0] = draft_->seconds();
  }
  const int64_t g = drafted.size(1);
  const int64_t* dp = drafted.const_data_ptr<int64_t>();
  const std::vector<uint8_t>& made = draft_->origins();  // [B, g]
  PM_CHECK(static_cast<int64_t>(made.size()) == batch * g, kRounds, "the draft's origins are ",
           made.size(), " flags for ", batch, " x ", g, " tokens");
  int64_t model_tested = 0, model_accepted = 0;
  std::vector<uint8_t> window_made;
  const int64_t* sp = sampled ? nullptr : scored.const_data_ptr<int64_t>();
  const int64_t vocab = target_->vocab();
  const float* q = sampled ? draft_->q().data() : nullptr;  // [B, stride, V]
  const int64_t stride = draft_->q_stride();
  int64_t* rp = rows.mutable_data_ptr<int64_t>();
  std::vector<int64_t> window;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t* d = dp + b * g;
    const bool was_post = post_[b];
    // The window: the unverified drafts (post-verify), then this round's first drafts, as many
    // as the lookahead scored and one more (only the first without it), as far as they go.
    const int64_t held = was_post ? static_cast<int64_t>(unverified_[b].size()) : 0;
    const int64_t fresh = std::min(ahead[b] + 1, g);
    const int64_t n = held + fresh;
    // The target scored the lookahead's tokens as this round's first drafts: the draft's lookup
    // walks the same chain, so they are its tokens (else the window's rows would score another
    // prefix).
    for (int64_t i = 0; i < std::min(ahead[b], g); ++i) {
      PM_CHECK(d[i] == known[b][held + i], kRounds, "sequence ", b, ": the draft's token ", i, " (",
               d[i], ") is not the lookahead's (", known[b][held + i], ")");
    }
    window.clear();
    window_made.clear();
    if (was_post) window = unverified_[b], window_made = unverified_made_[b];
    window.insert(window.end(), d, d + fresh);
    window_made.insert(window_made.end(), made.begin() + b * g, made.begin() + b * g + fresh);
    // Window token i is scored by the target's row i (after last and the tokens before it);
    // the first rejected one is replaced by the correction.
    int64_t accepted = 0, correction = -1;
    const float* fresh_q = sampled ? q + b * stride * vocab : nullptr;  // this round's drafts'
    if (sampled) {
      for (; accepted < n; ++accepted) {
        const float* p = p_.data() + (b * width + accepted) * vocab;
        const float* qi = accepted < held ? unverified_q_[b].data() + accepted * vocab
                                          : fresh_q + (accepted - held) * vocab;
        const int64_t x = window[accepted];
        if (spec_decode::keeps_draft(p, qi, x, t_sampler_->uniform())) continue;
        correction = spec_decode::sample_residual(p, qi, vocab, t_sampler_->uniform());
        break;
      }
    } else {
      const int64_t* s = sp + b * width;
      while (accepted < n && window[accepted] == s[accepted]) ++accepted;
      if (accepted < n) correction = s[accepted];
    }
    const bool all_in = accepted == n;
    const int64_t kept = all_in ? n : accepted + 1;
    int64_t* row = rp + b * rows.size(1);
    row[0] = was_post, row[1] = n, row[2] = accepted, row[3] = kept;
    std::copy_n(window.begin(), all_in ? n : accepted, row + 4);
    if (!all_in) row[4 + accepted] = correction;
    if (!active_[b]) continue;
    count_model_drafts(window_made.data(), n, accepted, model_tested, model_accepted);
    if (ngram_ > 0) tokens_[b].insert(tokens_[b].end(), row + 4, row + 4 + kept);
    committed_[b] += kept;
    last_[b] = row[4 + kept - 1];
    if (all_in) {  // the target keeps what it fed, the draft all it drafted
      t_len_[b] += n;
      d_len_[b] += g;
      unverified_[b].assign(d + fresh, d + g);
      unverified_made_[b].assign(made.begin() + b * g + fresh, made.begin() + (b + 1) * g);
      if (sampled) unverified_q_[b].assign(fresh_q + fresh * vocab, fresh_q + g * vocab);
    } else {  // both roll back to the new committed[:-1]
      t_len_[b] = d_len_[b] = committed_[b] - 1;
      unverified_[b].clear();
      unverified_made_[b].clear();
      unverified_q_[b].clear();
    }
    post_[b] = all_in;
  }
  write_lens();
  double* info = seconds.mutable_data_ptr<double>();
  info[2] = draft_->latency();
  info[3] = static_cast<double>(draft_->model_steps());
  info[4] = static_cast<double>(model_tested);
  info[5] = static_cast<double>(model_accepted);
  return {rows, seconds, width, g};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> PearlRounds::rounds(int64_t n, int64_t gamma,
                                                                   int64_t extend,
                                                                   const at::Tensor& eos,
                                                                   const at::Tensor& budget) {
  const int64_t batch = static_cast<int64_t>(last_.size());
  PM_CHECK(n >= 1, kRounds, "rounds needs n >= 1, got ", n);
  StopRule stops(kRounds, eos, budget, batch);
  std::vector<at::Tensor> all_rows, all_seconds;
  std::vector<int64_t> sizes;  // each round's (width, drafted)
  int64_t widest = 0;
  const GilRelease no_gil;
  for (int64_t r = 0; r < n; ++r) {
    const auto start = std::chrono::steady_clock::now();
    auto [rows, seconds, width, drafted] = round(gamma, extend);
    const double wall =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    all_rows.push_back(rows);
    all_seconds.push_back(at::cat({seconds, at::full({1}, wall, seconds.options())}));
    sizes.push_back(width);
    sizes.push_back(drafted);
    widest = std::max(widest, rows.size(1));
    const int64_t* rp = rows.const_data_ptr<int64_t>();
    bool ended = false;
    // A row: was post, verified, accepted, kept, the tokens (active_ moves only in finish()).
    for (int64_t b = 0; b < batch; ++b) {
      const int64_t* row = rp + b * rows.size(1);
      if (active_[b]) ended = stops.kept(b, row + 4, row[3]) || ended;
    }
    if (ended) break;
  }
  const auto opts = at::TensorOptions().dtype(at::kLong);
  at::Tensor rows = at::full({static_cast<int64_t>(all_rows.size()), batch, widest}, -1, opts);
  for (size_t r = 0; r < all_rows.size(); ++r) {
    rows[static_cast<int64_t>(r)].narrow(1, 0, all_rows[r].size(1)).copy_(all_rows[r]);
  }
  at::Tensor counts = at::empty({static_cast<int64_t>(all_rows.size()), 2}, opts);
  std::copy(sizes.begin(), sizes.end(), counts.mutable_data_ptr<int64_t>());
  return {rows, at::stack(all_seconds), counts};
}

at::Tensor PearlRounds::plain(int64_t steps) {
  PM_CHECK(steps >= 1, kRounds, "plain needs steps >= 1, got ", steps);
  PM_CHECK(!t_sampler_, kRounds, "plain steps are greedy: sampled rounds have none");
  const int64_t batch = static_cast<int64_t>(last_.size());
  for (int64_t b = 0; b < batch; ++b) {  // back to pre-verify: the unverified drafts go
    if (!active_[b]) continue;
    post_[b] = false;
    unverified_[b].clear();
    unverified_made_[b].clear();
    unverified_q_[b].clear();
    // The draft keeps the committed tokens it cached (all of them but the last, or fewer
    // after earlier plain steps), the target all but the last.
    d_len_[b] = std::min(d_len_[b], committed_[b] - 1);
    t_len_[b] = committed_[b] - 1;
  }
  // The target's steps take the pool's own helper, as autoregressive decoding does: the idle
  // draft thread, as a guest, served them more slowly (measured at batch 4: 1.37-1.89 ms a step
  // against 0.94-1.03 in speculative decoding's plain steps). The next round comes back.
  if (guest_) {
    guest_->leave();
    guest_.reset();
  }
  draft_->rest();  // and its thread sleeps now, not after spinning 2 ms beside that helper
  after_plain_ = true;
  const auto opts = at::TensorOptions().dtype(at::kLong);
  at::Tensor rows = at::full({batch, 4 + steps}, -1, opts);
  at::Tensor feed = at::empty({batch, 1}, opts);
  rows.narrow(1, 0, 4).zero_();  // not post-verify, nothing verified or accepted, none kept yet
  int64_t* rp = rows.mutable_data_ptr<int64_t>();
  int64_t* fp = feed.mutable_data_ptr<int64_t>();
  const GilRelease no_gil;
  for (int64_t s = 0; s < steps; ++s) {
    write_lens();  // a finished sequence scores in place, unused, at its rolled-back length
    for (int64_t b = 0; b < batch; ++b) fp[b] = last_[b];
    const at::Tensor scored = target_->greedy(feed, t_k_, t_v_, t_lens_);  // [B, 1]
    const int64_t* sp = scored.const_data_ptr<int64_t>();
    for (int64_t b = 0; b < batch; ++b) {
      if (!active_[b]) continue;
      int64_t* row = rp + b * (4 + steps);
      row[4 + row[3]++] = sp[b];
      behind_[b].push_back(last_[b]);  // now cached on the target, not on the draft
      if (ngram_ > 0) tokens_[b].push_back(sp[b]);
      ++committed_[b];
      ++t_len_[b];
      last_[b] = sp[b];
    }
  }
  write_lens();
  return rows;
}

void PearlRounds::catch_up() {
  const int64_t batch = static_cast<int64_t>(last_.size());
  int64_t lag = -1;  // every active sequence's, which must agree
  for (int64_t b = 0; b < batch; ++b) {
    if (!active_[b]) continue;
    const int64_t behind = static_cast<int64_t>(behind_[b].size());
    PM_CHECK(lag < 0 || behind == lag, kRounds, "sequences behind on the draft by ", lag, " and ",
             behind, " tokens");
    PM_CHECK(behind == 0 || d_len_[b] + behind == committed_[b] - 1, kRounds, "the draft holds ",
             d_len_[b], " tokens and misses ", behind, " of ", committed_[b] - 1);
    lag = behind;
  }
  if (lag <= 0) return;
  at::Tensor ids = at::zeros({batch, lag}, at::TensorOptions().dtype(at::kLong));
  int64_t* ip = ids.mutable_data_ptr<int64_t>();
  int32_t* dl = d_lens_.mutable_data_ptr<int32_t>();
  for (int64_t b = 0; b < batch; ++b) {
    if (active_[b]) {
      std::copy(behind_[b].begin(), behind_[b].end(), ip + b * lag);
    } else {
      dl[b] = 0;  // a finished sequence's cache is never read again: fill from its start
    }
  }
  {
    const GilRelease no_gil;
    draft_->step()->fill(ids, d_k_, d_v_, d_lens_);  // moves every length by lag
  }
  for (int64_t b = 0; b < batch; ++b) {
    if (!active_[b]) continue;
    d_len_[b] += lag;
    behind_[b].clear();
  }
  write_lens();
}

void PearlRounds::finish(int64_t b) {
  PM_CHECK(b >= 0 && b < static_cast<int64_t>(last_.size()), kRounds, "sequence ", b,
           " out of range");
  active_[b] = false;
  post_[b] = false;
  unverified_[b].clear();
  unverified_made_[b].clear();
  unverified_q_[b].clear();
  behind_[b].clear();
  t_len_[b] = d_len_[b] = committed_[b] - 1;
  write_lens();
}

}  // namespace pearlmoe::cpu
