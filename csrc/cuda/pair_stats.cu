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
  float s[kPairColumns] = {0.f, 0.f, 0.f, 0.f, 0.f};  // by column: Sum (csrc/constants.h)
  for (int64_t i = lane; i < n; i += 32) {
    const float xv = to_float(x[i]);
    s[kASq] = fmaf(xv, xv, s[kASq]);
    s[kZeros] += xv == 0.f ? 1.f : 0.f;
    if (y) {
      const float yv = to_float(y[i]), d = xv - yv;
      s[kBSq] = fmaf(yv, yv, s[kBSq]);
      s[kDiffSq] = fmaf(d, d, s[kDiffSq]);
      s[kDot] = fmaf(xv, yv, s[kDot]);
    }
  }
  if (!y) s[kDiffSq] = s[kASq];
  double d[kPairColumns];
  for (int k = 0; k < kPairColumns; ++k) {
    for (int off = 16; off > 0; off >>= 1) s[k] += __shfl_down_sync(0xffffffffu, s[k], off);
    d[k] = __shfl_sync(0xffffffffu, s[k], 0);  // the row's sums, on every lane
  }
  // A float sum that overflowed (entries beyond ~1e18) or squares that underflowed
  // (entries below ~1e-15): the row again in double (rare; the fast path stays float).
  const bool again = !isfinite(d[kASq] + d[kBSq] + d[kDiffSq]) || !isfinite(d[kDot]) ||
                     (d[kASq] < 1e-30 && d[kZeros] < double(n)) || (y && d[kBSq] < 1e-30 && d[kBSq] > 0.0);
  if (again) {  // the same on every lane of the warp
    double r2[kNormColumns] = {0.0, 0.0, 0.0, 0.0};
    for (int64_t i = lane; i < n; i += 32) {
      const double xv = to_float(x[i]), yv = y ? double(to_float(y[i])) : 0.0;
      r2[kASq] += xv * xv;
      r2[kBSq] += yv * yv;
      r2[kDiffSq] += (xv - yv) * (xv - yv);
      r2[kDot] += xv * yv;
    }
    for (int k = 0; k < kNormColumns; ++k) {
      for (int off = 16; off > 0; off >>= 1) r2[k] += __shfl_down_sync(0xffffffffu, r2[k], off);
      d[k] = r2[k];
    }
  }
  if (lane == 0)
    for (int k = 0; k < kPairColumns; ++k) out[kPairColumns * r + k] = d[k];
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
