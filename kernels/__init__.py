"""Triton kernels of spkern (installed as ``spkern.kernels``).

Import through ``spkern.registry.triton_kernels()`` (spkern turns on the Triton
interpreter on machines without a GPU, so that the same kernels run on CPU tensors).

Imported as a top-level ``kernels`` (the checkout's root on ``sys.path``: ``python -m
pytest``, a script or ``python -c`` run there), this folder would stand in the way of
Hugging Face's ``kernels`` package, which transformers imports: it hands the import over
to the next ``kernels`` on the path, or says what it is.
"""


def _hand_over():
    import importlib.machinery
    import importlib.util
    import os
    import sys

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != here]
    spec = importlib.machinery.PathFinder.find_spec("kernels", path)
    if spec is None:
        del sys.modules["kernels"]
        raise ModuleNotFoundError("No module named 'kernels': the folder kernels/ of spkern's checkout holds its "
                                  "Triton kernels (imported as spkern.kernels), and Hugging Face's `kernels` package "
                                  "is not installed", name="kernels")
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = module  # (what the import statement returns: the import system reads it back)
    spec.loader.exec_module(module)


if __name__ == "kernels":
    _hand_over()
