// torch.ops.cuda_emulation: the emulation's controls, for the tests (schedule order, launch counts).

#include <torch/library.h>

#include <string>

#include "cuda_emulation/runtime.h"

namespace cuda_emulation {
std::string launch_summary();
}

namespace {

void set_schedule(int64_t order, int64_t seed) {
  TORCH_CHECK(order >= 0 && order <= 2, "cuda_emulation.set_schedule: order is 0 (forward), 1 (reverse) or 2 (random)");
  cuda_emulation::set_schedule(static_cast<cuda_emulation::Schedule>(order), static_cast<uint64_t>(seed));
}

std::string launch_summary() { return cuda_emulation::launch_summary(); }

}  // namespace

TORCH_LIBRARY(cuda_emulation, m) {
  // Order in which each block's runnable threads are resumed: 0 forward, 1 reverse, 2 seeded random.
  m.def("set_schedule(int order, int seed) -> ()", &set_schedule);
  // "kernel\tlaunches\n" per launch site of this process (kernels named as written at the launch).
  m.def("launch_summary() -> str", &launch_summary);
}
