"""The build backend of pyproject.toml: setuptools' own, or one sentence saying what to install first.

pip imports this module with `pip install --no-build-isolation`, where nothing installs the build
requirements: without setuptools pip's message would name only the missing module.
"""

from __future__ import annotations

try:
    from setuptools import build_meta as _setuptools_build_meta
except ImportError as error:
    raise ImportError(
        "semclip-kernels builds with setuptools and torch: run `pip install setuptools wheel torch` first, "
        "then `pip install --no-build-isolation -e .` again"
    ) from error

from setuptools.build_meta import *  # noqa: F401,F403,E402  (the PEP 517/660 hooks)

__all__ = _setuptools_build_meta.__all__
