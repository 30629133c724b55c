// CUDA microbenchmark of the attention kernels on Hunyuan-Large's head layout: 80 query heads,
// 8 KV heads, head_dim 80, bf16. Decode (split-KV) at batch 1 and 8 over caches of 4K..256K keys,
// full and with a short context in a long cache (the device-side key ranges), and a 128-row
// prefill over a long context (the split prefill path). Reports the K/V bytes read per second.
// Prints every configuration's plan first (also where no GPU is present, for 132 SMs).
#include <algorithm>
#include <cstdio>
#include <vector>

#include "cuda_bench_util.h"
#include "kernels/attention/attention.h"

namespace {

using namespace pearlmoe::attention;

constexpr int kQHeads = 80, kKvHeads = 8, kDim = 80;

AttentionParams params(int batch, int q_len, int64_t capacity) {
  AttentionParams p{};
  p.q_batch_stride = int64_t{q_len} * kQHeads * kDim;
  p.q_row_stride = kQHeads * kDim;
  p.q_head_stride = kDim;
  p.kv_batch_stride = capacity * kKvHeads * kDim;
  p.kv_row_stride = kKvHeads * kDim;
  p.kv_head_stride = kDim;
  p.batch = batch;
  p.q_len = q_len;
  p.q_heads = kQHeads;
  p.kv_heads = kKvHeads;
  p.head_dim = kDim;
  p.kv_capacity = capacity;
  p.scale = 1.f / 8.944272f;
  p.dtype = DType::kBF16;
  return p;
}

// The plan and how the device deals `len` keys per sequence out over its splits.
void print_plan(int batch, int q_len, int64_t capacity, int len, int sms) {
  const AttentionParams p = params(batch, q_len, capacity);
  const AttentionPlan plan = attention_plan(p, sms);
  const int key_end = len;  // the last query row's keys; the busiest row group's
  int busy = 0, widest = 0;
  for (int s = 0; s < plan.splits; ++s) {
    int begin, end;
    split_tiles(key_end, s, plan.splits, plan.min_split_tiles, &begin, &end);
    busy += end > begin;
    widest = std::max(widest, end - begin);
  }
  const long blocks = long{plan.grid[0]} * plan.grid[1] * plan.grid[2];
  const long per_split = plan.prefill ? long{plan.grid[0]} * (plan.grid[1] / plan.splits) * batch
                                      : long{plan.m_groups} * plan.grid[1] * plan.grid[2];
  std::printf(
      "  B=%d Sq=%d capacity=%lld len=%d: %s, %d splits, grid %ux%ux%u = %ld blocks; %ld busy "
      "blocks of <= %d keys, workspace %zu B\n",
      batch, q_len, static_cast<long long>(capacity), len, plan.prefill ? "prefill" : "split-KV",
      plan.splits, plan.grid[0], plan.grid[1], plan.grid[2], blocks, per_split * busy,
      widest * kKeyTile, plan.workspace_bytes);
}

struct Buffers {
  void *q = nullptr, *k = nullptr, *v = nullptr, *o = nullptr, *lens = nullptr, *ws = nullptr;
  ~Buffers() {
    for (void* ptr : {q, k, v, o, lens, ws}) cudaFree(ptr);
  }
};

// args: batch, query rows, capacity, keys per sequence
void BM_Attention(benchmark::State& state) {
  const int batch = static_cast<int>(state.range(0)), q_len = static_cast<int>(state.range(1));
  const int64_t capacity = state.range(2);
  const int len = static_cast<int>(state.range(3));
  const size_t kv_elems = static_cast<size_t>(batch) * capacity * kKvHeads * kDim;
  const size_t q_elems = static_cast<size_t>(batch) * q_len * kQHeads * kDim;
  std::vector<uint16_t> host(std::max(kv_elems, q_elems));
  for (size_t i = 0; i < host.size(); ++i) host[i] = 0x3c00 + (i * 2654435761u >> 24) % 64;
  Buffers buf;
  CHECK_CUDA(cudaMalloc(&buf.q, q_elems * 2));
  CHECK_CUDA(cudaMalloc(&buf.o, q_elems * 2));
  CHECK_CUDA(cudaMalloc(&buf.k, kv_elems * 2));
  CHECK_CUDA(cudaMalloc(&buf.v, kv_elems * 2));
  CHECK_CUDA(cudaMemcpy(buf.k, host.data(), kv_elems * 2, cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(buf.v, host.data(), kv_elems * 2, cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(buf.q, host.data(), q_elems * 2, cudaMemcpyHostToDevice));
  const std::vector<int32_t> host_lens(batch, len);
  CHECK_CUDA(cudaMalloc(&buf.lens, batch * sizeof(int32_t)));
  CHECK_CUDA(cudaMemcpy(buf.lens, host_lens.data(), batch * 4, cudaMemcpyHostToDevice));

  AttentionParams p = params(batch, q_len, capacity);
  p.q = buf.q;
  p.k = buf.k;
  p.v = buf.v;
  p.o = buf.o;
  p.kv_lens = static_cast<const int32_t*>(buf.lens);
  int sms = 0;
  CHECK_CUDA(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  const size_t bytes = attention_workspace_bytes(p, sms);
  if (bytes) CHECK_CUDA(cudaMalloc(&buf.ws, bytes));

  run_timed(
      state, [&] { return attention_cuda(p, buf.ws, bytes, sms, nullptr); },
      /*scrub_l2=*/false);  // long contexts are far larger than L2
  const int64_t kv_read = int64_t{batch} * len * kKvHeads * kDim * 2 * 2;  // K and V, bf16
  state.SetBytesProcessed(state.iterations() * kv_read);
}

// {batch, Sq, capacity, len}: full caches, a short context in a long cache, a long prefill.
const std::vector<std::vector<int64_t>> kConfigs = {
    {1, 1, 4096, 4096},   {1, 1, 32768, 32768}, {1, 1, 131072, 131072},   {1, 1, 262144, 262144},
    {8, 1, 4096, 4096},   {8, 1, 32768, 32768}, {8, 1, 131072, 131072},   {1, 1, 131072, 2000},
    {8, 1, 131072, 2000}, {1, 5, 131072, 2000}, {1, 128, 131072, 131072}, {1, 128, 32768, 32768},
};

BENCHMARK(BM_Attention)
    ->ArgNames({"B", "Sq", "C", "L"})
    ->Apply([](benchmark::internal::Benchmark* b) {
      for (const auto& c : kConfigs) b->Args(c);
    })
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond);

}  // namespace

int main(int argc, char** argv) {
  int devices = 0, sms = 132;
  if (cudaGetDeviceCount(&devices) == cudaSuccess && devices > 0) {
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  }
  std::printf("attention plans (Hq=%d Hkv=%d D=%d bf16, %d SMs%s):\n", kQHeads, kKvHeads, kDim, sms,
              devices > 0 ? "" : " assumed: no device here");
  for (const auto& c : kConfigs) {
    print_plan(static_cast<int>(c[0]), static_cast<int>(c[1]), c[2], static_cast<int>(c[3]), sms);
  }
  return run_cuda_benchmarks(argc, argv, "bench_attention_cuda");
}
