// Deliberately broken kernels, one per hazard the emulation checks, so that the tests can prove
// each check fires (and a correct twin, so that they can prove it does not fire otherwise).
// torch.ops.cuda_emulation.run_hazard_kernel(name) -> the launch's error message, "" if none.

#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>

#include <cuda_runtime.h>
#include <mma.h>

namespace {

constexpr unsigned kFull = 0xffffffffu;

__global__ void divergent_shuffle_kernel(float* out) {
  float v = threadIdx.x;
  if (threadIdx.x % 32 < 16) v = __shfl_xor_sync(kFull, v, 1);
  else v = __shfl_xor_sync(kFull, v, 2);
  out[threadIdx.x] = v;
}

__global__ void shuffle_reads_exited_lane_kernel(float* out) {
  const unsigned lane = threadIdx.x % 32;
  if (lane >= 16) return;
  out[threadIdx.x] = __shfl_sync(0x0000ffffu, float(lane), lane + 16);
}

__global__ void mask_names_exited_lane_kernel(float* out) {
  if (threadIdx.x % 32 >= 16) return;
  out[threadIdx.x] = __shfl_xor_sync(kFull, 1.f, 1);
}

__global__ void divergent_barrier_kernel(float* out) {
  if (threadIdx.x < 32) {
    out[threadIdx.x] = 1.f;
    __syncthreads();
  } else {
    __syncthreads();
  }
}

__global__ void barrier_against_collective_kernel(float* out) {  // a deadlock: no thread can go on
  if (threadIdx.x == 0) out[0] = __shfl_sync(kFull, 1.f, 0);
  else __syncthreads();
}

__global__ void shared_out_of_bounds_kernel(float* out) {
  SM4_DYNAMIC_SHARED(float, shared);  // blockDim.x floats
  shared[threadIdx.x + 1] = 1.f;      // the last thread writes one past the end
  __syncthreads();
  out[threadIdx.x] = shared[threadIdx.x];
}

__global__ void static_shared_out_of_bounds_kernel(float* out) {  // caught by -fsanitize=bounds
  __shared__ float tile[64];
  tile[threadIdx.x + 1] = 1.f;  // blockDim.x = 64: the last thread writes tile[64]
  __syncthreads();
  out[threadIdx.x] = tile[threadIdx.x];
}

__global__ void shared_in_bounds_kernel(float* out) {
  SM4_DYNAMIC_SHARED(float, shared);
  shared[threadIdx.x] = 1.f;
  __syncthreads();
  out[threadIdx.x] = shared[(threadIdx.x + 1) % blockDim.x];
}

__global__ void wmma_misaligned_kernel(float* out) {
  namespace wmma = nvcuda::wmma;
  __shared__ __align__(32) __half tile[16 * 16 + 8];
  for (int i = threadIdx.x; i < 16 * 16 + 8; i += 32) tile[i] = __float2half(1.f);
  __syncwarp();
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> a;
  wmma::load_matrix_sync(a, tile + 1, 16);  // 2 bytes off the required 32-byte alignment
  out[threadIdx.x] = __half2float(a.x[0]);
}

__global__ void wmma_product_kernel(float* out) {  // a correct 16 x 16 x 16 product: out = A @ B
  namespace wmma = nvcuda::wmma;
  __shared__ __align__(32) __half a_tile[16 * 16];
  __shared__ __align__(32) __half b_tile[16 * 16];
  for (int i = threadIdx.x; i < 256; i += 32) {
    a_tile[i] = __float2half(float(i % 7) - 3.f);
    b_tile[i] = __float2half(float(i % 5) * 0.5f);
  }
  __syncwarp();
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> a;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> b;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> c;
  wmma::fill_fragment(c, 0.f);
  wmma::load_matrix_sync(a, a_tile, 16);
  wmma::load_matrix_sync(b, b_tile, 16);
  wmma::mma_sync(c, a, b, c);
  wmma::store_matrix_sync(out, c, 16, wmma::mem_row_major);
}

// Thread t publishes t + 1 and reads its neighbour's value: without the barrier the result depends
// on the order the threads run in.
__global__ void neighbour_exchange_kernel(int* out, bool with_barrier) {
  SM4_DYNAMIC_SHARED(int, published);
  published[threadIdx.x] = threadIdx.x + 1;
  if (with_barrier) __syncthreads();
  out[threadIdx.x] = published[(threadIdx.x + 1) % blockDim.x];
}

std::string run_hazard_kernel(const std::string& name) {
  at::Tensor out = at::zeros({256}, at::kFloat);
  float* p = out.data_ptr<float>();
  if (name == "divergent_shuffle") SM4_LAUNCH(1, 64, 0, nullptr, divergent_shuffle_kernel)(p);
  else if (name == "shuffle_reads_exited_lane") SM4_LAUNCH(1, 32, 0, nullptr, shuffle_reads_exited_lane_kernel)(p);
  else if (name == "mask_names_exited_lane") SM4_LAUNCH(1, 32, 0, nullptr, mask_names_exited_lane_kernel)(p);
  else if (name == "divergent_barrier") SM4_LAUNCH(1, 64, 0, nullptr, divergent_barrier_kernel)(p);
  else if (name == "barrier_against_collective") SM4_LAUNCH(1, 64, 0, nullptr, barrier_against_collective_kernel)(p);
  else if (name == "shared_out_of_bounds") SM4_LAUNCH(1, 64, 64 * sizeof(float), nullptr, shared_out_of_bounds_kernel)(p);
  else if (name == "static_shared_out_of_bounds") SM4_LAUNCH(1, 64, 0, nullptr, static_shared_out_of_bounds_kernel)(p);
  else if (name == "shared_in_bounds") SM4_LAUNCH(1, 64, 64 * sizeof(float), nullptr, shared_in_bounds_kernel)(p);
  else if (name == "wmma_misaligned") SM4_LAUNCH(1, 32, 0, nullptr, wmma_misaligned_kernel)(p);
  else TORCH_CHECK(false, "cuda_emulation.run_hazard_kernel: unknown kernel ", name);
  const cudaError_t status = cudaGetLastError();
  return status == cudaSuccess ? std::string() : std::string(cudaGetErrorString(status));
}

at::Tensor wmma_product() {
  at::Tensor out = at::zeros({16, 16}, at::kFloat);
  SM4_LAUNCH(1, 32, 0, nullptr, wmma_product_kernel)(out.data_ptr<float>());
  const cudaError_t status = cudaGetLastError();
  TORCH_CHECK(status == cudaSuccess, cudaGetErrorString(status));
  return out;
}

at::Tensor neighbour_exchange(int64_t threads, bool with_barrier) {
  at::Tensor out = at::zeros({threads}, at::kInt);
  SM4_LAUNCH(1, threads, threads * sizeof(int), nullptr, neighbour_exchange_kernel)(out.data_ptr<int>(), with_barrier);
  const cudaError_t status = cudaGetLastError();
  TORCH_CHECK(status == cudaSuccess, cudaGetErrorString(status));
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(cuda_emulation, m) {
  m.def("run_hazard_kernel(str name) -> str", &run_hazard_kernel);
  m.def("wmma_product() -> Tensor", &wmma_product);
  m.def("neighbour_exchange(int threads, bool with_barrier) -> Tensor", &neighbour_exchange);
}
