// Activation-pair statistics, CUDA: one warp per row, strided over the features, sums
// in float32 registers reduced by shuffles (again in double for a row whose float sums
// overflowed or underflowed), written in double; no atomics, deterministic.

#include "pair_stats.h"
#include "convert.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace spkern {
namespace cuda {
namespace {

constexpr int kWarps = 8;

template <typename T>
__global__ void __launch_bounds__(kWarps * 32) pair_stats_kernel(const T* a, const T* b, double* out,
                                                                 int64_t rows, int64_t n) {
  const int lane = threadIdx.x % 32;
  const int64_t r = blockIdx.x * int64_t(kWarps) + threadIdx.x / 32;
  if (r >= rows) return;
  const T* x = a + r * n;
  const T* y = b ? b + r * n : nullptr;
  float s[5] = {0.f, 0.f, 0.f, 0.f, 0.f};  // ||a||^2, ||b||^2, ||a-b||^2, <a,b>, zeros(a)
  for (int64_t i = lane; i < n; i += 32) {
    const float xv = to_float(x[i]);
    s[0] = fmaf(xv, xv, s[0]);
    s[4] += xv == 0.f ? 1.f : 0.f;
    if (y) {
      const float yv = to_float(y[i]), d = xv - yv;
      s[1] = fmaf(yv, yv, s[1]);
      s[2] = fmaf(d, d, s[2]);
      s[3] = fmaf(xv, yv, s[3]);
    }
  }
  if (!y) s[2] = s[0];
  double d[5];
  for (int k = 0; k < 5; ++k) {
    for (int off = 16; off > 0; off >>= 1) s[k] += __shfl_down_sync(0xffffffffu, s[k], off);
    d[k] = __shfl_sync(0xffffffffu, s[k], 0);  // the row's sums, on every lane
  }
  // A float sum that overflowed (entries beyond ~1e18) or squares that underflowed
  // (entries below ~1e-15): the row again in double (rare; the fast path stays float).
  const bool again = !isfinite(d[0] + d[1] + d[2]) || !isfinite(d[3]) ||
                     (d[0] < 1e-30 && d[4] < double(n)) || (y && d[1] < 1e-30 && d[1] > 0.0);
  if (again) {  // the same on every lane of the warp
    double r2[4] = {0.0, 0.0, 0.0, 0.0};
    for (int64_t i = lane; i < n; i += 32) {
      const double xv = to_float(x[i]), yv = y ? double(to_float(y[i])) : 0.0;
      r2[0] += xv * xv;
      r2[1] += yv * yv;
      r2[2] += (xv - yv) * (xv - yv);
      r2[3] += xv * yv;
    }
    for (int k = 0; k < 4; ++k) {
      for (int off = 16; off > 0; off >>= 1) r2[k] += __shfl_down_sync(0xffffffffu, r2[k], off);
      d[k] = r2[k];
    }
  }
  if (lane == 0)
    for (int k = 0; k < 5; ++k) out[5 * r + k] = d[k];
}

template <typename T>
void launch(const PairStatsArgs& p, cudaStream_t s) {
  const unsigned blocks = static_cast<unsigned>((p.rows + kWarps - 1) / kWarps);
  pair_stats_kernel<T><<<blocks, kWarps * 32, 0, s>>>(static_cast<const T*>(p.a), static_cast<const T*>(p.b),
                                                       p.out, p.rows, p.features);
}

}  // namespace

const char* launch_pair_stats(const PairStatsArgs& args, void* stream) {
  if (args.rows == 0) return nullptr;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (args.dtype) {
    case DType::kFloat16: launch<__half>(args, s); break;
    case DType::kBFloat16: launch<__nv_bfloat16>(args, s); break;
    default: launch<float>(args, s);
  }
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace cuda
}  // namespace spkern
