// The C++ draft thread of PEARL on the CPU (draft_worker.h).
#include "draft_worker.h"

#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>

#include <chrono>
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include "../ops/checks.h"
#include "gil.h"

namespace pearlmoe::cpu {
namespace {

constexpr const char* kWorker = "DraftWorker";
// Spin this long on a hand-off before sleeping on the condition variable: a round hands over
// twice within a millisecond, and a futex wake-up costs tens of microseconds.
constexpr auto kSpin = std::chrono::microseconds(2000);

}  // namespace

DraftWorker::DraftWorker(c10::intrusive_ptr<ModelStep> step, int64_t threads)
    : step_(std::move(step)), threads_(threads) {
  PM_CHECK(threads_ >= 1, kWorker, "threads must be positive, got ", threads_);
  thread_ = std::thread([this] { loop(); });
}

DraftWorker::~DraftWorker() {
  {
    const std::lock_guard<std::mutex> lock(mutex_);
    state_.store(3);
  }
  wake_.notify_all();
  if (thread_.joinable()) thread_.join();
}

int DraftWorker::wait_for(int expected, PoolGuest* guest) {
  const auto seen = [&] {
    const int s = state_.load(std::memory_order_acquire);
    return s == expected || s == 3;
  };
  auto until = std::chrono::steady_clock::now() + kSpin;
  while (!seen()) {
    if (guest != nullptr && guest->help()) {
      until = std::chrono::steady_clock::now() + kSpin;
      continue;
    }
#if defined(__x86_64__) || defined(_M_X64)
    _mm_pause();  // a spinning core's hint: yields to the sibling hyperthread, saves power
#endif
    if (resting_.load(std::memory_order_relaxed) || std::chrono::steady_clock::now() > until) {
      std::unique_lock<std::mutex> lock(mutex_);
      wake_.wait(lock, seen);
      break;
    }
  }
  return state_.load(std::memory_order_acquire);
}

void DraftWorker::loop() {
  // ATen's per-thread set-up first: on this thread's first get_num_threads it sets the thread's
  // count to the process's, which the caller sets after starting this thread (PEARL's sides'
  // share plus one). Left to it, this thread's kernels ran as 2-part pool jobs that woke a
  // helper of its own, a third busy thread on two cores: PEARL's target side 2x slower in back-
  // to-back rounds.
  (void)at::get_num_threads();
  at::set_num_threads(static_cast<int>(threads_));
  const c10::InferenceMode inference;  // the caches are inference tensors
  std::shared_ptr<PoolGuest> guest;    // the last job's: whose work to run until the next job
  while (true) {
    if (wait_for(1, guest.get()) == 3) return;
    guest = guest_;  // posted with the job (state_ 1 acquired); submit may replace guest_ later
    const auto start = std::chrono::steady_clock::now();
    latency_ = std::chrono::duration<double>(start - posted_).count();
    job_threads_ = at::get_num_threads();
    try {
      tokens_ = step_->draft_lookup(ids_, k_, v_, lens_, n_, &contexts_, ngram_, extend_, &origins_,
                                    &model_steps_, sampler_, &q_);
    } catch (...) {
      error_ = std::current_exception();
    }
    seconds_ = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      int posted = 1;  // a stop requested meanwhile (the owner went away mid-job) stays
      state_.compare_exchange_strong(posted, 2, std::memory_order_acq_rel);
    }
    wake_.notify_all();
  }
}

void DraftWorker::submit(const at::Tensor& ids, const at::Tensor& k_cache,
                         const at::Tensor& v_cache, const at::Tensor& lens, int64_t n) {
  submit_lookup(ids, k_cache, v_cache, lens, n, {}, 0);
}

void DraftWorker::submit_lookup(const at::Tensor& ids, const at::Tensor& k_cache,
                                const at::Tensor& v_cache, const at::Tensor& lens, int64_t n,
                                Contexts contexts, int64_t ngram, int64_t extend,
                                std::shared_ptr<PoolGuest> guest, Sampler* sampler) {
  PM_CHECK(state_.load() == 0, kWorker, "submit while a job is pending (call result first)");
  ids_ = ids, k_ = k_cache, v_ = v_cache, lens_ = lens, n_ = n, sampler_ = sampler;
  contexts_ = std::move(contexts), ngram_ = ngram, extend_ = extend;
  guest_ = std::move(guest);
  tokens_ = at::Tensor(), error_ = nullptr;
  posted_ = std::chrono::steady_clock::now();
  {
    const std::lock_guard<std::mutex> lock(mutex_);
    resting_.store(false, std::memory_order_relaxed);
    state_.store(1, std::memory_order_release);
  }
  wake_.notify_all();
}

at::Tensor DraftWorker::result() {
  const int s = state_.load();
  PM_CHECK(s == 1 || s == 2, kWorker, "result without a submitted job");
  {
    const GilRelease no_gil;
    wait_for(2);
  }
  ids_ = k_ = v_ = lens_ = at::Tensor();
  state_.store(0);
  if (error_) std::rethrow_exception(std::exchange(error_, nullptr));
  return std::exchange(tokens_, at::Tensor());
}

}  // namespace pearlmoe::cpu
