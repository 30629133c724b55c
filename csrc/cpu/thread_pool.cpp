// The claiming fork/join pool (thread_pool.h).
#include "thread_pool.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <pthread.h>
#include <sched.h>
#include <time.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <optional>
#include <thread>
#include <memory>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

namespace pearlmoe::cpu {
namespace {

// A helper spins this long after a job before it sleeps: a decode step's jobs come 10-300 us
// apart (at batch 1 most regions are too small to share), and waking a sleeper costs the caller
// a futex call and, on a loaded machine, its core (the woken helper preempts it). A helper that
// sleeps through a job's start costs only its help.
constexpr auto kSpin = std::chrono::microseconds(5000);
// A job's chunks are split into one contiguous part per thread (at most kMaxParts), each
// claimed through its own word: epoch (32 bits) | next chunk (16) | end of the part (16). A
// thread runs its own part first, in order, so that it touches the same slice of the weights
// every step, as OpenMP's static schedule does; then it takes what is left of the others'.
constexpr int kMaxParts = 16;
constexpr int64_t kMaxChunks = 0xffff;

inline uint64_t word(uint64_t epoch, int64_t next, int64_t end) {
  return epoch << 32 | static_cast<uint64_t>(next) << 16 | static_cast<uint64_t>(end);
}

inline void relax() {
#if defined(__x86_64__) || defined(_M_X64)
  _mm_pause();
#endif
}

// Load: over windows of kWindow of back-to-back jobs the pool compares the caller's CPU time
// with the wall time, and counts its waits for chunks a helper claimed. A window that shows the
// machine loaded (the caller runnable but off its core, or a helper taken off its core
// mid-chunk) sends the work to the caller alone for kSolo, doubling up to kSoloMost while the
// load lasts: beside one busy process on a 2-core VM two threads decoded at ~1300 tok/s and the
// caller alone at ~2500 (the caller got ~75% of a core, sharing two with its helper and the
// other process).
constexpr auto kWindow = std::chrono::milliseconds(20);
constexpr auto kGap = std::chrono::milliseconds(2);  // a pause between jobs starts a new window
constexpr auto kSolo = std::chrono::milliseconds(20);
constexpr auto kSoloMost = std::chrono::milliseconds(1600);
constexpr double kLoadedCpuShare = 0.85;  // the caller's CPU time / wall time below this
// ... or this many jobs whose caller waited kStall, and 4 of its own chunks' time, for a chunk a
// helper had claimed: a helper taken off its core mid-chunk (a time slice here is 3-4 ms; its
// usual lag is a few microseconds, and a decode step's chunks take well under a millisecond).
constexpr int kLoadedStalls = 4;
constexpr auto kStall = std::chrono::milliseconds(1);

using Clock = std::chrono::steady_clock;

// This thread's CPU time.
std::chrono::nanoseconds thread_cpu() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return std::chrono::seconds(ts.tv_sec) + std::chrono::nanoseconds(ts.tv_nsec);
}

// MKL's per-thread count, where torch links MKL (its x86 builds; null elsewhere): the C entry
// points, which mkl.h names mkl_set_num_threads_local and mkl_get_max_threads (the lower-case
// symbols are Fortran's, by pointer). A helper that calls BLAS inside a chunk (the blocked
// prefill attention calls at::mm, for a prompt over 256 tokens) would have MKL fork an OpenMP
// team of MKL's process-wide size from the helper: a second team, whose threads make libgomp
// count more threads than CPUs and stop spinning at barriers in every team. Every later OpenMP
// region in the process, ATen's eager ops included, then sleeps and wakes through futexes
// (measured: a batch of eager fp64 decodes 4.2 -> 19.7 s after one 300-token fp32 prefill).
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));
extern "C" int MKL_Get_Max_Threads() __attribute__((weak));

thread_local bool t_in_job = false;
thread_local int t_scope_depth = 0;

// Sets this thread's OpenMP thread count (ATen's get_num_threads) and MKL's to 1 while it runs
// chunks.
class SerialOpenMP {
 public:
  SerialOpenMP() : in_job_(t_in_job) {
#ifdef _OPENMP
    saved_ = omp_get_max_threads();
    if (saved_ != 1) omp_set_num_threads(1);
#endif
    if (MKL_Set_Num_Threads_Local != nullptr) saved_mkl_ = MKL_Set_Num_Threads_Local(1);
    t_in_job = true;
  }
  ~SerialOpenMP() {
    t_in_job = in_job_;
#ifdef _OPENMP
    if (saved_ != 1) omp_set_num_threads(saved_);
#endif
    // 0, the usual value before, hands the thread back to MKL's process-wide count
    if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(saved_mkl_);
  }
  SerialOpenMP(const SerialOpenMP&) = delete;
  SerialOpenMP& operator=(const SerialOpenMP&) = delete;

 private:
  bool in_job_;
  int saved_ = 1;
  int saved_mkl_ = 0;
};

std::atomic<int64_t> g_solo_spells{0};   // every pool's windows judged loaded
std::atomic<int64_t> g_guest_chunks{0};  // chunks PoolGuests ran
std::atomic<int64_t> g_helper_wakes{0};  // jobs that woke sleeping helpers

// Installs a caller's state on a helper for the length of its work on a job.
class StateGuard {
 public:
  explicit StateGuard(const CallerState& caller)
      : autograd_(c10::AutogradState::get_tls_state()),
        keys_(c10::impl::tls_local_dispatch_key_set()) {
    c10::AutogradState::set_tls_state(caller.autograd);
    c10::impl::_force_tls_local_dispatch_key_set(caller.keys);
  }
  ~StateGuard() {
    c10::AutogradState::set_tls_state(autograd_);
    c10::impl::_force_tls_local_dispatch_key_set(keys_);
  }
  StateGuard(const StateGuard&) = delete;
  StateGuard& operator=(const StateGuard&) = delete;

 private:
  c10::AutogradState autograd_;
  c10::impl::LocalDispatchKeySet keys_;
};

// Runs every chunk on the calling thread.
void run_inline(int64_t chunks, ChunkFn fn, void* ctx) {
  const SerialOpenMP serial;
  for (int64_t i = 0; i < chunks; ++i) fn(ctx, i);
}

}  // namespace

// One calling thread's pool: its helpers serve that thread's jobs only, so PEARL's two sides (the
// main thread and the draft's) each have their own, and each pool's load watch sees one caller.
class Pool : public std::enable_shared_from_this<Pool> {
 public:
  void run(int64_t chunks, int threads, const CallerState* state, ChunkFn fn, void* ctx) {
    TORCH_CHECK(chunks >= 0 && chunks <= kMaxChunks, "pearlmoe thread pool: ", chunks,
                " chunks (at most ", kMaxChunks, ")");
    TORCH_CHECK(threads >= 1 && state != nullptr && fn != nullptr,
                "pearlmoe thread pool: threads must be >= 1 and state and fn given");
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    const auto start = Clock::now();
    const int parts = static_cast<int>(std::min<int64_t>({threads, chunks, kMaxParts}));
    if (!busy.owns_lock() || start < solo_until_ || parts <= 1) {
      run_inline(chunks, fn, ctx);  // loaded (or nothing to share): the caller alone
      return;
    }
    if (start - last_end_ > kGap) begin_window(start);  // the first job after a pause
    // The last parts are the guests' (PoolGuest), the others' own helpers'.
    const int helpers = parts - 1 - std::min(guests_.load(std::memory_order_relaxed), parts - 1);
    while (static_cast<int>(helpers_) < helpers) {
      const int index = helpers_++;
      std::thread([self = shared_from_this(), index] { self->helper(index); }).detach();
    }
    // The job's fields, then its parts' words, then its epoch (a helper that claims a chunk
    // through a word of this epoch sees the fields; one still on the last job claims nothing).
    const uint32_t epoch = epoch_.load(std::memory_order_relaxed) + 1;
    wanted_.store(helpers, std::memory_order_relaxed);
    parts_.store(parts, std::memory_order_relaxed);
    fn_.store(fn, std::memory_order_relaxed);
    ctx_.store(ctx, std::memory_order_relaxed);
    state_.store(state, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    error_ = nullptr;
    for (int p = 0; p < parts; ++p) {
      parts_words_[p].word.store(word(epoch, p * chunks / parts, (p + 1) * chunks / parts),
                                 std::memory_order_release);
    }
    caller_cpu_.store(sched_getcpu(), std::memory_order_relaxed);
    epoch_.store(epoch);  // seq_cst, paired with a sleeper's: one of the two sees the other's
    // Only a job that wants helpers wakes the sleeping ones. Where guests take every part but
    // the caller's (PEARL's draft thread), waking a helper that goes straight back to sleep
    // cost each job a futex call, and the woken thread took a core from the caller or the
    // guest mid-chunk (the target's one-token step 0.38 -> 0.52 ms with the guest, and the
    // waits it caused sent the pool into solo spells).
    if (helpers > 0 && sleepers_.load() > 0) {
      g_helper_wakes.fetch_add(1, std::memory_order_relaxed);
      const std::lock_guard<std::mutex> lock(sleep_mutex_);
      wake_.notify_all();
    }
    int64_t own = 0;  // chunks the caller ran
    {
      const SerialOpenMP serial;
      own = work(epoch, 0, false);
    }
    const auto own_done = Clock::now();
    // Only chunks a helper claimed can be left: wait for those, yielding the core after a while
    // (on a loaded machine the helper may be waiting for this one).
    for (int spins = 0; done_.load(std::memory_order_acquire) < chunks; ++spins) {
      if (spins < 2000) {
        relax();
      } else {
        std::this_thread::yield();
      }
    }
    const auto end = Clock::now();
    const auto chunk_time = own > 0 ? (own_done - start) / own : Clock::duration::zero();
    window_stalls_ += end - own_done > std::max<Clock::duration>(kStall, 4 * chunk_time);
    last_end_ = end;
    if (end - window_start_ > kWindow) judge_window(end);
    if (error_) {
      std::exception_ptr error = error_;
      error_ = nullptr;
      std::rethrow_exception(error);
    }
  }

  void rest() { rest_.fetch_add(1); }

  void add_guest(int n) { guests_.fetch_add(n, std::memory_order_relaxed); }

  // PoolGuest::help: the current job's unclaimed chunks, the last part first (and only when some
  // of it is unclaimed: the caller takes its own part at once).
  bool guest_help() {
    const uint32_t epoch = epoch_.load(std::memory_order_acquire);
    const int parts = parts_.load(std::memory_order_relaxed);
    if (parts < 2 || stop_.load(std::memory_order_relaxed)) return false;
    // A cheap look first: the guest calls this in its wait loop.
    const uint64_t w = parts_words_[parts - 1].word.load(std::memory_order_acquire);
    if (w >> 32 != epoch || (w >> 16 & 0xffff) >= (w & 0xffff)) return false;
    if (beside_caller()) return false;
    const SerialOpenMP serial;
    const int64_t ran = work(epoch, parts - 1, true);
    g_guest_chunks.fetch_add(ran, std::memory_order_relaxed);
    return ran > 0;
  }

  // The calling thread is ending: its helpers leave (they hold the pool until they do).
  void stop() {
    {
      const std::lock_guard<std::mutex> lock(sleep_mutex_);
      stop_.store(true);
      epoch_.fetch_add(1);  // an epoch with no parts: wakes every helper, claims nothing
    }
    wake_.notify_all();
  }

 private:
  void begin_window(Clock::time_point now) {
    window_start_ = now;
    window_cpu_ = thread_cpu();
    window_stalls_ = 0;
  }

  // Whether the window just ended saw the machine loaded; if so, the next jobs run solo.
  void judge_window(Clock::time_point now) {
    const double share = static_cast<double>((thread_cpu() - window_cpu_).count()) /
                         static_cast<double>(std::chrono::nanoseconds(now - window_start_).count());
    // With a guest (PEARL's draft thread) the caller also waits for the guest's own work (its
    // drafts), and a new draft thread's first job can run past the caller's spin: its CPU share
    // is no sign of load there (windows judged loaded on share 0.70-0.80 in 3 of 12 PEARL
    // decodes on the idle VM, each solo spell then keeping the guest out for 20 ms or more).
    // A guest taken off its core mid-chunk still shows as stalls.
    const bool short_of_cpu = share < kLoadedCpuShare && guests_.load() == 0;
    const bool loaded = short_of_cpu || window_stalls_ >= kLoadedStalls;
    if (loaded) {
      rest();  // the helpers sleep through the solo spell
      solo_for_ = std::min<Clock::duration>(
          solo_for_ == Clock::duration::zero() ? kSolo : 2 * solo_for_, kSoloMost);
      solo_until_ = now + solo_for_;
      g_solo_spells.fetch_add(1, std::memory_order_relaxed);
    } else {
      solo_for_ = Clock::duration::zero();
    }
    begin_window(now);
  }

  // Claims and runs chunks of job `epoch`, its own part first, then the others' (until none is
  // left, or a newer job is up); returns how many it ran.
  int64_t work(uint32_t epoch, int part, bool helper) {
    std::optional<StateGuard> state;
    int64_t ran = 0;
    const int parts = parts_.load(std::memory_order_relaxed);
    for (int k = 0; k < parts; ++k) {
      std::atomic<uint64_t>& w = parts_words_[(part + k) % parts].word;
      uint64_t claim = w.load(std::memory_order_acquire);
      while (claim >> 32 == epoch) {
        const auto next = static_cast<int64_t>(claim >> 16 & 0xffff);
        if (next >= static_cast<int64_t>(claim & 0xffff)) break;  // the part is done
        if (!w.compare_exchange_weak(claim, claim + (uint64_t{1} << 16), std::memory_order_acq_rel,
                                     std::memory_order_acquire)) {
          continue;  // claim holds the word's new value
        }
        // Claimed: the job cannot end before this chunk does, so its fields are this job's.
        if (helper && !state) state.emplace(*state_.load(std::memory_order_relaxed));
        try {
          fn_.load(std::memory_order_relaxed)(ctx_.load(std::memory_order_relaxed), next);
        } catch (...) {
          const std::lock_guard<std::mutex> lock(error_mutex_);
          if (!error_) error_ = std::current_exception();
        }
        done_.fetch_add(1, std::memory_order_acq_rel);
        ++ran;
        claim = w.load(std::memory_order_acquire);
      }
      if (claim >> 32 != epoch) break;  // a newer job: this one is over
    }
    return ran;
  }

  void helper(int index) {
    (void)at::get_num_threads();  // ATen's per-thread set-up first: it would reset the count
    const SerialOpenMP serial;
    uint32_t seen = 0;
    while (true) {
      // A helper the last job did not want (the caller's thread count went down) sleeps rather
      // than spin on cores that are now someone else's.
      seen = wait_after(seen, index < wanted_.load(std::memory_order_relaxed));
      if (stop_.load()) return;
      if (index < wanted_.load(std::memory_order_relaxed) && !beside_caller()) {
        work(seen, (index + 1) % std::max(1, parts_.load(std::memory_order_relaxed)), true);
      }
    }
  }

  // Whether this helper runs on the caller's CPU. A woken helper can land there (the scheduler
  // places a wakee near its waker), and one that claims a chunk there waits for the caller's
  // time slice to end while the caller waits for it. Such a helper yields instead, and leaves
  // the job to the caller.
  bool beside_caller() const {
    const int cpu = sched_getcpu();
    if (cpu < 0 || cpu != caller_cpu_.load(std::memory_order_relaxed)) return false;
    std::this_thread::yield();
    return true;
  }

  // Spins (if `spin`), then sleeps, until a job newer than `seen` is posted; returns its epoch.
  uint32_t wait_after(uint32_t seen, bool spin) {
    const uint64_t rest = rest_.load(std::memory_order_relaxed);
    const auto until = Clock::now() + kSpin;
    for (int spins = 0; spin; ++spins) {
      const uint32_t now = epoch_.load(std::memory_order_acquire);
      if (now != seen) return now;
      if ((spins & 63) == 63) {
        if (rest_.load(std::memory_order_relaxed) != rest || Clock::now() > until) break;
        (void)beside_caller();  // spinning there would take the caller's time
      }
      relax();
    }
    std::unique_lock<std::mutex> lock(sleep_mutex_);
    sleepers_.fetch_add(1);
    wake_.wait(lock, [&] { return epoch_.load() != seen; });
    sleepers_.fetch_sub(1);
    return epoch_.load(std::memory_order_acquire);
  }

  struct alignas(64) PartWord {
    std::atomic<uint64_t> word{0};
  };

  std::mutex busy_;  // held by the caller whose job this is
  int helpers_ = 0;  // helper threads started (under busy_)
  std::atomic<bool> stop_{false};
  // The words every chunk touches, each on its own cache line; the job's fields after them.
  PartWord parts_words_[kMaxParts];
  alignas(64) std::atomic<int64_t> done_{0};
  alignas(64) std::atomic<uint32_t> epoch_{0};
  std::atomic<int> parts_{1};
  std::atomic<ChunkFn> fn_{nullptr};
  std::atomic<void*> ctx_{nullptr};
  std::atomic<const CallerState*> state_{nullptr};
  std::atomic<int> wanted_{0};       // helpers 0..wanted-1 take part in the job
  std::atomic<int> caller_cpu_{-1};  // the CPU the job's caller posted it from
  std::mutex error_mutex_;
  std::exception_ptr error_;
  std::mutex sleep_mutex_;
  std::condition_variable wake_;
  std::atomic<int> sleepers_{0};
  std::atomic<uint64_t> rest_{0};
  std::atomic<int> guests_{0};  // PoolGuests present: the last parts are theirs
  // The load watch (under busy_).
  Clock::time_point window_start_, solo_until_, last_end_;
  std::chrono::nanoseconds window_cpu_{};
  Clock::duration solo_for_{};
  int window_stalls_ = 0;
};

namespace {

// A forked child has none of its parent's helper threads: a pool made before the fork is left
// (its threads are gone) and the child's thread makes a new one.
std::atomic<int> g_fork_generation{0};

// The calling thread's pool, stopped when the thread ends (a C++ draft worker per PEARL call).
struct ThreadPoolHandle {
  std::shared_ptr<Pool> pool;
  int generation = 0;
  ~ThreadPoolHandle() {
    if (pool && generation == g_fork_generation.load()) pool->stop();
  }
};
thread_local ThreadPoolHandle t_pool;

std::shared_ptr<Pool>& pool_ref() {
  static const int registered =
      pthread_atfork(nullptr, nullptr, [] { g_fork_generation.fetch_add(1); });
  (void)registered;
  const int generation = g_fork_generation.load();
  if (!t_pool.pool || t_pool.generation != generation) {
    if (t_pool.pool) new std::shared_ptr<Pool>(std::move(t_pool.pool));  // left: see above
    t_pool.pool = std::make_shared<Pool>();
    t_pool.generation = generation;
  }
  return t_pool.pool;
}

Pool& pool() { return *pool_ref(); }

// 0: not read yet, 1: claim, 2: openmp.
std::atomic<int> g_kind{0};

int kind_from(const std::string& name, const char* where) {
  if (name == "claim") return 1;
  if (name == "openmp") return 2;
  TORCH_CHECK(false, "pearlmoe: ", where, " must be 'claim' or 'openmp', got '", name, "'");
}

}  // namespace

void pool_run(int64_t chunks, int threads, const CallerState* state, ChunkFn fn, void* ctx) {
  pool().run(chunks, threads, state, fn, ctx);
}

bool in_pool_job() { return t_in_job; }

PoolGuest::PoolGuest() : pool_(pool_ref()) { pool_->add_guest(1); }
PoolGuest::~PoolGuest() { leave(); }
void PoolGuest::leave() {
  if (present_.exchange(false)) pool_->add_guest(-1);
}
bool PoolGuest::help() { return present_.load(std::memory_order_relaxed) && pool_->guest_help(); }

PoolScope::PoolScope() { ++t_scope_depth; }
PoolScope::~PoolScope() { --t_scope_depth; }
bool in_pool_scope() { return t_scope_depth > 0; }

int64_t pool_solo_spells() { return g_solo_spells.load(std::memory_order_relaxed); }

int64_t pool_guest_chunks() { return g_guest_chunks.load(std::memory_order_relaxed); }
int64_t pool_helper_wakes() { return g_helper_wakes.load(std::memory_order_relaxed); }

void pool_rest() {
  if (t_pool.pool && t_pool.generation == g_fork_generation.load()) t_pool.pool->rest();
}

int forkable_threads() {
  int threads = 1;
#ifdef _OPENMP
  threads = omp_get_max_threads();
#endif
  if (MKL_Get_Max_Threads != nullptr) threads = std::max(threads, MKL_Get_Max_Threads());
  return threads;
}

void rest_openmp() {
#ifdef _OPENMP  // omp_pause_resource: OpenMP 5.0, in libgomp since GCC 9; this thread's team only
  if (!in_pool_job() && omp_in_parallel() == 0) {
    omp_pause_resource(omp_pause_soft, omp_get_initial_device());
  }
#endif
}

bool pool_claims() {
  int kind = g_kind.load(std::memory_order_relaxed);
  if (kind == 0) {
    const char* env = std::getenv("PEARLMOE_CPU_POOL");
    kind = env == nullptr || *env == '\0' ? 1 : kind_from(env, "PEARLMOE_CPU_POOL");
    g_kind.store(kind, std::memory_order_relaxed);
  }
  return kind == 1;
}

std::string pool_kind() { return pool_claims() ? "claim" : "openmp"; }

void set_pool_kind(const std::string& kind) {
  g_kind.store(kind_from(kind, "set_cpu_pool's kind"), std::memory_order_relaxed);
}

}  // namespace pearlmoe::cpu
