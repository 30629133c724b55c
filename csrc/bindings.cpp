// The one TORCH_LIBRARY of pearlmoe: every op's schema, grouped by area. Kernels are registered
// next to their launchers (csrc/ops/*.cpp) with TORCH_LIBRARY_IMPL.
#include <Python.h>
#include <torch/library.h>

#include <atomic>
#include <exception>
#include <memory>
#include <mutex>
#include <set>
#include <thread>
#include <tuple>
#include <string>
#include <vector>

#include "cpu/cpu_kernels.h"
#include "cpu/draft_worker.h"
#include "cpu/model_step.h"
#include "cpu/pearl_rounds.h"
#include "cpu/parallel.h"
#include "cpu/thread_pool.h"

// `from . import _C` loads this shared library, which runs the registrations below. The module
// itself is empty: ops are reached through torch.ops.pearlmoe, never through pybind11.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

#ifdef PEARLMOE_WITH_CUDA
constexpr bool kBuiltWithCuda = true;
#else
constexpr bool kBuiltWithCuda = false;
#endif

// The selftests' per-index run counts, read out.
static std::vector<int64_t> loaded(const std::vector<std::atomic<int64_t>>& runs) {
  std::vector<int64_t> out;
  out.reserve(runs.size());
  for (const auto& r : runs) out.push_back(r.load());
  return out;
}

TORCH_LIBRARY(pearlmoe, m) {
  // ---- routing -----------------------------------------------------------------------------
  // fp32 softmax over router logits and the top-k experts per token (ties to the lower index);
  // weights are the raw probabilities (Hunyuan-Large) unless renormalize.
  m.def(
      "topk_softmax(Tensor router_logits, int k, bool renormalize=False) "
      "-> (Tensor weights, Tensor ids)");
  // DeepSeek-V3 / GLM-4.5 routing: sigmoid scores, top-k by score + correction_bias among the
  // topk_groups best expert groups; weights the unbiased scores (renormalised), times scaling.
  m.def(
      "grouped_topk(Tensor router_logits, Tensor? correction_bias, int k, int num_groups=1, "
      "int topk_groups=1, bool renormalize=True, float scaling=1.0) "
      "-> (Tensor weights, Tensor ids)");
  // Group the T*k token-slots by expert: a stable permutation, its inverse and per-expert row
  // offsets [E+1]; slots with id -1 are dropped to the tail.
  m.def(
      "moe_align(Tensor topk_ids, int num_experts) "
      "-> (Tensor sorted_slots, Tensor slot_to_row, Tensor expert_offsets)");

  // ---- expert FFN --------------------------------------------------------------------------
  // c[rows offs[g]:offs[g+1]] = a[those rows] · b[g]^T; rows past offs[G] are zero.
  m.def("grouped_gemm(Tensor a, Tensor b, Tensor group_offsets) -> Tensor");
  // The weight gradient of grouped_gemm: grad_b[g] = grad_c[rows of g]^T · a[rows of g].
  m.def("grouped_gemm_wgrad(Tensor grad_c, Tensor a, Tensor group_offsets) -> Tensor");
  // Routed SwiGLU experts (given the routing) plus the optional shared expert.
  m.def(
      "moe_ffn_routed(Tensor x, Tensor topk_weights, Tensor topk_ids, Tensor w13, Tensor w2, "
      "Tensor? shared_w13=None, Tensor? shared_w2=None) -> Tensor");
  // The whole MoE FFN: fp32 router, topk_softmax, then moe_ffn_routed (Hunyuan-Large defaults).
  m.def(
      "moe_ffn(Tensor x, Tensor router_w, Tensor w13, Tensor w2, int top_k, "
      "Tensor? shared_w13=None, Tensor? shared_w2=None, bool renormalize=False) -> Tensor");

  // A dense projection x · weight^T ([..., K] x [N, K] -> [..., N]): the skinny kernel for a few
  // rows on the CPU (decode, verification), BLAS above that, cuBLAS on CUDA.
  m.def("linear(Tensor x, Tensor weight) -> Tensor");
  // A projection whose weight stays in a GGUF block format, 'q4_0', 'q4_1' or 'q8_0' (qweight
  // [N, K/32 * block bytes] uint8: llama.cpp's rows as stored): x · dequant(qweight)^T, fp32 sums.
  m.def("qlinear(Tensor x, Tensor qweight, str format) -> Tensor");
  // qweight [N, K/32 * block bytes] expanded to [N, K] in dtype.
  m.def("dequantize(Tensor qweight, str format, ScalarType dtype) -> Tensor");

  // RMSNorm over the last dim with Hugging Face's rounding points (normalise in fp32, round,
  // times weight); each row reduced in a fixed order, whatever else shares the call.
  m.def("rms_norm(Tensor x, Tensor weight, float eps=1e-05) -> Tensor");

  // ---- attention ---------------------------------------------------------------------------
  // Causal attention aligned bottom-right over a (GQA) KV buffer: query i of sequence b sees
  // keys j < kv_lens[b] - Sq + i + 1; prefill, decode and verification in one op.
  m.def("attention(Tensor q, Tensor k, Tensor v, Tensor kv_lens, float? scale=None) -> Tensor");
  // NeoX RoPE then QK RMSNorm: returns the query (normed, times q_weight and the folded k_weight)
  // and the unweighted normalised key that a CLA layer pair shares in the cache.
  m.def(
      "rope_qk_norm(Tensor q, Tensor k, Tensor positions, float rope_base, Tensor? q_weight=None, "
      "Tensor? k_weight=None, float eps=1e-05, bool normalize=True) -> (Tensor q_out, Tensor "
      "k_hat)");

  // Append the new tokens' K/V to one group of a KV cache in place: k_cache[group, b, positions[b,
  // s]] = k[b, s] (v likewise). No host work on CUDA (positions outside the cache are skipped).
  m.def(
      "kv_cache_write(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k, Tensor v, "
      "Tensor positions, int group=0) -> ()");

  // ---- speculative decoding ----------------------------------------------------------------
  // Batched verification: greedy (no draft_probs) or rejection sampling with the given uniforms;
  // tokens = accepted drafts, then the correction or bonus token, then -1.
  m.def(
      "spec_verify(Tensor target_probs, Tensor draft_ids, Tensor? draft_probs=None, "
      "Tensor? uniforms=None) -> (Tensor tokens, Tensor num_accepted)");

  // ---- whole steps -------------------------------------------------------------------------
  // A model's decode / verification step on the CPU in one call (pearlmoe.decode.fused): the
  // eager step's kernels without the dispatcher, allocations and Python between them.
  // The fused loops' sampler (registered first: ModelStep's methods take it): temperature, top-k,
  // top-p and a random stream of its own.
  using pearlmoe::cpu::Sampler;
  m.class_<Sampler>("CpuSampler")
      .def(torch::init<double, int64_t, double, int64_t>())
      .def("probs", &Sampler::probs)
      .def("draw", &Sampler::draw);
  using pearlmoe::cpu::ModelStep;
  m.class_<ModelStep>("CpuModelStep")
      .def(torch::init<std::vector<at::Tensor>, std::vector<std::string>, std::vector<int64_t>,
                       std::vector<double>>())
      .def("fill", &ModelStep::fill)
      .def("logits", &ModelStep::logits)
      .def("greedy", &ModelStep::greedy)
      .def("draft", &ModelStep::draft)
      .def("greedy_steps", &ModelStep::greedy_steps)
      .def("sample_steps", &ModelStep::sample_steps)
      .def("draft_history", &ModelStep::draft_history)
      .def("speculative_round", &ModelStep::speculative_round)
      .def("speculative_rounds", &ModelStep::speculative_rounds)
      .def("sampled_rounds", &ModelStep::sampled_rounds);
  // PEARL's draft side as a C++ thread running a CpuModelStep's draft() (pearlmoe.decode.pearl).
  using pearlmoe::cpu::DraftWorker;
  m.class_<DraftWorker>("CpuDraftWorker")
      .def(torch::init<c10::intrusive_ptr<ModelStep>, int64_t>())
      .def("submit", &DraftWorker::submit)
      .def("result", &DraftWorker::result)
      .def("seconds", &DraftWorker::seconds)
      .def("latency", &DraftWorker::latency)
      .def("job_threads", &DraftWorker::job_threads);
  // PEARL's rounds (greedy, or sampled after sample_with), one call each, over a target
  // CpuModelStep and a CpuDraftWorker.
  using pearlmoe::cpu::PearlRounds;
  m.class_<PearlRounds>("CpuPearlRounds")
      .def(torch::init<c10::intrusive_ptr<ModelStep>, c10::intrusive_ptr<DraftWorker>, at::Tensor,
                       at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                       std::vector<int64_t>, std::vector<int64_t>, at::Tensor, at::Tensor, int64_t,
                       bool, bool>())
      .def("round", &PearlRounds::round)
      .def("rounds", &PearlRounds::rounds)
      .def("plain", &PearlRounds::plain)
      .def("sample_with", &PearlRounds::sample_with)
      .def("ahead_tokens", &PearlRounds::ahead_tokens)
      .def("finish", &PearlRounds::finish)
      .def("close", &PearlRounds::close);

  // ---- build info --------------------------------------------------------------------------
  // Whether this build compiled the CUDA kernels.
  m.def("built_with_cuda() -> bool", [] { return kBuiltWithCuda; });
  // The instruction set of the CPU kernels' skinny GEMM on this machine.
  m.def("cpu_isa() -> str", [] { return std::string(pearlmoe::cpu::skinny_isa()); });
  // The CPU kernels' fork/join: "claim" (pearlmoe's pool) or "openmp" (csrc/cpu/thread_pool.h).
  m.def("cpu_pool() -> str", [] { return pearlmoe::cpu::pool_kind(); });
  m.def("set_cpu_pool(str kind) -> ()",
        [](const std::string& kind) { pearlmoe::cpu::set_pool_kind(kind); });
  // How often the pool found the machine loaded (other processes on its cores) and ran solo.
  m.def("cpu_pool_solo_spells() -> int", [] { return pearlmoe::cpu::pool_solo_spells(); });
  // How many chunks of the target's work PEARL's draft thread has run (PoolGuest).
  m.def("cpu_pool_guest_chunks() -> int", [] { return pearlmoe::cpu::pool_guest_chunks(); });
  // The calling thread's OpenMP team and its pool's helpers stop spinning now (they sleep until
  // its next parallel job): PEARL calls it before it starts its draft thread, which the
  // scheduler would otherwise place beside the caller while they spin on the other cores.
  m.def("cpu_pool_rest() -> ()", [] {
    pearlmoe::cpu::rest_openmp();
    pearlmoe::cpu::pool_rest();
  });
  // How many jobs have woken sleeping helpers of a pool.
  m.def("cpu_pool_helper_wakes() -> int", [] { return pearlmoe::cpu::pool_helper_wakes(); });
  // For the tests: cpu::parallel_for over [0, n) with this grain inside a fused step's pool scope;
  // returns how often each index ran and how many threads ran pieces (each piece throws at
  // index throw_at, if in range).
  m.def("_cpu_pool_selftest(int n, int grain, int throw_at) -> (int[], int)",
        [](int64_t n, int64_t grain, int64_t throw_at) {
          std::vector<std::atomic<int64_t>> runs(static_cast<size_t>(std::max<int64_t>(n, 0)));
          std::mutex mutex;
          std::set<std::thread::id> threads;
          {
            const pearlmoe::cpu::PoolScope scope;
            pearlmoe::cpu::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
              TORCH_CHECK(begin >= 0 && begin < end && end <= n, "bad range ", begin, "..", end);
              {
                const std::lock_guard<std::mutex> lock(mutex);
                threads.insert(std::this_thread::get_id());
              }
              for (int64_t i = begin; i < end; ++i) {
                runs[i].fetch_add(1);
                TORCH_CHECK(i != throw_at, "pool selftest: thrown at ", i);
              }
            });
          }
          return std::make_tuple(loaded(runs), static_cast<int64_t>(threads.size()));
        });
  // For the tests: the threads an OpenMP region or BLAS call would fork (cpu::forkable_threads)
  // on the calling thread, then in each of n chunks of one pool job (any thread), then on the
  // calling thread again.
  m.def("_cpu_pool_forkable_threads(int n) -> int[]", [](int64_t n) {
    std::vector<std::atomic<int64_t>> seen(static_cast<size_t>(std::max<int64_t>(n, 0) + 2));
    seen.front() = pearlmoe::cpu::forkable_threads();
    {
      const pearlmoe::cpu::PoolScope scope;
      pearlmoe::cpu::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) seen[i + 1] = pearlmoe::cpu::forkable_threads();
      });
    }
    seen.back() = pearlmoe::cpu::forkable_threads();
    return loaded(seen);
  });
  // For the tests: `jobs` parallel_fors over [0, n) (grain 1) on the calling thread's pool while a
  // second thread lends it a hand (PoolGuest::help in a loop, as PEARL's draft thread between
  // drafts); returns how often each index ran over all jobs and in how many the guest took part.
  // A piece throws at index throw_at, if in range (in the last job).
  m.def("_cpu_pool_guest_selftest(int n, int jobs, int throw_at) -> (int[], int)",
        [](int64_t n, int64_t jobs, int64_t throw_at) {
          std::vector<std::atomic<int64_t>> runs(static_cast<size_t>(std::max<int64_t>(n, 0)));
          const auto guest = std::make_shared<pearlmoe::cpu::PoolGuest>();
          std::atomic<bool> stop{false};
          std::atomic<int64_t> guest_ran{0};
          std::thread helper([&] {
            while (!stop.load()) guest_ran += guest->help();
          });
          std::exception_ptr error;
          try {
            const pearlmoe::cpu::PoolScope scope;
            for (int64_t job = 0; job < jobs; ++job) {
              pearlmoe::cpu::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
                for (int64_t i = begin; i < end; ++i) {
                  runs[i].fetch_add(1);
                  TORCH_CHECK(job + 1 < jobs || i != throw_at, "pool guest selftest: thrown at ",
                              i);
                }
              });
            }
          } catch (...) {
            error = std::current_exception();
          }
          stop.store(true);
          helper.join();
          guest->leave();
          if (error) std::rethrow_exception(error);
          return std::make_tuple(loaded(runs), guest_ran.load());
        });
}
