"""The peer libraries the loss benchmarks measure spkern against, behind one interface.

Each peer is imported only where it is measured (in the benchmark's subprocess). A peer that
is not installed, or does not run on the device, raises `Skip` with the reason, which the
benchmark prints in place of a row; nothing else is caught, so a peer that installs but fails
is reported as failed, with its error.

    cross_entropy(name, device)          -> fn(logits, target) -> scalar mean loss
    linear_cross_entropy(name, device)   -> fn(x, weight, target) -> scalar mean loss
    versions()                           -> {package: version} of the peers installed

Peers (the GPU machine has no package registry: `bash bench/peer_wheels.sh` saves the wheels
under .whl/, and bench/gpu_run.sh installs them from there):
    Liger Kernel        liger-kernel         Triton; GPU only (CE and fused linear CE)
    quack               quack-kernels        CuTe DSL; Hopper/Blackwell only (CE and linear CE)
    cut-cross-entropy   cut-cross-entropy    Triton on GPU ("cce"), torch.compile on CPU (linear CE)
"""

import importlib.metadata

PACKAGES = {"Liger Kernel": "liger-kernel", "quack": "quack-kernels", "cut-cross-entropy": "cut-cross-entropy"}
CROSS_ENTROPY = ["Liger Kernel", "quack"]
LINEAR_CROSS_ENTROPY = ["cut-cross-entropy", "Liger Kernel", "quack"]


class Skip(Exception):
    """The peer cannot be measured here (not installed, or not on this device)."""


def versions():
    found = {}
    for package in PACKAGES.values():
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def _import(name, module):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise Skip(f"{PACKAGES[name]} is not installed ({e})") from None


def _gpu_only(name, device):
    if device != "cuda":
        raise Skip(f"{name} runs on GPUs only")


def cross_entropy(name, device):
    if name == "Liger Kernel":
        _gpu_only(name, device)
        liger = _import(name, "liger_kernel.transformers.functional")
        return liger.liger_cross_entropy  # (writes the logits' gradient into the logits)
    if name == "quack":
        _gpu_only(name, device)
        quack = _import(name, "quack.cross_entropy")
        return quack.cross_entropy
    raise ValueError(f"unknown cross-entropy peer {name!r}; choose from {CROSS_ENTROPY}")


def linear_cross_entropy(name, device):
    if name == "cut-cross-entropy":
        cce = _import(name, "cut_cross_entropy")
        impl = "cce" if device == "cuda" else "torch_compile"
        return lambda x, w, t: cce.linear_cross_entropy(x, w, t, impl=impl)
    if name == "Liger Kernel":
        _gpu_only(name, device)
        liger = _import(name, "liger_kernel.transformers.functional")
        return lambda x, w, t: liger.liger_fused_linear_cross_entropy(x, w, t)
    if name == "quack":
        _gpu_only(name, device)
        quack = _import(name, "quack.linear_cross_entropy")
        return lambda x, w, t: quack.chunked_linear_cross_entropy(x, w, t)
    raise ValueError(f"unknown linear cross-entropy peer {name!r}; choose from {LINEAR_CROSS_ENTROPY}")
