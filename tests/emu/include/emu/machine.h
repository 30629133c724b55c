// The emulated GPU: blocks of threads run as fibers on one CPU thread, one block at a time.
//
// A thread runs until it reaches a rendezvous point: a warp collective (shuffle, ballot, match,
// ldmatrix, mma.sync, __syncwarp) resolves when all 32 lanes of its warp have arrived, and
// __syncthreads when every live thread of the block has. A scheduling seed shuffles the order in
// which runnable threads proceed between rendezvous points (seed 0: thread order), so code that
// relies on an unsynchronised order gives seed-dependent results.
//
// cp.async copies are queued per thread and land in shared memory only when the wait_group that
// retires them runs. Shared-memory bytes written by cp.async and read by ldmatrix are tracked per
// barrier epoch, and races (RAW, WAR, WAW between threads not ordered by a barrier or a warp
// collective), reads of copies still in flight, misaligned addresses, copy sources outside every
// registered buffer and ldmatrix bank conflicts are counted as issues. Hard errors (divergent
// collectives, deadlocks) abort the process with "EMU ERROR".
#pragma once

#include <setjmp.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <random>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "cuda_types.h"

namespace emu {

[[noreturn]] inline void fail(const std::string& msg) {
  std::fprintf(stderr, "EMU ERROR: %s\n", msg.c_str());
  std::fflush(stdout);
  std::fflush(stderr);
  std::abort();
}

// Problems found while running, by description, with counts; the driver prints them.
inline std::map<std::string, int>& issues() {
  static std::map<std::string, int> m;
  return m;
}
inline void report(const std::string& what) { issues()[what]++; }

// Global-memory buffers a kernel may read by cp.async; a copy from anywhere else is an issue.
struct Buffer {
  const uint8_t* lo;
  size_t bytes;
};
inline std::vector<Buffer>& buffers() {
  static std::vector<Buffer> b;
  return b;
}
inline bool in_buffer(const void* p, size_t n) {
  const auto* q = static_cast<const uint8_t*>(p);
  for (const Buffer& b : buffers()) {
    if (q >= b.lo && q + n <= b.lo + b.bytes) return true;
  }
  return false;
}

inline int& seed() {
  static int s = 0;
  return s;
}

// Every launch, for the driver's log: kernels must not size grids from device data.
struct LaunchRecord {
  dim3 grid, block;
  size_t smem;
};
inline std::vector<LaunchRecord>& launch_log() {
  static std::vector<LaunchRecord> v;
  return v;
}

enum Kind {
  kNone,
  kShflXor,
  kShflUp,
  kShflIdx,
  kBallot,
  kReduceMax,
  kMatchAny,
  kSyncWarp,
  kLdm,
  kLdmT,
  kMmaBf16,
  kMmaF16
};

struct Copy {
  uint32_t dst;
  const uint8_t* src;
  int bytes;  // 0: zero fill
};

struct Thread {
  jmp_buf jb;
  ucontext_t entry;  // used once, to enter the fiber
  bool started = false;
  enum State { Runnable, AtBarrier, AtWarp, Done } state = Runnable;
  Kind kind = kNone;
  uint64_t in[8] = {};
  uint64_t out[8] = {};
  std::vector<std::vector<Copy>> groups;  // committed cp.async groups, oldest first
  std::vector<Copy> open;                 // issued, not yet committed
};

// Per shared-memory byte: the last writer and readers, by barrier epoch. Epochs count up over the
// whole process, so entries left by an earlier block never match and need no reset.
struct Shadow {
  int w_tid = -1, w_epoch = -1, w_wsync = -1;
  int r_epoch = -1, r_tid = -1, r_wsync = -1;
  uint32_t r_warps = 0;
  bool r_multi = false;
  int pending = 0;  // cp.async copies in flight to this byte
};

struct Block {
  std::vector<Thread> threads;
  std::vector<int> wsync;  // per warp: __syncwarp / collective count (orders lanes of a warp)
  int epoch = 0;
  jmp_buf sched;
  int cur = -1;
  uint3 bidx{0, 0, 0};
  dim3 grid, block;
  size_t smem_bytes = 0;
  std::function<void()> body;
};

inline Block*& blk() {
  static Block* b = nullptr;
  return b;
}
inline Thread& me() { return blk()->threads[blk()->cur]; }
inline int& epoch_counter() {
  static int e = 0;
  return e;
}

// Shared memory and its shadow, reused by every block (a GPU does not clear shared memory
// either: it starts as 0xFF garbage, NaN in every float format).
inline std::vector<uint8_t>& smem() {
  static std::vector<uint8_t> s;
  return s;
}
inline std::vector<Shadow>& shadow() {
  static std::vector<Shadow> s;
  return s;
}
inline uint8_t* dynamic_smem() { return smem().data(); }

// ---- fibers ------------------------------------------------------------------------------------
// A fiber is entered once through swapcontext and afterwards switched with _setjmp/_longjmp,
// which, unlike swapcontext, does not make a signal-mask system call per switch.
constexpr size_t kStackBytes = 256 * 1024;
inline std::vector<char*>& stacks() {
  static std::vector<char*> v;
  return v;
}
inline char* stack(int i) {
  auto& v = stacks();
  while (static_cast<int>(v.size()) <= i) {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    void* p = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                   -1, 0);
    if (p == MAP_FAILED) fail("cannot map a fiber stack");
    mprotect(p, page, PROT_NONE);  // overflow faults instead of corrupting a neighbour
    v.push_back(static_cast<char*>(p) + page);
  }
  return v[i];
}

inline void yield_to_scheduler() {
  if (_setjmp(me().jb) == 0) _longjmp(blk()->sched, 1);
}

inline void wait_group(int n);

inline void fiber_entry() {
  blk()->body();
  Thread& t = me();
  if (!t.open.empty()) report("thread exited with uncommitted cp.async copies");
  for (const auto& g : t.groups) {
    if (!g.empty()) {
      report("thread exited with cp.async copies in flight");
      break;
    }
  }
  wait_group(0);  // retire them anyway so the shadow counts stay consistent
  t.state = Thread::Done;
  _longjmp(blk()->sched, 1);
}

inline void resume(Block& b, int i) {
  Thread& t = b.threads[i];
  b.cur = i;
  if (_setjmp(b.sched) != 0) return;
  if (t.started) _longjmp(t.jb, 1);
  t.started = true;
  getcontext(&t.entry);
  t.entry.uc_stack.ss_sp = stack(i);
  t.entry.uc_stack.ss_size = kStackBytes;
  t.entry.uc_link = nullptr;
  makecontext(&t.entry, fiber_entry, 0);
  ucontext_t here;
  swapcontext(&here, &t.entry);  // comes back through _longjmp(b.sched), never through `here`
}

// ---- shared-memory race checks -----------------------------------------------------------------
inline bool ordered_same_epoch(int t1, int s1, int t2, int s2) {
  if (t1 == t2) return true;
  return (t1 / 32 == t2 / 32) && s1 != s2;  // same warp, separated by a warp-level sync
}

inline void check_read(uint32_t addr, int n, int tid, const char* what) {
  Block& b = *blk();
  if (addr + n > b.smem_bytes) {
    report(std::string("shared-memory read out of range by ") + what);
    return;
  }
  const int s = b.wsync[tid / 32];
  for (int i = 0; i < n; ++i) {
    Shadow& sh = shadow()[addr + i];
    if (sh.pending)
      report(std::string("read of a cp.async destination still in flight (") + what + ")");
    if (sh.w_tid >= 0 && sh.w_epoch == b.epoch && !ordered_same_epoch(sh.w_tid, sh.w_wsync, tid, s))
      report(std::string("read-after-write race on shared memory (") + what + ")");
    if (sh.r_epoch != b.epoch) {
      sh.r_epoch = b.epoch;
      sh.r_tid = tid;
      sh.r_wsync = s;
      sh.r_warps = 1u << (tid / 32);
      sh.r_multi = false;
    } else {
      if (sh.r_tid != tid) sh.r_multi = true;
      sh.r_warps |= 1u << (tid / 32);
      sh.r_wsync = s;
    }
  }
}

inline void check_write(uint32_t addr, int n, int tid, const char* what) {
  Block& b = *blk();
  const int s = b.wsync[tid / 32];
  for (int i = 0; i < n; ++i) {
    Shadow& sh = shadow()[addr + i];
    if (sh.w_tid >= 0 && sh.w_epoch == b.epoch && !ordered_same_epoch(sh.w_tid, sh.w_wsync, tid, s))
      report(std::string("write-after-write race on shared memory (") + what + ")");
    if (sh.r_epoch == b.epoch) {
      const uint32_t others = sh.r_warps & ~(1u << (tid / 32));
      if (others) {
        report(std::string("write-after-read race on shared memory, another warp (") + what + ")");
      } else if ((sh.r_multi || sh.r_tid != tid) && sh.r_wsync == s) {
        report(std::string("write-after-read race on shared memory within a warp (") + what + ")");
      }
    }
    sh.w_tid = tid;
    sh.w_epoch = b.epoch;
    sh.w_wsync = s;
  }
}

// ---- cp.async ----------------------------------------------------------------------------------
inline void cp_async(uint32_t dst, const void* src, int src_bytes) {
  Block& b = *blk();
  if (dst % 16) report("cp.async destination not 16-byte aligned");
  if (src_bytes && reinterpret_cast<uintptr_t>(src) % 16)
    report("cp.async source not 16-byte aligned");
  if (src_bytes && !in_buffer(src, 16)) report("cp.async source outside every buffer");
  if (dst + 16 > b.smem_bytes) {
    report("cp.async destination beyond the dynamic shared memory");
    return;
  }
  for (int i = 0; i < 16; ++i) {
    Shadow& sh = shadow()[dst + i];
    if (sh.r_epoch == b.epoch && (sh.r_warps & ~(1u << (b.cur / 32))) != 0)
      report("cp.async issued over bytes another warp read in the same epoch (write-after-read)");
    sh.pending++;
  }
  me().open.push_back({dst, static_cast<const uint8_t*>(src), src_bytes});
}

inline void commit() {
  me().groups.push_back(std::move(me().open));
  me().open.clear();
}

inline void wait_group(int n) {
  Block& b = *blk();
  Thread& t = me();
  while (static_cast<int>(t.groups.size()) > n) {
    for (const Copy& c : t.groups.front()) {
      for (int i = 0; i < 16; ++i) shadow()[c.dst + i].pending--;
      check_write(c.dst, 16, b.cur, "cp.async landing");
      if (c.bytes) {
        std::memcpy(&smem()[c.dst], c.src, 16);
      } else {
        std::memset(&smem()[c.dst], 0, 16);
      }
    }
    t.groups.erase(t.groups.begin());
  }
}

// ---- warp collectives --------------------------------------------------------------------------
inline void collective(Kind k) {
  me().kind = k;
  me().state = Thread::AtWarp;
  yield_to_scheduler();
}

inline uint32_t ld32(uint32_t addr) {
  uint32_t v;
  std::memcpy(&v, &smem()[addr], 4);
  return v;
}
inline float lo_f(uint32_t v, bool bf) {
  return bf ? bf16_bits_to_float(v & 0xffff) : half_bits_to_float(v & 0xffff);
}
inline float hi_f(uint32_t v, bool bf) {
  return bf ? bf16_bits_to_float(v >> 16) : half_bits_to_float(v >> 16);
}

inline void resolve_ldmatrix(Thread* (&L)[32], int w, bool trans) {
  uint32_t rows[4][8][4];  // [matrix][row][32-bit word]
  for (int i = 0; i < 4; ++i) {
    int bank_hits[32] = {};
    for (int r = 0; r < 8; ++r) {
      const uint32_t addr = static_cast<uint32_t>(L[8 * i + r]->in[0]);
      if (addr % 16) report("ldmatrix row address not 16-byte aligned");
      check_read(addr, 16, w * 32 + 8 * i + r, trans ? "ldmatrix.trans" : "ldmatrix");
      for (int q = 0; q < 4; ++q) {
        rows[i][r][q] = addr + 16 <= blk()->smem_bytes ? ld32(addr + 4 * q) : 0;
        bank_hits[((addr / 4) + q) % 32]++;
      }
    }
    if (*std::max_element(bank_hits, bank_hits + 32) > 1) report("ldmatrix bank conflict");
  }
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, t = l % 4;
    for (int i = 0; i < 4; ++i) {
      if (!trans) {
        L[l]->out[i] = rows[i][g][t];
      } else {  // element (row 2t, column g) low, (row 2t + 1, column g) high
        auto elem = [&](int row, int col) -> uint32_t {
          const uint32_t word = rows[i][row][col / 2];
          return (col % 2) ? (word >> 16) : (word & 0xffff);
        };
        L[l]->out[i] = elem(2 * t, g) | (elem(2 * t + 1, g) << 16);
      }
    }
  }
}

// mma.sync m16n8k16, fp32 accumulate: fragments per the PTX ISA (g = lane / 4, t = lane % 4).
inline void resolve_mma(Thread* (&L)[32], bool bf) {
  float A[16][16], B[16][8], C[16][8];
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, t = l % 4;
    const auto a = [&](int i) { return static_cast<uint32_t>(L[l]->in[i]); };
    A[g][2 * t] = lo_f(a(0), bf);
    A[g][2 * t + 1] = hi_f(a(0), bf);
    A[g + 8][2 * t] = lo_f(a(1), bf);
    A[g + 8][2 * t + 1] = hi_f(a(1), bf);
    A[g][2 * t + 8] = lo_f(a(2), bf);
    A[g][2 * t + 9] = hi_f(a(2), bf);
    A[g + 8][2 * t + 8] = lo_f(a(3), bf);
    A[g + 8][2 * t + 9] = hi_f(a(3), bf);
    B[2 * t][g] = lo_f(a(4), bf);
    B[2 * t + 1][g] = hi_f(a(4), bf);
    B[2 * t + 8][g] = lo_f(a(5), bf);
    B[2 * t + 9][g] = hi_f(a(5), bf);
    float c[4];
    std::memcpy(c, &L[l]->in[6], 16);
    C[g][2 * t] = c[0];
    C[g][2 * t + 1] = c[1];
    C[g + 8][2 * t] = c[2];
    C[g + 8][2 * t + 1] = c[3];
  }
  float D[16][8];
  for (int i = 0; i < 16; ++i) {
    for (int j = 0; j < 8; ++j) {
      double acc = 0;
      for (int k = 0; k < 16; ++k) acc += static_cast<double>(A[i][k]) * B[k][j];
      D[i][j] = static_cast<float>(acc + C[i][j]);
    }
  }
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, t = l % 4;
    const float d[4] = {D[g][2 * t], D[g][2 * t + 1], D[g + 8][2 * t], D[g + 8][2 * t + 1]};
    std::memcpy(&L[l]->out[0], d, 16);
  }
}

inline void resolve_warp(int w) {
  Block& b = *blk();
  Thread* L[32];
  for (int l = 0; l < 32; ++l) L[l] = &b.threads[w * 32 + l];
  const Kind k = L[0]->kind;
  for (int l = 0; l < 32; ++l) {
    if (L[l]->kind != k) fail("lanes of a warp at different collectives (divergence)");
  }
  switch (k) {
    case kShflXor:
      for (int l = 0; l < 32; ++l) L[l]->out[0] = L[l ^ (L[l]->in[1] & 31)]->in[0];
      break;
    case kShflUp:
      for (int l = 0; l < 32; ++l) {
        const int d = static_cast<int>(L[l]->in[1]);
        L[l]->out[0] = l - d >= 0 ? L[l - d]->in[0] : L[l]->in[0];
      }
      break;
    case kShflIdx:
      for (int l = 0; l < 32; ++l) L[l]->out[0] = L[L[l]->in[1] & 31]->in[0];
      break;
    case kBallot: {
      uint32_t m = 0;
      for (int l = 0; l < 32; ++l) m |= (L[l]->in[0] ? 1u : 0u) << l;
      for (int l = 0; l < 32; ++l) L[l]->out[0] = m;
      break;
    }
    case kReduceMax: {
      int32_t m = INT32_MIN;
      for (int l = 0; l < 32; ++l) m = std::max(m, static_cast<int32_t>(L[l]->in[0]));
      for (int l = 0; l < 32; ++l) L[l]->out[0] = static_cast<uint32_t>(m);
      break;
    }
    case kMatchAny:
      for (int l = 0; l < 32; ++l) {
        uint32_t m = 0;
        for (int j = 0; j < 32; ++j) m |= (L[j]->in[0] == L[l]->in[0] ? 1u : 0u) << j;
        L[l]->out[0] = m;
      }
      break;
    case kSyncWarp:
      b.wsync[w]++;
      break;
    case kLdm:
    case kLdmT:
      resolve_ldmatrix(L, w, k == kLdmT);
      break;
    case kMmaBf16:
    case kMmaF16:
      resolve_mma(L, k == kMmaBf16);
      break;
    default:
      fail("unknown collective");
  }
  for (int l = 0; l < 32; ++l) {
    L[l]->state = Thread::Runnable;
    L[l]->kind = kNone;
  }
}

inline void syncthreads() {
  me().state = Thread::AtBarrier;
  yield_to_scheduler();
}

// ---- blocks and launches -----------------------------------------------------------------------
inline void run_block(Block& b, int nthreads) {
  blk() = &b;
  if (nthreads % 32) fail("block size not a multiple of 32");
  b.threads.assign(nthreads, Thread{});
  b.wsync.assign(nthreads / 32, 0);
  b.epoch = ++epoch_counter();
  std::mt19937 rng(seed() * 7919 + b.bidx.x * 31 + b.bidx.y * 131 + b.bidx.z * 1031);
  std::vector<int> order(nthreads);
  for (int i = 0; i < nthreads; ++i) order[i] = i;
  for (;;) {
    if (seed()) std::shuffle(order.begin(), order.end(), rng);
    bool progressed = false;
    for (int i : order) {
      if (b.threads[i].state != Thread::Runnable) continue;
      resume(b, i);
      progressed = true;
    }
    for (int w = 0; w < nthreads / 32; ++w) {
      int at = 0, done = 0;
      for (int l = 0; l < 32; ++l) {
        const auto s = b.threads[w * 32 + l].state;
        at += s == Thread::AtWarp;
        done += s == Thread::Done;
      }
      if (at == 32) {
        resolve_warp(w);
        progressed = true;
      } else if (at > 0 && at + done == 32) {
        fail("a full-mask warp collective waits for lanes that have exited");
      }
    }
    int live = 0, at_barrier = 0;
    bool any_runnable = false;
    for (const Thread& t : b.threads) {
      live += t.state != Thread::Done;
      at_barrier += t.state == Thread::AtBarrier;
      any_runnable |= t.state == Thread::Runnable;
    }
    if (live == 0) break;
    if (!any_runnable && at_barrier == live) {  // exited threads do not count, as on sm_70+
      b.epoch = ++epoch_counter();
      for (Thread& t : b.threads) {
        if (t.state == Thread::AtBarrier) t.state = Thread::Runnable;
      }
      progressed = true;
    }
    if (!progressed) fail("deadlock: threads wait at a barrier or collective others never reach");
  }
  blk() = nullptr;
}

inline std::map<const void*, int>& smem_optin() {
  static std::map<const void*, int> m;
  return m;
}
constexpr int kMaxSmemOptin = 227 * 1024;  // sm_90; sm_80 allows 163 KiB

template <typename... KArgs, typename... Args>
cudaError_t launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t,
                   Args&&... args) {
  launch_log().push_back({grid, block, smem_bytes});
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535) {
    report("launch with an invalid grid");
    return cudaErrorInvalidConfiguration;
  }
  if (block.y != 1 || block.z != 1 || block.x == 0 || block.x > 1024) {
    report("launch with an invalid (or not 1-D) block");
    return cudaErrorInvalidConfiguration;
  }
  if (smem_bytes > 48 * 1024) {
    auto it = smem_optin().find(reinterpret_cast<const void*>(kernel));
    if (it == smem_optin().end() || it->second < static_cast<int>(smem_bytes)) {
      report("dynamic shared memory above 48 KiB without cudaFuncSetAttribute");
      return cudaErrorInvalidValue;
    }
  }
  std::tuple<std::decay_t<KArgs>...> targs(std::forward<Args>(args)...);
  if (smem().size() < smem_bytes + 16) {
    smem().resize(smem_bytes + 16);
    shadow().resize(smem_bytes + 16);
  }
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        Block b;
        b.grid = grid;
        b.block = block;
        b.bidx = {x, y, z};
        b.smem_bytes = smem_bytes;
        std::memset(smem().data(), 0xFF, smem_bytes);
        b.body = [&]() { std::apply(kernel, targs); };
        run_block(b, static_cast<int>(block.x));
      }
    }
  }
  return cudaSuccess;
}

}  // namespace emu

template <class Kernel>
inline cudaError_t cudaFuncSetAttribute(Kernel* kernel, cudaFuncAttribute, int value) {
  if (value > emu::kMaxSmemOptin) return cudaErrorInvalidValue;
  emu::smem_optin()[reinterpret_cast<const void*>(kernel)] = value;
  return cudaSuccess;
}
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t) { return "emulated CUDA error"; }
