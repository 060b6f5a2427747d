"""Build of timesformer-kernels: pure Python plus, when a CUDA toolchain is found, the
CUDA C++ extension ``timesformer_kernels._C`` (sm_80 and sm_90a only, built with ninja).

TK_BUILD_CUDA=1 forces the extension (the build fails if it cannot be made), TK_BUILD_CUDA=0
skips it, unset builds it when torch is importable and nvcc is found (CUDA_HOME or
/usr/local/cuda). Install with ``pip install --no-build-isolation -e .`` so that the build
sees the torch you run with.
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _version() -> str:
    with open(os.path.join(ROOT, "timesformer_kernels", "_version.py")) as f:
        return f.read().split('"')[1]


def _find_nvcc():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = [home] if home else []
    candidates.append("/usr/local/cuda")
    for c in candidates:
        nvcc = os.path.join(c, "bin", "nvcc")
        if os.path.exists(nvcc):
            return c
    return None


def _cuda_extension():
    """The extension and build_ext class, or (None, None) with a one-line reason printed."""
    want = os.environ.get("TK_BUILD_CUDA", "").strip()
    if want == "0":
        print("timesformer-kernels: TK_BUILD_CUDA=0, skipping the CUDA extension", file=sys.stderr)
        return None, None
    try:
        import torch  # noqa: F401
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError:
        reason = "torch is not importable in the build environment (use --no-build-isolation)"
    else:
        home = _find_nvcc()
        if home is not None:
            os.environ.setdefault("CUDA_HOME", home)
            # Only the GPUs that matter: Ampere (sm_80) and Hopper (sm_90a).
            os.environ["TORCH_CUDA_ARCH_LIST"] = os.environ.get("TK_CUDA_ARCH_LIST", "8.0;9.0a")
            sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "*.cu")))
            ext = CUDAExtension(
                "timesformer_kernels._C",
                sources,
                include_dirs=[os.path.join(ROOT, "csrc")],
                extra_compile_args={
                    # No -std: torch's BuildExtension adds the standard its headers need
                    # (C++20 for recent torch, whose ATen refuses C++17).
                    "cxx": ["-O3"],
                    "nvcc": ["-O3", "--use_fast_math", "-lineinfo",
                             "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                             "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"],
                },
            )
            jobs = os.environ.get("MAX_JOBS") or str(max(1, min(os.cpu_count() or 1, 8)))
            os.environ["MAX_JOBS"] = jobs
            return ext, BuildExtension
        reason = "no nvcc found (set CUDA_HOME)"
    if want == "1":
        raise RuntimeError(f"TK_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}")
    print(f"timesformer-kernels: skipping the CUDA extension: {reason}", file=sys.stderr)
    return None, None


ext, build_ext = _cuda_extension() if any(a.startswith(("build", "bdist", "develop", "install", "editable_wheel"))
                                          for a in sys.argv[1:]) else (None, None)

setup(
    name="timesformer-kernels",
    version=_version(),
    description="Fused Triton and CUDA kernels for TimeSformer's divided space-time attention",
    long_description=open(os.path.join(ROOT, "README.md")).read() if os.path.exists(os.path.join(ROOT, "README.md")) else "",
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["timesformer_kernels", "timesformer_kernels.*"]),
    # The tested range (README, "Supported versions"): CI runs the suite on both ends, torch
    # 2.14.1 + triton 3.8.0 (pinned) and torch 2.11.0 + triton 3.6.0 (the lent GPU machine's).
    install_requires=["torch>=2.11,<2.15"],
    extras_require={
        "triton": ["triton>=3.6,<3.9"],
        # The model families the swap-in is tested against. mmaction2 1.2.0 and its mm* pieces are
        # installed with --no-deps by scripts/bootstrap.sh (their own pins clash with transformers 5);
        # opencv..yapf are what its transformer.py needs to load.
        "test": ["pytest>=7", "hypothesis>=6", "pytest-benchmark>=4", "einops>=0.7", "numpy", "build",
                 "matplotlib>=3.7", "transformers==5.24.0", "timesformer-pytorch==0.4.1",
                 "opencv-python-headless==5.0.0.93", "addict==2.4.0", "yapf==0.43.0", "termcolor==3.3.0",
                 "rich>=13", "PyYAML>=6", "pillow>=10", "diffusers==0.42.1",
                 "peft==0.21.2",  # LoRA in tests/test_lifecycle.py (brings accelerate, whose hooks it also tests)
                 # scripts/upstream_tests.sh: what transformers' and diffusers' own tests import
                 "parameterized==0.9.0", "requests-mock==1.12.1"],
        "bench": ["matplotlib>=3.7"],
    },
    ext_modules=[ext] if ext is not None else [],
    cmdclass={"build_ext": build_ext.with_options(use_ninja=True)} if build_ext is not None else {},
    zip_safe=False,
)
