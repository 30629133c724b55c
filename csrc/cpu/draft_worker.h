// PEARL's draft side on the CPU as a C++ thread (pearlmoe.decode.pearl with the fused backend):
// the target's thread hands it a feed and a draft length, runs its own step, and collects the
// drafted tokens. Hand-offs are an atomic flag each way, spun on briefly before sleeping, and
// neither side holds the GIL while it waits or works: a Python worker thread cost ~60 us of
// futures, wake-ups and GIL hand-overs a round, a tenth of a round on the embedded pair.
#pragma once

#include <ATen/ATen.h>
#include <torch/custom_class.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>

#include "model_step.h"
#include "thread_pool.h"

namespace pearlmoe::cpu {

class DraftWorker : public torch::CustomClassHolder {
 public:
  // The worker runs step's draft() with `threads` intra-op threads of its own.
  DraftWorker(c10::intrusive_ptr<ModelStep> step, int64_t threads);
  ~DraftWorker() override;
  DraftWorker(const DraftWorker&) = delete;
  DraftWorker& operator=(const DraftWorker&) = delete;

  // Start drafting n tokens after ids [B, S] on the cache k/v at lens (ModelStep::draft's
  // arguments; the worker moves lens). One job at a time: submit, then result.
  void submit(const at::Tensor& ids, const at::Tensor& k_cache, const at::Tensor& v_cache,
              const at::Tensor& lens, int64_t n);
  // The same job drafting with a prompt lookup over contexts (ModelStep::draft_lookup). With a
  // guest, the worker runs the guest's pool's work once it has drafted, until its next job.
  // With a sampler (used on the worker's thread only, until result()), the model's tokens are
  // drawn from its distributions and q() holds every drafted token's proposal distribution.
  void submit_lookup(const at::Tensor& ids, const at::Tensor& k_cache, const at::Tensor& v_cache,
                     const at::Tensor& lens, int64_t n, Contexts contexts, int64_t ngram,
                     int64_t extend = 0, std::shared_ptr<PoolGuest> guest = nullptr,
                     Sampler* sampler = nullptr);
  // The job's tokens [B, n]; rethrows its error.
  at::Tensor result();
  // Seconds the last job took on the worker, and from its submit to its start (the hand-off).
  double seconds() const { return seconds_; }
  double latency() const { return latency_; }
  // The torch thread count the last job ran with on the worker's thread (the constructor's
  // `threads`, whatever the caller's count is).
  int64_t job_threads() const { return job_threads_; }
  // The last job's [B, drafted] flags, 1 where the model drafted a token (not the lookup), and
  // its steps that ran the model (ModelStep::draft_lookup); read after result().
  const std::vector<uint8_t>& origins() const { return origins_; }
  int64_t model_steps() const { return model_steps_; }
  // A sampled job's proposal distributions, [B, q_stride(), V] row-major (ModelStep::
  // draft_lookup's q: its first drafted rows per sequence are set); read after result().
  const std::vector<float>& q() const { return q_; }
  int64_t q_stride() const { return ngram_ > 0 ? n_ + extend_ : n_; }
  // The draft's step, for work between jobs on the caller's thread (a catch-up fill).
  const c10::intrusive_ptr<ModelStep>& step() const { return step_; }
  // Until the next job the worker sleeps instead of spinning for kSpin (its core is wanted by
  // the target's pool: PEARL's plain steps).
  void rest() { resting_.store(true, std::memory_order_relaxed); }

 private:
  void loop();
  // Waits until state_ is `expected` or stop: spinning for kSpin (running the guest's work
  // meanwhile, if given; each chunk it runs starts the spin anew), then sleeping on wake_.
  // Returns the state seen.
  int wait_for(int expected, PoolGuest* guest = nullptr);

  c10::intrusive_ptr<ModelStep> step_;
  int64_t threads_;
  std::atomic<int> state_{0};  // 0 idle, 1 job posted, 2 job done, 3 stop
  std::atomic<bool> resting_{false};
  std::mutex mutex_;
  std::condition_variable wake_;
  at::Tensor ids_, k_, v_, lens_, tokens_;
  int64_t n_ = 0, ngram_ = 0, extend_ = 0;
  Contexts contexts_;
  std::shared_ptr<PoolGuest> guest_;  // the posted job's; the worker keeps its own copy
  Sampler* sampler_ = nullptr;        // the posted job's (sampled drafts), else null
  std::vector<float> q_;
  double seconds_ = 0, latency_ = 0;
  std::vector<uint8_t> origins_;
  int64_t model_steps_ = 0, job_threads_ = 0;
  std::chrono::steady_clock::time_point posted_;
  std::exception_ptr error_;
  std::thread thread_;
};

}  // namespace pearlmoe::cpu
