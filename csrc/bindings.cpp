// The one TORCH_LIBRARY of pearlmoe: every op's schema, grouped by area. Kernels are registered
// next to their launchers (csrc/ops/*.cpp) with TORCH_LIBRARY_IMPL.
#include <Python.h>
#include <torch/library.h>

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

TORCH_LIBRARY(pearlmoe, m) {
  // ---- routing -----------------------------------------------------------------------------
  // fp32 softmax over router logits and the top-k experts per token (ties to the lower index);
  // weights are the raw probabilities (Hunyuan-Large) unless renormalize.
  m.def(
      "topk_softmax(Tensor router_logits, int k, bool renormalize=False) "
      "-> (Tensor weights, Tensor ids)");
  // Group the T*k token-slots by expert: a stable permutation, its inverse and per-expert row
  // offsets [E+1]; slots with id -1 are dropped to the tail.
  m.def(
      "moe_align(Tensor topk_ids, int num_experts) "
      "-> (Tensor sorted_slots, Tensor slot_to_row, Tensor expert_offsets)");

  // ---- build info --------------------------------------------------------------------------
  // Whether this build compiled the CUDA kernels.
  m.def("built_with_cuda() -> bool", [] { return kBuiltWithCuda; });
}
