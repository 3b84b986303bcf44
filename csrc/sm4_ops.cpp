// The op contract of the compiled extension sm4._C: every schema is declared here, once.
//
// Each backend adds its kernels for these schemas with its own TORCH_LIBRARY_IMPL block
// (csrc/cpu/*.cpp for the CPU dispatch key, csrc/cuda/*.cpp for CUDA). Fake (meta) kernels and
// autograd formulas are registered in Python (sm4/_extension.py), as in pytorch/extension-cpp, so
// that torch.compile and torch.library.opcheck see every op.
//
// Conventions shared by every op:
//   * expert ids are int32 or int64 with -1 marking "no assignment" (a rank >= the token's k);
//   * counts and offsets are int64, so A = sum of k_t may exceed 2^31 rows;
//   * nothing here syncs with the host: shapes depend only on (T, k_max, E, d).

#include <Python.h>
#include <torch/library.h>

// `import sm4._C` only has to load the library so the registrations below run; the module
// itself is empty.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "sm4 compiled kernels; ops live in torch.ops.sm4", -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(sm4, m) {
  // Per-expert assignment counts and their exclusive prefix sum.
  //   expert_ids: (T, k_max) int32/int64, values in [-1, num_experts); -1 = no assignment.
  //   returns counts (E,) int64 and offsets (E + 1,) int64 with offsets[E] = A.
  m.def("expert_histogram(Tensor expert_ids, int num_experts) -> (Tensor counts, Tensor offsets)");
}
