"""Names shared by the Python layer and the kernels, defined once here (and once for
C++ and CUDA in csrc/constants.h; tests/test_constants.py checks that the two agree).
The Triton kernels take these values from here."""

import enum


class Kind(enum.IntEnum):
    """Which loss the logit kernels compute."""

    CROSS_ENTROPY = 0
    MSE_LOGITS = 1  # squared error of the logits against one-hot targets
    MSE_PROBS = 2  # squared error of the softmax probabilities against one-hot targets


class Sum(enum.IntEnum):
    """Columns of the squared sums of :func:`spkern.multi_tensor_norms` (the first four)
    and :func:`spkern.pair_stats` (all five); read them by name: ``out[:, Sum.DIFF_SQ]``."""

    A_SQ = 0  # ||a||^2
    B_SQ = 1  # ||b||^2
    DIFF_SQ = 2  # ||a - b||^2
    DOT = 3  # <a, b>
    ZEROS = 4  # entries of a that are exactly 0 (pair_stats only)


NORM_COLUMNS = tuple(s.name.lower() for s in Sum)[:4]
PAIR_COLUMNS = tuple(s.name.lower() for s in Sum)
