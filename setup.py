"""Build spkern: the Python package, the Triton kernels (as spkern.kernels) and the
compiled extension spkern._C.

The C++ CPU kernels always build, vectorised with ATen's Vectorized<float>. On x86-64 every
file of csrc/cpu is compiled three times, for the portable instruction set and for AVX2 and
AVX-512 (ISA_FLAGS), as PyTorch compiles its own CPU kernels; the extension runs the widest
copy the CPU it is loaded on supports (csrc/cpu_dispatch.cpp), so one build runs on every
x86-64 CPU. SPKERN_CPU_ISA=default|avx2|avx512 at run time forces a narrower copy. Other
architectures build the portable copy. The CUDA kernels build only where torch has CUDA and
nvcc exists. SPKERN_SKIP_EXTENSION=1 installs the package without the extension: ./run.sh
installs spkern editable that way once and then builds the extension in place with
``setup.py build_ext --inplace``, whose ninja files in build/ make a rebuild incremental.
"""

import glob
import os
import platform
import shutil

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension

ROOT = os.path.dirname(os.path.abspath(__file__))

# Each instruction set's compiler flags, and the macro that names its copy of the kernels'
# namespace (csrc/cpu/kernels.h). csrc/cpu_dispatch.cpp lists the CPU features each needs.
ISA_FLAGS = {
    "default": ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "avx512": [
        "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
        "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512",
    ],
}


# Hot loops placed alike in every build: where a loop starts relative to 32-byte boundaries
# moved with the link order, and cost the AVX2 cross-entropy on bfloat16 3-4% against the build
# of one instruction set (AMD EPYC, bench/bench_cpu_isa.py); aligned, it is as fast.
ALIGN = ["-falign-functions=64", "-falign-loops=32"]


def isas():
    """The instruction sets the CPU kernels are compiled for, narrowest first: the link order
    (csrc/cpu/kernels.h says why it matters)."""
    return list(ISA_FLAGS) if platform.machine().lower() in ("x86_64", "amd64") else ["default"]


def _sources(folder, *patterns):
    return [os.path.relpath(p, ROOT) for pattern in patterns
            for p in sorted(glob.glob(os.path.join(ROOT, folder, pattern)))]


class BuildWithIsas(BuildExtension):
    """torch's BuildExtension that first compiles csrc/cpu once per instruction set (each into
    its own folder of build_temp, with the same compiler, flags and ninja; the three at once),
    and links those objects after the extension's own, narrowest first."""

    def build_extension(self, ext):
        from concurrent.futures import ThreadPoolExecutor

        cxx = ext.extra_compile_args["cxx"]

        def compile_for(isa):
            return self.compiler.compile(
                _sources("csrc/cpu", "*.cpp"), output_dir=os.path.join(self.build_temp, "cpu_" + isa),
                macros=ext.define_macros, include_dirs=ext.include_dirs, depends=ext.depends,
                extra_postargs={"cxx": cxx + ISA_FLAGS[isa] + ALIGN, "nvcc": []})

        # one ninja per call, all at once: each with its share of the cores (torch's MAX_JOBS,
        # unless it is set)
        given = os.environ.get("MAX_JOBS")
        if given is None:
            os.environ["MAX_JOBS"] = str((os.cpu_count() or 1) // len(isas()) + 1)
        try:
            with ThreadPoolExecutor(len(isas())) as pool:
                ext.extra_objects = [o for objects in pool.map(compile_for, isas()) for o in objects]
        finally:
            if given is None:
                del os.environ["MAX_JOBS"]
        super().build_extension(ext)


def extensions():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    # csrc/*.cpp: the bindings, the CPU kernels' dispatch and buffers, built portably;
    # csrc/cpu/*.cpp: built once per instruction set by BuildWithIsas
    sources = _sources("csrc", "*.cpp")
    # -fopenmp makes at::parallel_for parallel (it is inline OpenMP in the headers). No
    # -lgomp: the OpenMP symbols resolve to the runtime torch already loaded, so the
    # process keeps one thread pool.
    # (the C++ standard is torch's choice: it adds the -std= its headers need)
    # -ffp-contract=off: no silent fused multiply-adds, so that each float operation of
    # the fused optimizer steps rounds as the torch op it replaces (fmas are explicit).
    cxx = ["-O3", "-fopenmp", "-ffp-contract=off"]
    macros = [(f"SPKERN_CPU_{isa.upper()}", None) for isa in isas() if isa != "default"]
    # every file the objects depend on: setuptools relinks only when one is newer than the extension
    depends = _sources("csrc", "*.h", "cpu/*.cpp", "cpu/*.h", "cuda/*")
    with_cuda = (
        torch.version.cuda is not None
        and CUDA_HOME is not None
        and shutil.which("nvcc") is not None
        and os.environ.get("SPKERN_NO_CUDA", "0") != "1"
    )
    if not with_cuda:
        return [CppExtension("spkern._C", sources, define_macros=macros, depends=depends,
                             extra_compile_args={"cxx": cxx})]
    sources += _sources("csrc/cuda", "*.cpp", "*.cu")
    nvcc = ["-O3", "--use_fast_math", "-lineinfo"]
    return [
        CUDAExtension(
            "spkern._C",
            sources,
            define_macros=macros + [("SPKERN_WITH_CUDA", None)],
            depends=depends,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        )
    ]


def main():
    setup(
        name="spkern",
        version="0.1.0",
        description="Fused kernels that make width-scaling measurements (logit, update and "
        "feature-change statistics) nearly free",
        packages=["spkern", "spkern.backends", "spkern.experiments", "spkern.experiments.train", "spkern.kernels",
                  "spkern.monitor"],
        package_dir={"spkern": "spkern", "spkern.kernels": "kernels"},
        python_requires=">=3.10",
        install_requires=["torch>=2.6", "numpy", "tqdm", "matplotlib", "tensorboard", "scikit-learn"],
        extras_require={
            "triton": ["triton>=3.2"],
            "mnist1d": ["mnist1d"],
            "wandb": ["wandb"],
            "hf": ["transformers", "accelerate"],
            "lightning": ["lightning"],
            "ray": ["ray>=2.40"],
            "test": ["pytest", "pytest-benchmark", "ninja", "mnist1d"],
        },
        entry_points={"console_scripts": ["spkern = spkern.experiments.cli:run"]},
        ext_modules=[] if os.environ.get("SPKERN_SKIP_EXTENSION") == "1" else extensions(),
        cmdclass={"build_ext": BuildWithIsas.with_options(use_ninja=True)},
        zip_safe=False,
    )


if __name__ == "__main__":
    main()
