// Multi-tensor pair norms, CUDA: per tensor ||a - b||^2, ||a||^2, ||b||^2, <a, b>.
// One block per chunk of one tensor (tensors read through a pointer table, so one
// launch covers a whole group), then one thread per tensor adds its chunks in order
// (deterministic, no atomics).

#include "norms.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace spkern {
namespace cuda {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float load_as_float(const void* p, int64_t i, DType t) {
  switch (t) {
    case DType::kFloat16: return __half2float(static_cast<const __half*>(p)[i]);
    case DType::kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

__global__ void __launch_bounds__(kThreads) chunk_kernel(MultiNormArgs a) {
  __shared__ float smem[4][kThreads / 32];
  const int64_t w = blockIdx.x;
  const int64_t t = a.work_t[w];
  const void* x = reinterpret_cast<const void*>(a.a_ptrs[t]);
  const void* y = a.b_ptrs ? reinterpret_cast<const void*>(a.b_ptrs[t]) : nullptr;
  float s[kNormColumns] = {0.f, 0.f, 0.f, 0.f};  // by column: Sum (csrc/constants.h)
  for (int64_t i = a.work_start[w] + threadIdx.x; i < a.work_end[w]; i += kThreads) {
    const float xv = load_as_float(x, i, a.a_dtype);
    s[kASq] += xv * xv;
    if (y) {
      const float yv = load_as_float(y, i, a.b_dtype), d = xv - yv;
      s[kDiffSq] += d * d;
      s[kBSq] += yv * yv;
      s[kDot] += xv * yv;
    }
  }
  if (!y) s[kDiffSq] = s[kASq];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int k = 0; k < 4; ++k) {
    float v = s[k];
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
    if (lane == 0) smem[k][warp] = v;
  }
  __syncthreads();
  if (threadIdx.x < 4) {
    float v = 0.f;
    for (int j = 0; j < kThreads / 32; ++j) v += smem[threadIdx.x][j];
    a.partial[4 * w + threadIdx.x] = v;
  }
}

__global__ void reduce_kernel(MultiNormArgs a) {
  const int64_t g = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (g >= a.n_group) return;
  double s[4] = {0, 0, 0, 0};
  for (int64_t w = a.first[g]; w < a.last[g]; ++w)
    for (int k = 0; k < 4; ++k) s[k] += a.partial[4 * w + k];
  for (int k = 0; k < 4; ++k) a.out[4 * a.out_rows[g] + k] = static_cast<float>(s[k]);
}

}  // namespace

const char* launch_multi_tensor_norms(const MultiNormArgs& args, void* stream) {
  if (args.n_work == 0) return nullptr;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  chunk_kernel<<<static_cast<unsigned>(args.n_work), kThreads, 0, s>>>(args);
  reduce_kernel<<<static_cast<unsigned>((args.n_group + 127) / 128), 128, 0, s>>>(args);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace cuda
}  // namespace spkern
