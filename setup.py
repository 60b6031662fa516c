"""Build spkern: the Python package, the Triton kernels (as spkern.kernels) and the
compiled extension spkern._C.

The C++ CPU kernels always build. They are vectorised with ATen's Vectorized<float>
for the widest instruction set the build machine's torch reports (AVX512, AVX2),
or built portably (scalar fallback) when it reports none; SPKERN_CPU_ISA=default|avx2|avx512
overrides the choice. The CUDA kernels build only where torch has CUDA and nvcc exists.
SPKERN_SKIP_EXTENSION=1 installs the package without the extension: ./run.sh installs
spkern editable that way once and then builds the extension in place with
``setup.py build_ext --inplace``, whose ninja files in build/ make a rebuild incremental.
"""

import glob
import json
import os
import shutil

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))

def _cpu_isa_module():
    """spkern/cpu_isa.py (the features each build needs), loaded without the package."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_spkern_cpu_isa", os.path.join(ROOT, "spkern", "cpu_isa.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ISA_FLAGS = {
    "default": [],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "avx512": [
        "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
        "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512",
    ],
}


def cpu_isa():
    import torch

    forced = os.environ.get("SPKERN_CPU_ISA")
    if forced:
        if forced not in ISA_FLAGS:
            raise SystemExit(f"SPKERN_CPU_ISA must be one of {sorted(ISA_FLAGS)}, got {forced!r}")
        return forced
    capability = torch.backends.cpu.get_cpu_capability().lower()  # "avx512", "avx2", "default", ...
    return capability if capability in ISA_FLAGS else "default"


def extensions():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    sources = [os.path.relpath(p, ROOT) for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")))]
    sources += [os.path.relpath(p, ROOT) for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))]
    # -fopenmp makes at::parallel_for parallel (it is inline OpenMP in the headers). No
    # -lgomp: the OpenMP symbols resolve to the runtime torch already loaded, so the
    # process keeps one thread pool.
    # (the C++ standard is torch's choice: it adds the -std= its headers need)
    # -ffp-contract=off: no silent fused multiply-adds, so that each float operation of
    # the fused optimizer steps rounds as the torch op it replaces (fmas are explicit).
    isa = cpu_isa()
    cxx = ["-O3", "-fopenmp", "-ffp-contract=off"] + ISA_FLAGS[isa]
    # the choice, recorded beside the package: spkern reads it before it loads the extension,
    # and does not where this CPU cannot run it (spkern/cpu_isa.py)
    assert set(ISA_FLAGS) == set(_cpu_isa_module().NEEDS)
    with open(os.path.join(ROOT, "spkern", "_build_info.json"), "w") as f:
        json.dump({"cpu_isa": isa}, f)
        f.write("\n")
    with_cuda = (
        torch.version.cuda is not None
        and CUDA_HOME is not None
        and shutil.which("nvcc") is not None
        and os.environ.get("SPKERN_NO_CUDA", "0") != "1"
    )
    if not with_cuda:
        return [CppExtension("spkern._C", sources, extra_compile_args={"cxx": cxx})]
    sources += [os.path.relpath(p, ROOT) for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")))]
    sources += [os.path.relpath(p, ROOT) for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))]
    nvcc = ["-O3", "--use_fast_math", "-lineinfo"]
    return [
        CUDAExtension(
            "spkern._C",
            sources,
            define_macros=[("SPKERN_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        )
    ]


def main():
    from torch.utils.cpp_extension import BuildExtension

    setup(
        name="spkern",
        version="0.1.0",
        description="Fused kernels that make width-scaling measurements (logit, update and "
        "feature-change statistics) nearly free",
        packages=["spkern", "spkern.backends", "spkern.experiments", "spkern.experiments.train", "spkern.kernels",
                  "spkern.monitor"],
        package_dir={"spkern": "spkern", "spkern.kernels": "kernels"},
        package_data={"spkern": ["_build_info.json"]},
        python_requires=">=3.10",
        install_requires=["torch>=2.6", "numpy", "tqdm", "matplotlib", "tensorboard", "scikit-learn"],
        extras_require={
            "triton": ["triton>=3.2"],
            "mnist1d": ["mnist1d"],
            "wandb": ["wandb"],
            "hf": ["transformers", "accelerate"],
            "lightning": ["lightning"],
            "test": ["pytest", "pytest-benchmark", "ninja", "mnist1d"],
        },
        entry_points={"console_scripts": ["spkern = spkern.experiments.cli:run"]},
        ext_modules=[] if os.environ.get("SPKERN_SKIP_EXTENSION") == "1" else extensions(),
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
        zip_safe=False,
    )


if __name__ == "__main__":
    main()
