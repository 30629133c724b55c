// Hopper (sm_90a) grouped GEMM for the MoE expert FFN: CUTLASS 3.x pointer-array GEMM with
// per-group problem shapes that live on the device only. Modelled on CUTLASS example 57
// (57_hopper_grouped_gemm) and on torch._grouped_mm (ATen GroupMM.cu), which runs the same kernels.
//
// One call enqueues two kernels on `stream`:
//   1. a setup kernel (one thread per group) reads group_offsets and writes CUTLASS's per-group
//      arrays (problem shape, A/B/D pointers, strides) into the caller's workspace;
//   2. the persistent warp-specialized CUTLASS kernel, given a null host problem-shape pointer,
//      so its tile scheduler reads the shapes from device memory.
// The host never reads group sizes: no sync, and the call can be captured in a CUDA graph.
//
// Operands: A [rows, K] row-major with row stride lda; B[g] N×K row-major, which is CUTLASS's
// "ColumnMajor" B for D = A·B^T; D [M, N] row-major in A's dtype; fp32 accumulation. The
// epilogue is D = 1·acc + 0·C, so C is never loaded (it aliases D, as in ATen).
//
// Empty groups: the group tile scheduler (sm90_tile_scheduler_group.hpp) gives a group
// ceil(0 / TILE_M) · tiles_n = 0 tiles, so no CTA is assigned to it and its pointers, strides and
// TMA descriptors are never used. The setup kernel still gives it in-bounds pointers.
//
// Workspace: [setup arrays | CUTLASS workspace], each piece 256-byte aligned from a 256-aligned
// base (the size includes slack to align any base). CUTLASS's part holds per-SM TMA descriptors
// and depends only on the SM count (not on group count or sizes), so it is sized for kMaxSmCount
// SMs and the kernel is launched with min(device SMs, kMaxSmCount) persistent CTAs.
#include "grouped_gemm.h"

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdint>
#include <type_traits>

#include "../common.h"

// Defines CUTLASS_ARCH_MMA_MODIFIABLE_TMA_SM90_SUPPORTED (nvcc >= 12.3) in every pass, host
// included; cutlass/cutlass.h alone does not pull it in.
#include "cutlass/arch/config.h"

// For plain sm_90 (no "a") CUTLASS compiles the kernel body to a stub that only prints an error,
// and the host pass cannot tell 9.0 from 9.0a (both appear as 900 in __CUDA_ARCH_LIST__). Fail the
// build rather than ship a kernel that silently computes nothing.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ == 900 && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "grouped_gemm_sm90.cu needs sm_90a (e.g. TORCH_CUDA_ARCH_LIST=9.0a), not sm_90"
#endif

#if defined(CUTLASS_ARCH_MMA_MODIFIABLE_TMA_SM90_SUPPORTED)
#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/group_array_problem_shape.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/kernel_hardware_info.h"
#include "cutlass/util/packed_stride.hpp"
#endif

namespace pearlmoe::moe_gemm {
namespace {

#if defined(CUTLASS_ARCH_MMA_MODIFIABLE_TMA_SM90_SUPPORTED)

constexpr size_t kAlign = 256;      // alignment of every workspace piece
constexpr int kMaxSmCount = 256;    // CUTLASS workspace sized for this many SMs (H100 has 132)
constexpr int kSetupThreads = 256;  // setup kernel block size

constexpr size_t align_up(size_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; }

// True when nvcc was asked for a 9.x device pass. __CUDA_ARCH_LIST__ (e.g. "800,900") is the only
// arch information the host pass has; the #error above makes 900 mean sm_90a.
constexpr bool built_for_sm90() {
#if defined(__CUDA_ARCH_LIST__)
  constexpr int kArchs[] = {__CUDA_ARCH_LIST__};
  for (int arch : kArchs) {
    if (arch / 100 == 9) return true;
  }
#endif
  return false;
}

constexpr bool kHasSm90Kernels = built_for_sm90();

using ProblemShape = cutlass::gemm::GroupProblemShape<cute::Shape<int, int, int>>;  // (M, N, K)

template <class Element, class TileShape, class ClusterShape, class KernelSchedule,
          class EpilogueSchedule>
struct GemmConfig {
  using LayoutA = cutlass::layout::RowMajor;     // A [rows, K]
  using LayoutB = cutlass::layout::ColumnMajor;  // B[g] stored N×K, i.e. K×N column-major
  using LayoutD = cutlass::layout::RowMajor;     // D [rows, N]
  using Accumulator = float;
  static constexpr int kAlignment = 128 / cutlass::sizeof_bits<Element>::value;  // 16 B for TMA

  // Layouts are passed as pointers: that selects the pointer-array (grouped) collectives.
  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, Accumulator, Accumulator, Element, LayoutD*,
      kAlignment, Element, LayoutD*, kAlignment, EpilogueSchedule,
      cutlass::epilogue::fusion::LinearCombination<Element, Accumulator>>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, LayoutA*, kAlignment, Element,
      LayoutB*, kAlignment, Accumulator, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      KernelSchedule>::CollectiveOp;

  using Kernel =
      cutlass::gemm::kernel::GemmUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
};

// ATen's large-problem config: two consumer warpgroups share a 128×256 tile; the 2×1 cluster
// multicasts each B tile to the two CTAs of neighbouring M tiles.
template <class Element>
using CooperativeGemm =
    typename GemmConfig<Element, cute::Shape<cute::_128, cute::_256, cute::_64>,
                        cute::Shape<cute::_2, cute::_1, cute::_1>,
                        cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative,
                        cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative>::Gemm;

// Few rows per group: a 64-row tile wastes less, and the two consumer warpgroups alternate tiles
// so one's epilogue overlaps the other's MMA. Cluster 1×1 so a group never gets a padding tile.
template <class Element>
using PingpongGemm =
    typename GemmConfig<Element, cute::Shape<cute::_64, cute::_128, cute::_128>,
                        cute::Shape<cute::_1, cute::_1, cute::_1>,
                        cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpong,
                        cutlass::epilogue::PtrArrayTmaWarpSpecializedPingpong>::Gemm;

// Hands out consecutive kAlign-aligned pieces of a workspace; with a null base it only measures.
class Carver {
 public:
  explicit Carver(uint8_t* base) : base_(base) {}

  template <class T>
  T* take(size_t count) {
    T* piece = base_ != nullptr ? reinterpret_cast<T*>(base_ + offset_) : nullptr;
    offset_ += align_up(count * sizeof(T));
    return piece;
  }

  size_t bytes() const { return offset_; }

 private:
  uint8_t* base_;
  size_t offset_ = 0;
};

// The per-group arrays CUTLASS reads, written by the setup kernel. Both schedules of a dtype
// take the same types (static_asserts below), so one set serves either.
template <class Element>
struct GroupArrays {
  using Kernel = typename CooperativeGemm<Element>::GemmKernel;
  using Shape = ProblemShape::UnderlyingProblemShape;
  using StrideA = typename Kernel::InternalStrideA;
  using StrideB = typename Kernel::InternalStrideB;
  using StrideD = typename Kernel::InternalStrideD;
  // (row stride, 1, 0): K-contiguous A and B, N-contiguous D; the L (batch) mode is unused.
  using RowStride = cute::Stride<int64_t, cute::_1, cute::_0>;
  static_assert(std::is_same_v<StrideA, RowStride> && std::is_same_v<StrideB, RowStride> &&
                std::is_same_v<StrideD, RowStride>);
  using PingpongKernel = typename PingpongGemm<Element>::GemmKernel;
  static_assert(std::is_same_v<StrideA, typename PingpongKernel::InternalStrideA> &&
                std::is_same_v<StrideB, typename PingpongKernel::InternalStrideB> &&
                std::is_same_v<StrideD, typename PingpongKernel::InternalStrideD>);

  Shape* shapes;
  const Element** a;
  const Element** b;
  Element** d;
  StrideA* stride_a;
  StrideB* stride_b;
  StrideD* stride_d;

  static GroupArrays carve(Carver& carver, int groups) {
    GroupArrays arrays;
    arrays.shapes = carver.take<Shape>(groups);
    arrays.a = carver.take<const Element*>(groups);
    arrays.b = carver.take<const Element*>(groups);
    arrays.d = carver.take<Element*>(groups);
    arrays.stride_a = carver.take<StrideA>(groups);
    arrays.stride_b = carver.take<StrideB>(groups);
    arrays.stride_d = carver.take<StrideD>(groups);
    return arrays;
  }
};

// One thread per group. Offsets are clamped to [0, m] and made nondecreasing so that a malformed
// offs cannot address outside A or D; a valid offs passes through unchanged.
template <class Element>
__global__ void build_group_arrays_kernel(GroupArrays<Element> arrays, const Element* a,
                                          int64_t lda, const Element* b, Element* d,
                                          const int32_t* __restrict__ offs, int64_t m, int n, int k,
                                          int groups) {
  using Arrays = GroupArrays<Element>;
  const int g = blockIdx.x * blockDim.x + threadIdx.x;
  if (g >= groups) return;
  const int64_t lo = offs[g], hi = offs[g + 1];
  const int64_t begin = lo < 0 ? 0 : (lo > m ? m : lo);
  const int64_t end = hi < begin ? begin : (hi > m ? m : hi);
  const int rows = static_cast<int>(end - begin);

  arrays.shapes[g] = cute::make_shape(rows, n, k);
  arrays.a[g] = a + begin * lda;
  arrays.b[g] = b + static_cast<int64_t>(g) * n * k;
  arrays.d[g] = d + begin * n;

  typename Arrays::StrideA stride_a{};
  cute::get<0>(stride_a) = lda;  // A may be a row-strided view, so not a packed stride
  arrays.stride_a[g] = stride_a;
  arrays.stride_b[g] = cutlass::make_cute_packed_stride(typename Arrays::StrideB{}, {n, k, 1});
  arrays.stride_d[g] = cutlass::make_cute_packed_stride(typename Arrays::StrideD{}, {rows, n, 1});
}

cudaError_t to_cuda_error(cutlass::Status status) {
  switch (status) {
    case cutlass::Status::kSuccess:
      return cudaSuccess;
    case cutlass::Status::kErrorMisalignedOperand:
    case cutlass::Status::kErrorInvalidDataType:
    case cutlass::Status::kErrorInvalidLayout:
    case cutlass::Status::kErrorInvalidProblem:
    case cutlass::Status::kErrorWorkspaceNull:
    case cutlass::Status::kInvalid:
      return cudaErrorInvalidValue;
    case cutlass::Status::kErrorNotSupported:
    case cutlass::Status::kErrorArchMismatch:
      return cudaErrorNotSupported;
    case cutlass::Status::kErrorInsufficientDriver:
      return cudaErrorInsufficientDriver;
    case cutlass::Status::kErrorMemoryAllocation:
      return cudaErrorMemoryAllocation;
    default:  // kErrorInternal: a failed cudaFuncSetAttribute or launch (CUTLASS cleared it)
      return cudaErrorLaunchFailure;
  }
}

// SM count of `device`, cached: cudaDeviceGetAttribute is cheap, but this runs every MoE layer.
cudaError_t sm_count_of(int device, int* sm_count) {
  constexpr int kCachedDevices = 64;
  static std::atomic<int> cache[kCachedDevices];  // 0 = not queried yet
  if (device >= 0 && device < kCachedDevices) {
    *sm_count = cache[device].load(std::memory_order_relaxed);
    if (*sm_count > 0) return cudaSuccess;
  }
  const cudaError_t err = cudaDeviceGetAttribute(sm_count, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  if (device >= 0 && device < kCachedDevices) {
    cache[device].store(*sm_count, std::memory_order_relaxed);
  }
  return cudaSuccess;
}

template <class Gemm>
typename Gemm::Arguments make_arguments(const GroupArrays<typename Gemm::ElementA>& arrays,
                                        int groups, const cutlass::KernelHardwareInfo& hw_info) {
  using Element = typename Gemm::ElementA;
  typename Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGrouped,
      // Host problem shapes = nullptr: the scheduler reads arrays.shapes on the device.
      {groups, arrays.shapes, nullptr},
      {arrays.a, arrays.stride_a, arrays.b, arrays.stride_b},
      // C aliases D (as in ATen) but beta = 0, so the epilogue never loads it.
      {{}, const_cast<const Element**>(arrays.d), arrays.stride_d, arrays.d, arrays.stride_d},
      hw_info};
  args.epilogue.thread.alpha = 1.0f;
  args.epilogue.thread.beta = 0.0f;
  args.epilogue.thread.alpha_ptr = nullptr;
  args.epilogue.thread.beta_ptr = nullptr;
  args.epilogue.thread.alpha_ptr_array = nullptr;
  args.epilogue.thread.beta_ptr_array = nullptr;
  args.epilogue.thread.dAlpha = {cute::_0{}, cute::_0{}, 0};  // one alpha for all groups
  args.epilogue.thread.dBeta = {cute::_0{}, cute::_0{}, 0};
  return args;
}

// CUTLASS workspace of one schedule: per-SM TMA descriptors, independent of the group sizes
// (the tile scheduler needs none), so the arrays may be left null here.
template <class Gemm>
size_t cutlass_workspace_bytes(int groups, int sm_count) {
  cutlass::KernelHardwareInfo hw_info;
  hw_info.sm_count = sm_count;
  GroupArrays<typename Gemm::ElementA> no_arrays{};
  return Gemm::get_workspace_size(make_arguments<Gemm>(no_arrays, groups, hw_info));
}

// The whole workspace: alignment slack, setup arrays, then the larger of the two schedules'
// CUTLASS workspaces at kMaxSmCount SMs.
template <class Element>
size_t workspace_bytes_for(int groups) {
  Carver measure(nullptr);
  GroupArrays<Element>::carve(measure, groups);
  const size_t gemm_bytes =
      std::max(cutlass_workspace_bytes<CooperativeGemm<Element>>(groups, kMaxSmCount),
               cutlass_workspace_bytes<PingpongGemm<Element>>(groups, kMaxSmCount));
  return kAlign + measure.bytes() + align_up(gemm_bytes);
}

template <class Gemm>
cudaError_t run_gemm(const GroupArrays<typename Gemm::ElementA>& arrays, int groups,
                     const cutlass::KernelHardwareInfo& hw_info, uint8_t* gemm_workspace,
                     size_t gemm_workspace_bytes, cudaStream_t stream) {
  const typename Gemm::Arguments args = make_arguments<Gemm>(arrays, groups, hw_info);
  if (Gemm::get_workspace_size(args) > gemm_workspace_bytes) return cudaErrorInvalidValue;
  Gemm gemm;
  cutlass::Status status = gemm.can_implement(args);
  if (status != cutlass::Status::kSuccess) return to_cuda_error(status);
  // Builds the TMA descriptors on the host and sets the kernel's smem limit; no device work.
  status = gemm.initialize(args, gemm_workspace, stream);
  if (status != cutlass::Status::kSuccess) return to_cuda_error(status);
  status = gemm.run(stream);
  return to_cuda_error(status);
}

// Pingpong when groups are small along M or N (ATen's rule, with M averaged over the groups).
bool prefer_pingpong(const GroupedGemmParams& p) {
  const int64_t rows_per_group = (p.m + p.num_groups - 1) / p.num_groups;
  return rows_per_group <= 128 || p.n <= 128;
}

template <class Element>
cudaError_t run_typed(const GroupedGemmParams& p, void* workspace, size_t workspace_bytes,
                      cudaStream_t stream) {
  const int groups = p.num_groups;
  if (workspace == nullptr || workspace_bytes < workspace_bytes_for<Element>(groups)) {
    return cudaErrorInvalidValue;
  }
  int device = 0;
  int sm_count = 0;
  PM_CUDA_TRY(cudaGetDevice(&device));
  PM_CUDA_TRY(sm_count_of(device, &sm_count));
  cutlass::KernelHardwareInfo hw_info;
  hw_info.device_id = device;
  hw_info.sm_count = std::min(sm_count, kMaxSmCount);  // the workspace covers kMaxSmCount SMs

  // [slack | setup arrays | CUTLASS workspace]
  const auto raw = reinterpret_cast<uintptr_t>(workspace);
  auto* base = reinterpret_cast<uint8_t*>(align_up(raw));
  Carver carver(base);
  const GroupArrays<Element> arrays = GroupArrays<Element>::carve(carver, groups);
  uint8_t* gemm_workspace = base + carver.bytes();
  const size_t gemm_workspace_bytes =
      workspace_bytes - (base - static_cast<uint8_t*>(workspace)) - carver.bytes();

  const unsigned blocks = static_cast<unsigned>((groups + kSetupThreads - 1) / kSetupThreads);
  build_group_arrays_kernel<Element><<<blocks, kSetupThreads, 0, stream>>>(
      arrays, static_cast<const Element*>(p.a), p.lda, static_cast<const Element*>(p.b),
      static_cast<Element*>(p.c), p.group_offsets, p.m, static_cast<int>(p.n),
      static_cast<int>(p.k), groups);
  PM_CUDA_TRY(cudaGetLastError());

  const cudaError_t err =
      prefer_pingpong(p)
          ? run_gemm<PingpongGemm<Element>>(arrays, groups, hw_info, gemm_workspace,
                                            gemm_workspace_bytes, stream)
          : run_gemm<CooperativeGemm<Element>>(arrays, groups, hw_info, gemm_workspace,
                                               gemm_workspace_bytes, stream);
  if (err != cudaSuccess) return err;
  return cudaGetLastError();
}

#else  // no CUTLASS sm90 grouped support in this toolkit (nvcc < 12.3)

constexpr bool kHasSm90Kernels = false;

#endif  // CUTLASS_ARCH_MMA_MODIFIABLE_TMA_SM90_SUPPORTED

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

}  // namespace

bool grouped_gemm_sm90_supported(const GroupedGemmParams& p) {
  if (!kHasSm90Kernels) return false;
  if (p.a_rows != nullptr || p.epilogue != Epilogue::kNone) return false;
  if (p.dtype != DType::kBF16 && p.dtype != DType::kFP16) return false;
  if (p.num_groups < 1 || p.group_offsets == nullptr) return false;
  // CUTLASS problem shapes are int; a zero-sized N or K has no valid TMA descriptor.
  if (p.m < 0 || p.m > INT_MAX || p.n < 1 || p.n > INT_MAX || p.k < 1 || p.k > INT_MAX) {
    return false;
  }
  // TMA: 16-byte aligned base addresses and row strides (8 elements of 2 bytes).
  if (p.k % 8 != 0 || p.n % 8 != 0 || p.lda % 8 != 0 || p.lda < p.k) return false;
  return aligned16(p.a) && aligned16(p.b) && aligned16(p.c);
}

size_t grouped_gemm_sm90_workspace_bytes(const GroupedGemmParams& p) {
#if defined(CUTLASS_ARCH_MMA_MODIFIABLE_TMA_SM90_SUPPORTED)
  const int groups = std::max(p.num_groups, 0);
  return p.dtype == DType::kFP16 ? workspace_bytes_for<cutlass::half_t>(groups)
                                 : workspace_bytes_for<cutlass::bfloat16_t>(groups);
#else
  (void)p;
  return 0;
#endif
}

cudaError_t grouped_gemm_sm90(const GroupedGemmParams& p, void* workspace, size_t workspace_bytes,
                              cudaStream_t stream) {
  if (!grouped_gemm_sm90_supported(p)) return cudaErrorNotSupported;
  if (p.m == 0) return cudaSuccess;  // no rows: nothing to launch or write
#if defined(CUTLASS_ARCH_MMA_MODIFIABLE_TMA_SM90_SUPPORTED)
  return p.dtype == DType::kFP16
             ? run_typed<cutlass::half_t>(p, workspace, workspace_bytes, stream)
             : run_typed<cutlass::bfloat16_t>(p, workspace, workspace_bytes, stream);
#else
  (void)workspace;
  (void)workspace_bytes;
  (void)stream;
  return cudaErrorNotSupported;
#endif
}

}  // namespace pearlmoe::moe_gemm
