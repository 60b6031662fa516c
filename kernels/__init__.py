"""Triton kernels of spkern (installed as ``spkern.kernels``).

Import through ``spkern.registry.triton_kernels()`` (spkern turns on the Triton
interpreter on machines without a GPU, so that the same kernels run on CPU tensors).
"""
