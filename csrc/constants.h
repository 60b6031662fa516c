// Names shared by the C++ (csrc/cpu) and CUDA (csrc/cuda) kernels, defined once: the loss
// kind and the columns of the squared sums. Their Python twins are in spkern/constants.py;
// tests/test_constants.py checks that the two agree (through spkern._C.constants()).
// No torch headers: the .cu files include it and compile with nvcc alone.
#pragma once

namespace spkern {

// Which loss the logit kernels compute: cross-entropy, or the squared error against
// one-hot targets of the logits or of the softmax probabilities.
enum class Kind : int { kCrossEntropy = 0, kMseLogits = 1, kMseProbs = 2 };

// Columns of the sums of multi_tensor_norms (the first four) and pair_stats (all five):
// ||a||^2, ||b||^2, ||a - b||^2, <a, b>, the number of exact zeros of a.
enum Sum : int { kASq = 0, kBSq = 1, kDiffSq = 2, kDot = 3, kZeros = 4 };
constexpr int kNormColumns = 4;
constexpr int kPairColumns = 5;

}  // namespace spkern
