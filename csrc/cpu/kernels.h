// What every csrc/cpu file includes first: the namespace of the instruction set it is compiled
// for. setup.py compiles each csrc/cpu/*.cpp once per instruction set with CPU_CAPABILITY =
// DEFAULT, AVX2 or AVX512 and that set's compiler flags (as PyTorch builds its CPU kernels;
// ATen's Vectorized lives in at::vec::<CPU_CAPABILITY> the same way), so every definition
// here, inline functions of the headers included, lives in spkern::cpu::<CPU_CAPABILITY>: the
// copies never meet. (Inline functions of torch's and the standard headers do: the linker
// keeps the first copy, and setup.py links the DEFAULT objects first, then AVX2, then AVX512,
// so code of one set only ever calls shared code compiled for the same or a narrower set.)
#pragma once

#if !defined(CPU_CAPABILITY)
#error "csrc/cpu is compiled once per instruction set by setup.py (CPU_CAPABILITY=DEFAULT, AVX2 or AVX512)"
#endif

#include "../spkern.h"

namespace spkern {
namespace cpu {
namespace CPU_CAPABILITY {

LogitLossFwd cross_entropy_fwd;  // cross_entropy.cpp
LogitGrad logit_grad;            // logit_grad.cpp
MultiTensorNorms multi_tensor_norms;  // norms.cpp
PairStats pair_stats;            // pair_stats.cpp
MultiPairStats multi_pair_stats;
GramMatvec gram_matvec;          // gram.cpp
SgdStep sgd_step;                // optim.cpp
AdamwStep adamw_step;

// This set's kernels (table.cpp)
extern const Kernels kernels;

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace spkern
