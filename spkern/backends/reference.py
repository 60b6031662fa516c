"""The reference backend: plain PyTorch. For the logit losses, the norms and the pair
statistics it computes in float64 and is the ground truth every kernel is tested against;
for paired_linear and the power iteration it is the float32 torch products. It implements
no optimizer step: spkern.optim then runs torch's own step and measures around it."""

from spkern.registry import register


def _torch_gram(A, B):
    A = A.float()  # (no copy for float32)
    B = B.float() if B is not None else None

    def gram(x):  # (A - B)^T (A - B) x, as two matrix-vector products with each
        y = A @ x - B @ x if B is not None else A @ x
        return A.t() @ y - B.t() @ y if B is not None else A.t() @ y
    return gram


def _paired_linear(x, w, w0):
    return tuple(None if b is None else (x.double() @ b.double().t()).float() for b in (w, w0))


def _register():
    from spkern.cross_entropy import cross_entropy_reference, logit_grad_reference
    from spkern.features import pair_by_pair, pair_stats_reference
    from spkern.norms import multi_tensor_norms_reference

    register("cross_entropy", "reference")(cross_entropy_reference)
    register("logit_grad", "reference")(logit_grad_reference)
    register("multi_tensor_norms", "reference")(multi_tensor_norms_reference)
    register("pair_stats", "reference")(pair_stats_reference)
    register("multi_pair_stats", "reference")(pair_by_pair(pair_stats_reference))
    register("paired_linear", "reference")(_paired_linear)
    register("spectral_norm", "reference")(_torch_gram)


_register()
