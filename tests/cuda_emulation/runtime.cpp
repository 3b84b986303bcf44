// The scheduler of the CUDA CPU emulation (interface and semantics: include/cuda_emulation/runtime.h).

#include "cuda_emulation/runtime.h"

#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <cstdio>
#include <map>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

namespace cuda_emulation {
namespace {

constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kRedZone = 256;  // bytes on each side of the dynamic shared memory
constexpr unsigned char kRedZoneByte = 0xa5;
constexpr unsigned char kUninitialisedShared = 0xff;  // reads as NaN in fp32, fp16 and bf16
constexpr unsigned kMaxThreads = 1024;

enum class Wait { kReady, kBarrier, kWarp, kDone };

struct Fiber {
  ThreadInfo info;
  ucontext_t context;
  char* stack = nullptr;
  Wait wait = Wait::kReady;
  uint64_t generation = 0;  // of the barrier / warp collective it waits for
  Site site{nullptr, 0};
};

struct WarpState {
  unsigned present = 0;  // lanes that exist (a partial last warp has fewer)
  unsigned exited = 0;
  uint64_t generation = 0;
  // The pending collective.
  bool pending = false;
  WarpOp op = WarpOp::kShfl;
  Site site{nullptr, 0};
  unsigned mask = 0, arrived = 0;
  WarpCompute compute = nullptr;
  uint64_t in[32] = {}, out[32] = {};
  int src[32] = {};
  void* payload[32] = {};
};

struct Block {
  std::vector<Fiber>* fibers = nullptr;
  std::vector<WarpState> warps;
  unsigned threads = 0, arrived = 0, exited = 0;
  uint64_t barrier_generation = 0;
  Site barrier_site{nullptr, 0};
  uint3 index{0, 0, 0};
};

struct Emulator {
  ucontext_t scheduler;
  std::vector<Fiber> fibers;
  Block block;
  dim3 grid, block_dim;
  const std::function<void()>* body = nullptr;
  Fiber* current = nullptr;
  std::vector<unsigned char> shared;  // red zone, dynamic shared memory, red zone
  size_t shared_bytes = 0;
  bool failed = false;
  std::string failure;
  Schedule schedule = Schedule::kForward;
  uint64_t seed = 0;
  cudaError_t last_error = cudaSuccess;
  std::string last_message;
  std::map<std::string, int64_t> launches;

  ~Emulator() {
    for (auto& f : fibers)
      if (f.stack) munmap(f.stack, kStackBytes);
  }
};

thread_local Emulator emulator;

std::string where(Site site) {
  if (site.file == nullptr) return "?";
  const char* slash = std::strrchr(site.file, '/');
  return std::string(slash ? slash + 1 : site.file) + ":" + std::to_string(site.line);
}

const char* op_name(WarpOp op) {
  switch (op) {
    case WarpOp::kShfl: return "__shfl_sync";
    case WarpOp::kShflXor: return "__shfl_xor_sync";
    case WarpOp::kShflUp: return "__shfl_up_sync";
    case WarpOp::kShflDown: return "__shfl_down_sync";
    case WarpOp::kBallot: return "__ballot_sync";
    case WarpOp::kAll: return "__all_sync";
    case WarpOp::kAny: return "__any_sync";
    case WarpOp::kSyncwarp: return "__syncwarp";
    case WarpOp::kMma: return "wmma::mma_sync";
  }
  return "?";
}

std::string describe_thread(const Fiber& f) {
  const auto& t = f.info.thread_idx;
  return "thread (" + std::to_string(t.x) + "," + std::to_string(t.y) + "," + std::to_string(t.z) + ") of block (" +
         std::to_string(emulator.block.index.x) + "," + std::to_string(emulator.block.index.y) + "," +
         std::to_string(emulator.block.index.z) + ")";
}

// Back to the scheduler; returns when the scheduler resumes this fiber.
void yield() {
  Fiber* self = emulator.current;
  swapcontext(&self->context, &emulator.scheduler);
}

void check_red_zones(Site site) {
  auto& s = emulator.shared;
  if (s.empty()) return;
  for (size_t i = 0; i < kRedZone; ++i) {
    if (s[i] != kRedZoneByte) hazard(site, "a write before the start of the dynamic shared memory");
    if (s[kRedZone + emulator.shared_bytes + i] != kRedZoneByte)
      hazard(site, ("a write past the end of the dynamic shared memory (" + std::to_string(emulator.shared_bytes) +
                    " bytes requested at launch)").c_str());
  }
}

void release_barrier(Site site) {
  Block& b = emulator.block;
  check_red_zones(site);
  b.arrived = 0;
  b.barrier_site = Site{nullptr, 0};
  ++b.barrier_generation;
}

void complete_collective(WarpState& w) {
  const unsigned mask = w.mask;
  uint64_t ballot = 0;
  for (int l = 0; l < 32; ++l)
    if (mask >> l & 1u && w.in[l]) ballot |= uint64_t{1} << l;
  for (int l = 0; l < 32; ++l) {
    if (!(mask >> l & 1u)) continue;
    switch (w.op) {
      case WarpOp::kBallot: w.out[l] = ballot; break;
      case WarpOp::kAll: w.out[l] = ballot == mask; break;
      case WarpOp::kAny: w.out[l] = ballot != 0; break;
      case WarpOp::kSyncwarp:
      case WarpOp::kMma: w.out[l] = 0; break;
      default: {
        const int src = w.src[l];
        if (!(mask >> src & 1u)) {
          const std::string what = std::string(op_name(w.op)) + ": lane " + std::to_string(l) + " reads lane " +
                                   std::to_string(src) + ", which is " +
                                   ((w.exited >> src & 1u) || !(w.present >> src & 1u) ? "exited" : "not in the mask");
          hazard(w.site, what.c_str());
        }
        w.out[l] = w.in[src];
      }
    }
  }
  if (w.op == WarpOp::kMma) w.compute(w.payload);
  w.pending = false;
  w.arrived = 0;
  ++w.generation;
}

void fiber_main() {
  Fiber* self = emulator.current;
  (*emulator.body)();
  // Exit: a finished thread counts as arrived at every later barrier.
  self->wait = Wait::kDone;
  Block& b = emulator.block;
  ++b.exited;
  WarpState& w = b.warps[self->info.warp];
  w.exited |= 1u << self->info.lane;
  if (w.pending && (w.mask >> self->info.lane & 1u)) {
    const std::string what = describe_thread(*self) + " exited while its warp waits for it at " + op_name(w.op) + " (mask " +
                             std::to_string(w.mask) + ")";
    hazard(w.site, what.c_str());
  }
  if (b.arrived > 0 && b.arrived + b.exited == b.threads) release_barrier(b.barrier_site);
  // Returning resumes uc_link: the scheduler.
}

bool runnable(const Fiber& f) {
  switch (f.wait) {
    case Wait::kReady: return true;
    case Wait::kBarrier: return emulator.block.barrier_generation != f.generation;
    case Wait::kWarp: return emulator.block.warps[f.info.warp].generation != f.generation;
    case Wait::kDone: return false;
  }
  return false;
}

std::string deadlock_report() {
  std::string report = "deadlock: no thread can proceed;";
  int listed = 0;
  for (const auto& f : *emulator.block.fibers) {
    if (f.wait == Wait::kDone) continue;
    if (listed++ == 4) {
      report += " ...";
      break;
    }
    report += " " + describe_thread(f) + " waits at " + (f.wait == Wait::kBarrier ? "__syncthreads" : "a warp collective") +
              " (" + where(f.site) + ");";
  }
  return report;
}

// Runs one block to completion (or to a hazard).
void run_block(uint3 index) {
  Emulator& em = emulator;
  Block& b = em.block;
  const unsigned threads = em.block_dim.x * em.block_dim.y * em.block_dim.z;
  b.index = index;
  b.threads = threads;
  b.arrived = b.exited = 0;
  b.barrier_generation = 0;
  b.barrier_site = Site{nullptr, 0};
  b.warps.assign((threads + 31) / 32, WarpState{});
  b.fibers = &em.fibers;
  if (em.fibers.size() < threads) em.fibers.resize(threads);
  for (unsigned t = 0; t < threads; ++t) {
    Fiber& f = em.fibers[t];
    if (f.stack == nullptr) {
      void* stack = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (stack == MAP_FAILED) {
        em.failed = true;
        em.failure = "cannot allocate a fiber stack";
        return;
      }
      f.stack = static_cast<char*>(stack);
    }
    f.info.thread_idx = uint3{t % em.block_dim.x, (t / em.block_dim.x) % em.block_dim.y, t / (em.block_dim.x * em.block_dim.y)};
    f.info.linear = t;
    f.info.lane = t % 32;
    f.info.warp = t / 32;
    f.wait = Wait::kReady;
    f.generation = 0;
    f.site = Site{nullptr, 0};
    b.warps[t / 32].present |= 1u << (t % 32);
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack;
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = &em.scheduler;
    makecontext(&f.context, fiber_main, 0);
  }
  for (auto& w : b.warps) w.exited = ~w.present;  // absent lanes of a partial warp count as exited
  if (!em.shared.empty()) std::fill(em.shared.begin() + kRedZone, em.shared.end() - kRedZone, kUninitialisedShared);

  std::vector<unsigned> order(threads);
  std::iota(order.begin(), order.end(), 0u);
  if (em.schedule == Schedule::kReverse) std::reverse(order.begin(), order.end());
  std::mt19937_64 random(em.seed ^ (uint64_t{index.x} * 0x9e3779b97f4a7c15ull) ^ (uint64_t{index.y} << 32) ^ index.z);
  unsigned done = 0;
  while (done < threads && !em.failed) {
    if (em.schedule == Schedule::kRandom) std::shuffle(order.begin(), order.end(), random);
    bool progressed = false;
    for (unsigned t : order) {
      Fiber& f = em.fibers[t];
      if (!runnable(f)) continue;
      progressed = true;
      f.wait = Wait::kReady;
      em.current = &f;
      swapcontext(&em.scheduler, &f.context);
      em.current = nullptr;
      if (em.failed) return;
      if (f.wait == Wait::kDone) ++done;
    }
    if (!progressed && done < threads) {
      em.failed = true;
      em.failure = deadlock_report();
    }
  }
  if (!em.failed) {
    try {
      check_red_zones(Site{"end of block", 0});
    } catch (...) {
    }
  }
}

}  // namespace

void set_schedule(Schedule order, uint64_t seed) {
  emulator.schedule = order;
  emulator.seed = seed;
}

const ThreadInfo& this_thread() { return emulator.current->info; }
const uint3& block_idx() { return emulator.block.index; }
const dim3& block_dim() { return emulator.block_dim; }
const dim3& grid_dim() { return emulator.grid; }
void* dynamic_shared() { return emulator.shared.empty() ? nullptr : emulator.shared.data() + kRedZone; }

void hazard(Site site, const char* what) {
  Emulator& em = emulator;
  em.failed = true;
  em.failure = "CUDA emulation hazard at " + where(site) + ": " + what;
  if (em.current == nullptr) throw std::runtime_error(em.failure);  // outside a fiber (the end-of-block check)
  // Abandon this fiber: the scheduler sees `failed` and ends the launch.
  Fiber* self = em.current;
  self->wait = Wait::kDone;
  setcontext(&em.scheduler);
  std::abort();
}

void syncthreads(Site site) {
  Fiber* self = emulator.current;
  Block& b = emulator.block;
  if (b.arrived == 0) {
    b.barrier_site = site;
  } else if (b.barrier_site.line != site.line || std::strcmp(b.barrier_site.file, site.file) != 0) {
    const std::string what = describe_thread(*self) + " is at __syncthreads at " + where(site) + " while others wait at " +
                             where(b.barrier_site);
    hazard(site, what.c_str());
  }
  self->wait = Wait::kBarrier;
  self->generation = b.barrier_generation;
  self->site = site;
  ++b.arrived;
  if (b.arrived + b.exited == b.threads) release_barrier(site);
  yield();
}

namespace {
WarpState& join_collective(Site site, WarpOp op, unsigned mask) {
  Fiber* self = emulator.current;
  WarpState& w = emulator.block.warps[self->info.warp];
  const unsigned lane = self->info.lane;
  if (!(mask >> lane & 1u)) hazard(site, (std::string(op_name(op)) + ": the calling lane is not in the mask").c_str());
  if (mask & w.exited) {
    const std::string what = std::string(op_name(op)) + ": the mask names exited lanes (" + std::to_string(mask & w.exited) + ")";
    hazard(site, what.c_str());
  }
  if (!w.pending) {
    w.pending = true;
    w.op = op;
    w.site = site;
    w.mask = mask;
    w.arrived = 0;
  } else if (w.op != op || w.mask != mask || w.site.line != site.line || std::strcmp(w.site.file, site.file) != 0) {
    // __syncwarp may legally be reached from different places; everything else must match.
    if (!(op == WarpOp::kSyncwarp && w.op == op && w.mask == mask)) {
      const std::string what = describe_thread(*self) + " reaches " + op_name(op) + " at " + where(site) +
                               " while lanes of its warp wait at " + op_name(w.op) + " at " + where(w.site);
      hazard(site, what.c_str());
    }
  }
  return w;
}

void wait_for(WarpState& w, Site site) {
  Fiber* self = emulator.current;
  self->wait = Wait::kWarp;
  self->generation = w.generation;
  self->site = site;
  w.arrived |= 1u << self->info.lane;
  if (w.arrived == w.mask) complete_collective(w);
  yield();
}
}  // namespace

uint64_t warp_collective(Site site, WarpOp op, unsigned mask, uint64_t value, int src_lane) {
  WarpState& w = join_collective(site, op, mask);
  const unsigned lane = emulator.current->info.lane;
  w.in[lane] = value;
  w.src[lane] = src_lane;
  wait_for(w, site);
  return w.out[lane];
}

void warp_compute(Site site, unsigned mask, void* payload, WarpCompute compute) {
  WarpState& w = join_collective(site, WarpOp::kMma, mask);
  if (w.arrived == 0) w.compute = compute;
  w.payload[emulator.current->info.lane] = payload;
  wait_for(w, site);
}

void run_grid(const char* name, dim3 grid, dim3 block, size_t shared_bytes, const std::function<void()>& body) {
  Emulator& em = emulator;
  if (em.current != nullptr) throw std::logic_error("cuda emulation: a kernel launched from a kernel");
  if (em.last_error != cudaSuccess) return;  // sticky: nothing runs after a failed launch
  const unsigned threads = block.x * block.y * block.z;
  if (threads == 0 || threads > kMaxThreads || grid.x == 0 || grid.y == 0 || grid.z == 0) {
    em.last_error = cudaErrorInvalidValue;
    em.last_message = std::string("invalid launch configuration of ") + name;
    return;
  }
  ++em.launches[name];
  em.grid = grid;
  em.block_dim = block;
  em.body = &body;
  em.failed = false;
  em.shared_bytes = shared_bytes;
  em.shared.assign(shared_bytes ? shared_bytes + 2 * kRedZone : 0, kRedZoneByte);
  for (unsigned z = 0; z < grid.z && !em.failed; ++z)
    for (unsigned y = 0; y < grid.y && !em.failed; ++y)
      for (unsigned x = 0; x < grid.x && !em.failed; ++x) {
        try {
          run_block(uint3{x, y, z});
        } catch (const std::exception& error) {
          em.failed = true;
          em.failure = error.what();
        }
      }
  em.body = nullptr;
  if (em.failed) {
    em.last_error = cudaErrorLaunchFailure;
    em.last_message = std::string(name) + ": " + em.failure;
  }
}

cudaError_t take_last_error() {
  const cudaError_t error = emulator.last_error;
  emulator.last_error = cudaSuccess;
  return error;
}
cudaError_t peek_last_error() { return emulator.last_error; }
void set_last_error(cudaError_t error) { emulator.last_error = error; }

const char* error_string(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return emulator.last_message.empty() ? "invalid argument" : emulator.last_message.c_str();
    default: return emulator.last_message.c_str();
  }
}

std::string launch_summary() {
  std::string s;
  for (const auto& [name, count] : emulator.launches) s += name + "\t" + std::to_string(count) + "\n";
  return s;
}

}  // namespace cuda_emulation

// ---- -fsanitize=bounds without libubsan ---------------------------------------------------------
// The emulated kernels are compiled with -fsanitize=bounds (tests/cuda_emulation/__init__.py): GCC
// checks every index into an array whose bound it knows (a static __shared__ array, a thread's
// register array, an array member of a struct in shared memory) and calls the handler below on an
// index outside it. The handler raises a hazard, so nothing links libubsan. The data layout is
// GCC's (and clang's) ubsan ABI: a source location, then the array and index type descriptors.
namespace {
struct UbsanLocation {
  const char* file;
  uint32_t line, column;
};
struct UbsanType {
  uint16_t kind, info;  // kind 0: integer; info: bit 0 signed, bits 1.. log2(bit width)
  char name[1];
};
struct UbsanOutOfBounds {
  UbsanLocation location;
  const UbsanType* array_type;
  const UbsanType* index_type;
};

std::string index_value(const UbsanType* type, uintptr_t handle) {
  const unsigned bits = 1u << (type->info >> 1);
  if (type->kind != 0 || bits > 64) return "?";  // wider integers are passed by pointer
  if (type->info & 1u) {
    const int64_t value = bits == 64 ? static_cast<int64_t>(handle)
                                     : static_cast<int64_t>(handle << (64 - bits)) >> (64 - bits);
    return std::to_string(value);
  }
  return std::to_string(bits == 64 ? uint64_t{handle} : uint64_t{handle} & ((uint64_t{1} << bits) - 1));
}

[[noreturn]] void out_of_bounds(const UbsanOutOfBounds* data, uintptr_t index) {
  const std::string what = "index " + index_value(data->index_type, index) + " out of bounds for type " +
                           data->array_type->name;
  cuda_emulation::hazard(cuda_emulation::Site{data->location.file, static_cast<int>(data->location.line)}, what.c_str());
}
}  // namespace

extern "C" void __ubsan_handle_out_of_bounds(const UbsanOutOfBounds* data, uintptr_t index) { out_of_bounds(data, index); }
extern "C" void __ubsan_handle_out_of_bounds_abort(const UbsanOutOfBounds* data, uintptr_t index) {
  out_of_bounds(data, index);
}
