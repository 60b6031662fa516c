// This instruction set's copy of the CPU kernels, for csrc/cpu_dispatch.cpp.
#include "kernels.h"

namespace spkern {
namespace cpu {
namespace CPU_CAPABILITY {

extern const Kernels kernels{
#if defined(CPU_CAPABILITY_AVX512)
    "avx512",
#elif defined(CPU_CAPABILITY_AVX2)
    "avx2",
#else
    "default",
#endif
    &cross_entropy_fwd, &logit_grad, &multi_tensor_norms, &pair_stats, &multi_pair_stats, &gram_matvec,
    &sgd_step, &adamw_step};

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace spkern
