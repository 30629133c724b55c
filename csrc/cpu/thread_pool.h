// The fork/join pool behind cpu::parallel_for in the fused steps: a join that waits only for
// work already started.
//
// OpenMP's parallel region (at::parallel_for) gives each team thread a fixed share and ends at a
// barrier that waits for every team thread, running or not. A decode step is dozens of such
// regions of a few microseconds each, so on a loaded machine, where the scheduler has taken a
// team thread off its core for a time slice, every region waits milliseconds for it: the embedded
// target decoded at 2538 tok/s alone, 572 beside one busy process and 285 beside two on a 2-core
// VM, where one thread alone gave 1372 and 889. Here a job is split into one part per thread, as
// OpenMP's static schedule; each part is claimed through its own atomic word, a thread runs its
// own part and then takes what is left of the others', so a helper that is not running claims
// nothing and the caller does its part; the caller then waits only for chunks a helper has
// claimed and not finished. When the caller's CPU share shows the machine loaded, jobs run on the
// caller alone for a while (the load watch in thread_pool.cpp).
//
// Each calling thread has its own pool (PEARL's two sides each get theirs), whose helpers are
// started as thread counts ask for them, spin for a short while after each job, then sleep, and
// leave when the calling thread ends; a forked child starts pools of its own.
#pragma once

#include <c10/core/AutogradState.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>

namespace pearlmoe::cpu {

// One chunk of a job: fn(ctx, chunk).
using ChunkFn = void (*)(void* ctx, int64_t chunk);

// What a helper installs while it runs a caller's chunks: the caller's autograd state (grad and
// inference mode) and dispatch keys, all that the fused steps' kernels need for the ATen calls
// some make on inference tensors. The whole at::ThreadLocalState (profiler, autocast, Python
// modes) costs ~1 us a job to capture and as much to install: a fifth of a draft step's jobs.
struct CallerState {
  c10::AutogradState autograd;
  c10::impl::LocalDispatchKeySet keys;
  static CallerState capture() {
    return {c10::AutogradState::get_tls_state(), c10::impl::tls_local_dispatch_key_set()};
  }
};

// Runs fn(ctx, i) for every i in [0, chunks) on the calling thread and up to threads - 1 helpers,
// which install `state` while they work on the job (or on the caller alone, while the machine is
// loaded). While a thread runs chunks its OpenMP thread count is 1, so ATen's OpenMP-threaded
// calls inside a chunk (and nested parallel_for) stay on it; an fp32 matmul's MKL keeps its own
// count. Not from inside a job (parallel_for runs nested work inline). Returns when every chunk
// has run, rethrowing the first exception a chunk threw.
void pool_run(int64_t chunks, int threads, const CallerState* state, ChunkFn fn, void* ctx);

// True on a thread while it runs a pool job's chunks.
bool in_pool_job();

// The claiming pool serves the fused steps (ModelStep's calls hold a PoolScope): between their
// kernels ATen's own parallel regions are rare (a long prefill's large matmuls, after which the
// prefill ends ATen's team). Ops called one by one (eager, or inside a compiled graph) keep
// ATen's OpenMP team: two pools spinning beside ATen's regions would take each other's cores
// (measured: ATen's idle team spinning for milliseconds after each region).
class PoolScope {
 public:
  PoolScope();
  ~PoolScope();
  PoolScope(const PoolScope&) = delete;
  PoolScope& operator=(const PoolScope&) = delete;
};
bool in_pool_scope();

class Pool;

// A thread outside a pool lending it a hand between jobs of its own: PEARL's draft thread, whose
// core would otherwise idle once it has drafted while the target still verifies its window. While
// a PoolGuest of the calling thread's pool is present, that pool's jobs keep their last part for
// the guest instead of a helper thread of their own (which would take the guest's core while it
// drafts); the caller still takes the part when the guest has not. With one thread a side (two
// cores) a busy guest costs a job only the split; with more, the guest's part is one chunk that
// the caller runs after its own, so such a job takes 2 / (threads) of the work, not 1 / (threads
// - 1).
class PoolGuest {
 public:
  PoolGuest();  // a guest of the calling thread's pool
  ~PoolGuest();
  PoolGuest(const PoolGuest&) = delete;
  PoolGuest& operator=(const PoolGuest&) = delete;
  // From the guest's thread: if the last part of the pool's current job is not all claimed, runs
  // what is unclaimed of it, then of the other parts; returns whether it ran any chunk. (Several
  // guests would all start at the last part.)
  bool help();
  // The pool no longer counts on this guest (idempotent; the destructor calls it).
  void leave();

 private:
  std::shared_ptr<Pool> pool_;
  std::atomic<bool> present_{true};
};

// How many times the pool has judged the machine loaded and sent work to callers alone.
int64_t pool_solo_spells();

// How many chunks PoolGuests have run (PEARL's draft thread on the target's work).
int64_t pool_guest_chunks();

// How many jobs have woken sleeping helpers (a job served by its caller and guests wakes none).
int64_t pool_helper_wakes();

// The calling thread's idle helpers stop spinning and sleep until its next job (PEARL's rounds
// split the cores between their sides: a helper left spinning from a prefill would take the
// draft's).
void pool_rest();

// Ends the calling thread's idle OpenMP team (ATen's own parallel regions: a cache's zeros, a
// large copy), whose threads otherwise spin at their barrier for milliseconds on the cores the
// pool's helpers or PEARL's draft thread need; the next OpenMP region starts them again (~0.1 ms).
void rest_openmp();

// How many threads an OpenMP region or a BLAS call would fork from the calling thread now: the
// larger of OpenMP's count and MKL's (where torch links MKL). 1 on a thread running pool chunks.
int forkable_threads();

// Which fork/join cpu::parallel_for uses: "claim" (this pool, the default) or "openmp"
// (at::parallel_for); PEARLMOE_CPU_POOL sets it at start-up, set_pool_kind at run time.
std::string pool_kind();
void set_pool_kind(const std::string& kind);
bool pool_claims();

}  // namespace pearlmoe::cpu
