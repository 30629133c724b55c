// PEARL's greedy rounds in C++ (pearl_rounds.h); the same rules as pearl_rounds.HostRounds.
#include "pearl_rounds.h"

#include <algorithm>
#include <chrono>

#include "../ops/checks.h"
#include "gil.h"
#include "thread_pool.h"

namespace pearlmoe::cpu {
namespace {

constexpr const char* kRounds = "PearlRounds";

}  // namespace

PearlRounds::PearlRounds(c10::intrusive_ptr<ModelStep> target,
                         c10::intrusive_ptr<DraftWorker> draft, at::Tensor t_k, at::Tensor t_v,
                         at::Tensor t_lens, at::Tensor d_k, at::Tensor d_v, at::Tensor d_lens,
                         std::vector<int64_t> last, std::vector<int64_t> committed,
                         at::Tensor history, at::Tensor history_lens, int64_t ngram, bool lend)
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
      ngram_(ngram) {
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
  post_.assign(batch, false);
  active_.assign(batch, true);
  // The rounds split the cores between the sides. The caller's OpenMP helpers, left by a
  // prefill on all of them, spin at their barrier for milliseconds on the draft's (measured:
  // the draft starting 2-7 ms late in ~1 of 10 rounds of a call; PEARL's rounds 1.31-1.34x
  // their slower side, 1.12-1.15x without). End them, and send this thread's pool's helpers
  // to sleep until its next job.
  rest_openmp();
  pool_rest();
  if (lend) guest_ = std::make_shared<PoolGuest>();
}

PearlRounds::~PearlRounds() { close(); }

void PearlRounds::close() {
  if (guest_) guest_->leave();
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
  // A post-verify sequence's window is [last, its unverified drafts]: every such sequence got
  // them in the same round, so they are as many.
  int64_t width = 1;
  for (int64_t b = 0; b < batch; ++b) {
    if (!post_[b]) continue;
    const auto n = static_cast<int64_t>(unverified_[b].size()) + 1;
    PM_CHECK(width == 1 || width == n, kRounds, "sequence ", b, " holds ", n - 1,
             " unverified drafts where another holds ", width - 1);
    width = n;
  }
  const auto opts = at::TensorOptions().dtype(at::kLong);
  // The draft's first token: e_gamma after the unverified ones (post-verify), else last.
  at::Tensor first = at::empty({batch, 1}, opts), feed = at::zeros({batch, width}, opts);
  int64_t* fp = first.mutable_data_ptr<int64_t>();
  int64_t* wp = feed.mutable_data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b) {
    const auto& u = unverified_[b];
    fp[b] = post_[b] && !u.empty() ? u.back() : last_[b];
    wp[b * width] = last_[b];  // [last, e_2..e_gamma] (post-verify) or [last] (right-padded)
    for (int64_t i = 1; i < width && i - 1 < static_cast<int64_t>(u.size()); ++i) {
      wp[b * width + i] = u[i - 1];
    }
  }
  at::Tensor rows = at::full({batch, 3 + std::max(gamma + extend, width)}, -1, opts);
  at::Tensor seconds = at::empty({2}, opts.dtype(at::kDouble));
  at::Tensor drafted, scored;
  {
    const GilRelease no_gil;
    Contexts contexts;  // without the lookup (ngram_ 0) none, and extend is unused
    if (ngram_ > 0) {   // the draft's context: the committed tokens, then any unverified ones
      contexts = tokens_;
      for (int64_t b = 0; b < batch; ++b) {
        contexts[b].insert(contexts[b].end(), unverified_[b].begin(), unverified_[b].end());
      }
    }
    draft_->submit_lookup(first, d_k_, d_v_, d_lens_, gamma, std::move(contexts), ngram_, extend,
                          guest_);
    const auto start = std::chrono::steady_clock::now();
    try {
      scored = target_->greedy(feed, t_k_, t_v_, t_lens_);  // [B, width]
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
  const int64_t* sp = scored.const_data_ptr<int64_t>();
  int64_t* rp = rows.mutable_data_ptr<int64_t>();
  std::vector<int64_t> window;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t* d = dp + b * g;
    const int64_t* s = sp + b * width;
    const bool was_post = post_[b];
    const int64_t n = was_post ? width : 1;
    window.clear();
    if (was_post) window = unverified_[b];
    window.push_back(d[0]);  // e_1 (pre) or f_1 after e_2..e_gamma (post)
    int64_t accepted = 0;
    while (accepted < n && window[accepted] == s[accepted]) ++accepted;
    const bool all_in = accepted == n;
    const int64_t kept = all_in ? n : accepted + 1;
    int64_t* row = rp + b * rows.size(1);
    row[0] = was_post, row[1] = accepted, row[2] = kept;
    std::copy_n(window.begin(), all_in ? n : accepted, row + 3);
    if (!all_in) row[3 + accepted] = s[accepted];
    if (!active_[b]) continue;
    if (ngram_ > 0) tokens_[b].insert(tokens_[b].end(), row + 3, row + 3 + kept);
    committed_[b] += kept;
    last_[b] = row[3 + kept - 1];
    if (all_in) {  // the target keeps what it fed, the draft all it drafted
      t_len_[b] += n;
      d_len_[b] += g;
      unverified_[b].assign(d + 1, d + g);
    } else {  // both roll back to the new committed[:-1]
      t_len_[b] = d_len_[b] = committed_[b] - 1;
      unverified_[b].clear();
    }
    post_[b] = all_in;
  }
  write_lens();
  return {rows, seconds, width, g};
}

void PearlRounds::finish(int64_t b) {
  PM_CHECK(b >= 0 && b < static_cast<int64_t>(last_.size()), kRounds, "sequence ", b,
           " out of range");
  active_[b] = false;
  post_[b] = false;
  unverified_[b].clear();
  t_len_[b] = d_len_[b] = committed_[b] - 1;
  write_lens();
}

}  // namespace pearlmoe::cpu
