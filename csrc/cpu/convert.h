// Conversions between reduced-precision rows and float32 buffers, vectorised with ATen's
// Vectorized for the instruction set the including file is compiled for.
#pragma once

#include "kernels.h"

// (functional.h: the BFloat16/Half specialisations of convert_{to,from}_float, which vec.h only
// declares; without them an AVX-512 copy links against a symbol nothing defines)
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <type_traits>

namespace spkern {
namespace cpu {
namespace CPU_CAPABILITY {
namespace {

// Elements [0, n) of src as float, in dst.
template <typename scalar_t>
inline void load_row(const scalar_t* src, float* dst, int64_t n) {
  using bVec = at::vec::Vectorized<scalar_t>;
  using fVec = at::vec::Vectorized<float>;
  int64_t i = 0;
  for (; i + bVec::size() <= n; i += bVec::size()) {
    auto [a, b] = at::vec::convert_to_float<scalar_t>(bVec::loadu(src + i));
    a.store(dst + i);
    b.store(dst + i + fVec::size());
  }
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

// Elements [0, n) of the float row src, rounded to nearest even into dst.
template <typename scalar_t>
inline void store_row(const float* src, scalar_t* dst, int64_t n) {
  using bVec = at::vec::Vectorized<scalar_t>;
  using fVec = at::vec::Vectorized<float>;
  int64_t i = 0;
  for (; i + bVec::size() <= n; i += bVec::size()) {
    auto a = fVec::loadu(src + i);
    auto b = fVec::loadu(src + i + fVec::size());
    at::vec::convert_from_float<scalar_t>(a, b).store(dst + i);
  }
  for (; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i]);
}

// Elements [0, n) of src as float: src itself when it is float, else buf after load_row.
template <typename scalar_t>
inline const float* as_float(const scalar_t* src, float* buf, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return src;
  } else {
    load_row(src, buf, n);
    return buf;
  }
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace spkern
