// Releasing the GIL around C++ work reached from Python through torch.classes methods (which are
// called holding it), so other Python threads run meanwhile. A no-op on threads that do not hold
// it (C++ worker threads, or code already inside a release).
#pragma once

#include <Python.h>

namespace pearlmoe::cpu {

class GilRelease {
 public:
  GilRelease() : state_(Py_IsInitialized() && PyGILState_Check() ? PyEval_SaveThread() : nullptr) {}
  ~GilRelease() {
    if (state_ != nullptr) PyEval_RestoreThread(state_);
  }
  GilRelease(const GilRelease&) = delete;
  GilRelease& operator=(const GilRelease&) = delete;

 private:
  PyThreadState* state_;
};

}  // namespace pearlmoe::cpu
