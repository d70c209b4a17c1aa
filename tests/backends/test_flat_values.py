"""The custom ops' values (semclip_kernels/backends/flat.py): their keys, constants of every compiled graph,
change with the package's sources, so torch's compile caches never replay a graph traced by other sources."""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys
import zlib

import semclip_kernels
from semclip_kernels.backends import flat
from semclip_kernels.backends.values import Stats

PACKAGE = pathlib.Path(semclip_kernels.__file__).resolve().parent


def _copy_sources(target: pathlib.Path) -> pathlib.Path:
    shutil.copytree(PACKAGE, target, ignore=shutil.ignore_patterns("*.so", "*.build-key", "__pycache__"))
    return target


def test_fingerprint_follows_the_sources(tmp_path):
    copy = _copy_sources(tmp_path / "semclip_kernels")
    assert flat.source_fingerprint(copy) == flat.source_fingerprint(PACKAGE)
    values = copy / "backends" / "values.py"
    values.write_text(values.read_text() + "\n# one more line\n")
    assert flat.source_fingerprint(copy) != flat.source_fingerprint(PACKAGE)
    (copy / "backends" / "values.py").rename(copy / "backends" / "values_renamed.py")
    assert flat.source_fingerprint(copy) != flat.source_fingerprint(PACKAGE)


def test_value_keys_are_the_same_in_another_process():
    code = "from semclip_kernels.backends.values import Stats; print(Stats._flat_key)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PACKAGE.parent)  # fmt: skip
    assert int(out.stdout) == Stats._flat_key


def test_value_keys_change_with_the_sources(tmp_path):
    """A value's key is its qualified name hashed on top of the sources' fingerprint: a copy of the package with
    one source line more gives `Stats` another key, so a graph compiled with one version's keys as constants
    cannot match the other's."""
    name = f"{Stats.__module__}.{Stats.__qualname__}".encode()
    assert Stats._flat_key == zlib.crc32(name, flat.source_fingerprint(PACKAGE))
    copy = _copy_sources(tmp_path / "semclip_kernels")
    values = copy / "backends" / "values.py"
    values.write_text(values.read_text() + "\n# one more line\n")
    assert zlib.crc32(name, flat.source_fingerprint(copy)) != Stats._flat_key
