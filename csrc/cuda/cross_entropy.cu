// Fused cross-entropy forward (+ gradient) with per-row logit statistics, CUDA.
//
// One block per row. Each thread keeps an online softmax (running max, sum of
// exponentials, sum of exp * logit) and the statistics over a strided slice of the
// row; the block merges them with warp shuffles and shared memory; a second loop,
// only when a gradient is wanted, writes d(loss)/d(logits). Definitions match
// spkern/cross_entropy.py (the reference implementation). Targets outside [0, C)
// that are not ignore_index are never read through: their row gets NaN loss and
// gradient (the Python layer raises for them on CPU tensors).

#include "cross_entropy.h"
#include "convert.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>

namespace spkern {
namespace cuda {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ float softcap_of(float x, float cap) { return cap * tanhf(x / cap); }

// Partial state of one thread (or one merged group of threads) over part of a row.
struct State {
  float m;      // max of softcapped logits
  float s;      // sum exp(x' - m)
  float t;      // sum exp(x' - m) * x'
  float s2;     // sum exp(x' - m)^2 (squared error on probabilities)
  float sq;     // sum x^2 (raw)
  float vmax;   // max raw logit
  int64_t arg;  // first index of vmax
  float lin;    // sum w_c x'_c (label smoothing)
  float tw;     // sum t'_c w_c
  float twx;    // sum t'_c w_c x'_c
  float tmax;   // max raw target probability
};

__device__ __forceinline__ State merge(const State& a, const State& b) {
  State r;
  r.m = fmaxf(a.m, b.m);
  // rescale against 0 while both maxima are -inf, so exp(-inf - -inf) never appears
  const float ref = r.m == -INFINITY ? 0.f : r.m;
  const float ea = __expf(a.m - ref), eb = __expf(b.m - ref);
  r.s = a.s * ea + b.s * eb;
  r.t = a.t * ea + b.t * eb;
  r.s2 = a.s2 * ea * ea + b.s2 * eb * eb;
  if (isnan(a.m) || isnan(b.m)) r.m = r.s = r.t = r.s2 = NAN;
  r.sq = a.sq + b.sq;
  // argmax: NaN wins, then the larger value, then the smaller index
  const bool a_first = isnan(a.vmax) ? (!isnan(b.vmax) || a.arg < b.arg)
                       : isnan(b.vmax) ? false
                       : (a.vmax > b.vmax || (a.vmax == b.vmax && a.arg < b.arg));
  r.vmax = a_first ? a.vmax : b.vmax;
  r.arg = a_first ? a.arg : b.arg;
  r.lin = a.lin + b.lin;
  r.tw = a.tw + b.tw;
  r.twx = a.twx + b.twx;
  r.tmax = fmaxf(a.tmax, b.tmax);
  return r;
}

__device__ __forceinline__ State shfl_down(const State& v, int offset) {
  State r;
  r.m = __shfl_down_sync(0xffffffffu, v.m, offset);
  r.s = __shfl_down_sync(0xffffffffu, v.s, offset);
  r.t = __shfl_down_sync(0xffffffffu, v.t, offset);
  r.s2 = __shfl_down_sync(0xffffffffu, v.s2, offset);
  r.sq = __shfl_down_sync(0xffffffffu, v.sq, offset);
  r.vmax = __shfl_down_sync(0xffffffffu, v.vmax, offset);
  r.arg = __shfl_down_sync(0xffffffffu, v.arg, offset);
  r.lin = __shfl_down_sync(0xffffffffu, v.lin, offset);
  r.tw = __shfl_down_sync(0xffffffffu, v.tw, offset);
  r.twx = __shfl_down_sync(0xffffffffu, v.twx, offset);
  r.tmax = __shfl_down_sync(0xffffffffu, v.tmax, offset);
  return r;
}

template <typename T, bool PROB, bool HAS_CAP>
__global__ void __launch_bounds__(kThreads)
    cross_entropy_fwd_kernel(CrossEntropyArgs a) {
  __shared__ State warp_state[kWarps];
  __shared__ float bcast[4];  // lse, A, B, B_y of the row, for the gradient loop
  __shared__ int norm_again;  // the float sum of squares left [1e-30, 1e30]: sum in double
  __shared__ double norm_part[kWarps];

  const int64_t row = blockIdx.x;
  const int64_t C = a.C;
  const T* x = static_cast<const T*>(a.logits) + row * a.stride_x;
  const T* tp = PROB ? static_cast<const T*>(a.target_prob) + row * a.stride_t : nullptr;
  const float eps = a.label_smoothing;
  const float eps_c = eps / float(C);
  const float cap = a.softcap;
  const float* w = a.weight;

  int64_t y = 0;
  bool valid = true, in_range = true;
  if (!PROB) {
    y = a.target[row];
    valid = y != a.ignore_index;
    in_range = !valid || (y >= 0 && y < C);
  }

  State st{-INFINITY, 0.f, 0.f, 0.f, 0.f, -INFINITY, C, 0.f, 0.f, 0.f, -INFINITY};
  for (int64_t c = threadIdx.x; c < C; c += kThreads) {
    const float xv = to_float(x[c]);
    st.sq += xv * xv;
    if (!isnan(st.vmax) && (isnan(xv) || xv > st.vmax)) {  // strict: first index wins
      st.vmax = xv;
      st.arg = c;
    }
    const float xc = HAS_CAP ? softcap_of(xv, cap) : xv;
    if (xc > st.m || isnan(xc)) {
      const float ref = isnan(xc) ? 0.f : xc;
      const float scale = st.m == -INFINITY ? 0.f : __expf(st.m - ref);
      st.s *= scale;
      st.t *= scale;
      st.s2 *= scale * scale;
      st.m = xc;
    }
    const float ref = st.m == -INFINITY ? 0.f : st.m;
    const float e = __expf(xc - ref);
    st.s += e;
    st.s2 += e * e;
    // clamped so that a -inf logit adds 0 * finite, not 0 * -inf (exp(-128) is 0 in float)
    st.t += e * fmaxf(xc, ref - 128.f);
    const float wc = w ? w[c] : 1.f;
    if (PROB) {
      float tv = to_float(tp[c]);
      st.tmax = fmaxf(st.tmax, tv);
      tv = (tv * (1.f - eps) + eps_c) * wc;
      st.tw += tv;
      st.twx += tv * xc;
    } else if (eps > 0.f) {
      st.lin += wc * xc;
    }
  }
  // block reduction: warps, then the first warp over the warp results
  for (int offset = 16; offset > 0; offset >>= 1) st = merge(st, shfl_down(st, offset));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_state[warp] = st;
  __syncthreads();

  if (warp == 0) {
    st = warp_state[lane < kWarps ? lane : 0];
    if (lane >= kWarps) st = State{-INFINITY, 0.f, 0.f, 0.f, 0.f, -INFINITY, C, 0.f, 0.f, 0.f, -INFINITY};
    for (int offset = 16; offset > 0; offset >>= 1) st = merge(st, shfl_down(st, offset));
    if (lane == 0) {
      const float scale = a.scalars[0];
      const float w_sum = a.scalars[1];
      const float lse = st.m + logf(st.s);
      float loss;
      float a_coef;
      float wy = 0.f;
      const Kind kind = a.kind;
      float py = 0.f, K = 0.f;  // squared error on probabilities: p_y, sum p^2 - p_y
      if (PROB) {
        loss = st.tw * lse - st.twx + a.z_loss * lse * lse;
        a_coef = st.tw + 2.f * a.z_loss * lse;
      } else if (!in_range) {
        loss = NAN;
        a_coef = NAN;
      } else if (valid && kind == Kind::kMseLogits) {
        const float xy = to_float(x[y]);
        loss = st.sq - 2.f * xy + 1.f;
        a_coef = 0.f;
      } else if (valid && kind == Kind::kMseProbs) {
        float xy = to_float(x[y]);
        if (HAS_CAP) xy = softcap_of(xy, cap);
        py = __expf(xy - lse);
        const float s2 = st.s2 / (st.s * st.s);
        loss = s2 - 2.f * py + 1.f;
        K = s2 - py;
        a_coef = 0.f;
      } else if (valid) {
        wy = w ? w[y] : 1.f;
        float xy = to_float(x[y]);
        if (HAS_CAP) xy = softcap_of(xy, cap);
        loss = (1.f - eps) * wy * (lse - xy) + a.z_loss * lse * lse;
        if (eps > 0.f) loss += eps_c * (w_sum * lse - st.lin);
        // the smoothing term only with smoothing: w_sum is NaN when a class weight is,
        // and that must reach the rows of that class only, as in torch
        a_coef = (1.f - eps) * wy + (eps > 0.f ? eps_c * w_sum : 0.f) + 2.f * a.z_loss * lse;
      } else {
        loss = 0.f;
        a_coef = 0.f;
      }
      a.loss[row] = loss;
      a.stats[row] = lse;
      if (a.compute_stats) {
        const int64_t S = a.stride_stats;
        a.stats[S + row] = sqrtf(st.sq);
        norm_again = !(st.sq >= 1e-30f && st.sq <= 1e30f);
        a.stats[2 * S + row] = st.vmax;
        a.stats[3 * S + row] = 1.f / st.s;
        a.stats[4 * S + row] = lse - st.t / st.s;
        bool correct;
        if (PROB) {
          correct = st.arg < C && to_float(tp[st.arg]) == st.tmax;
        } else {
          correct = valid && in_range && st.arg == y;
        }
        a.stats[5 * S + row] = correct ? 1.f : 0.f;
      }
      // d loss / d x'_c = p_c * A - B * w_c (t'_c w_c for probabilities) - B_y [c = y]
      // squared errors: d/dx_c = 2 scale x_c - 2 scale [c = y], or
      // 2 scale p_c (p_c - K) - 2 scale p_y [c = y]
      bcast[0] = lse;
      bcast[1] = (valid || PROB) ? a_coef * scale : 0.f;
      bcast[2] = (valid || PROB) ? scale : 0.f;
      bcast[3] = (valid && !PROB) ? (1.f - eps) * wy * scale : 0.f;
      if (kind != Kind::kCrossEntropy) {
        bcast[1] = valid ? K : 0.f;
        bcast[2] = valid ? 2.f * scale : 0.f;
        bcast[3] = valid ? 2.f * scale * (kind == Kind::kMseLogits ? 1.f : py) : 0.f;
        if (!in_range) bcast[2] = NAN;
      }
    }
  }
  if (threadIdx.x == 0 && !a.compute_stats) norm_again = 0;
  __syncthreads();
  if (norm_again) {  // rare (logits beyond ~1e15 or below ~1e-15): the fast path stays float
    double part = 0.0;
    for (int64_t c = threadIdx.x; c < C; c += kThreads) {
      const double xv = to_float(x[c]);
      part += xv * xv;
    }
    for (int offset = 16; offset > 0; offset >>= 1) part += __shfl_down_sync(0xffffffffu, part, offset);
    if (lane == 0) norm_part[warp] = part;
    __syncthreads();
    if (threadIdx.x == 0) {
      double total = 0.0;
      for (int k = 0; k < kWarps; ++k) total += norm_part[k];
      a.stats[a.stride_stats + row] = float(sqrt(total));
    }
  }
  if (a.grad == nullptr) return;
  const float lse = bcast[0], A = bcast[1], B = bcast[2], By = bcast[3];

  T* g = static_cast<T*>(a.grad) + row * a.stride_g;
  const Kind kind = a.kind;
  for (int64_t c = threadIdx.x; c < C; c += kThreads) {
    const float xv = to_float(x[c]);
    const float xc = HAS_CAP ? softcap_of(xv, cap) : xv;
    if (kind != Kind::kCrossEntropy) {
      float gv;
      if (kind == Kind::kMseLogits) {
        gv = B * xv;
      } else {
        const float pc = __expf(xc - lse);
        gv = B * pc * (pc - A);
      }
      if (c == y) gv -= By;
      g[c] = from_float<T>(valid ? gv : 0.f);
      continue;
    }
    float gv = __expf(xc - lse) * A;
    const float wc = w ? w[c] : 1.f;
    if (PROB) {
      gv -= (to_float(tp[c]) * (1.f - eps) + eps_c) * wc * B;
    } else {
      gv -= eps_c * wc * B;
      if (c == y) gv -= By;
    }
    if (HAS_CAP) {
      const float u = xc / cap;
      gv *= 1.f - u * u;
    }
    if (!PROB && !valid) gv = 0.f;
    g[c] = from_float<T>(gv);
  }
}

template <typename T>
void launch(const CrossEntropyArgs& a, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(a.rows));
  const bool cap = a.softcap > 0.f;
  if (a.prob) {
    if (cap) cross_entropy_fwd_kernel<T, true, true><<<grid, kThreads, 0, stream>>>(a);
    else cross_entropy_fwd_kernel<T, true, false><<<grid, kThreads, 0, stream>>>(a);
  } else {
    if (cap) cross_entropy_fwd_kernel<T, false, true><<<grid, kThreads, 0, stream>>>(a);
    else cross_entropy_fwd_kernel<T, false, false><<<grid, kThreads, 0, stream>>>(a);
  }
}

}  // namespace

const char* launch_cross_entropy_fwd(const CrossEntropyArgs& args, void* stream) {
  if (args.rows == 0) return nullptr;
  if (args.rows > 0x7fffffffLL) return "spkern cuda cross_entropy: more than 2**31 - 1 rows";
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (args.dtype) {
    case DType::kFloat32: launch<float>(args, s); break;
    case DType::kFloat16: launch<__half>(args, s); break;
    case DType::kBFloat16: launch<__nv_bfloat16>(args, s); break;
    default: return "spkern cuda cross_entropy: unsupported dtype";
  }
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace cuda
}  // namespace spkern
