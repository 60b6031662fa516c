"""Triton kernels of spkern (installed as ``spkern.kernels``).

Import through ``spkern._backend.triton_kernels()``, which turns on the Triton
interpreter on machines without a GPU so that the same kernels run on CPU tensors.
"""
