"""The repository's own promises: CI runs the README's test command, the code is ruff-clean,
and the package's layers only point down (no import cycles)."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys

import pytest
from harness import REPO_ROOT

ROOT = REPO_ROOT


def read(path: str) -> str:
    with open(os.path.join(ROOT, path), encoding="utf-8") as handle:
        return handle.read()


def test_ci_runs_the_readme_test_command_in_a_fresh_venv():
    readme_commands = re.findall(r"^    (pip install .*pytest.*)$", read("README.md"), flags=re.M)
    assert len(readme_commands) == 1, readme_commands
    ci = read(".ci/run")
    assert readme_commands[0] in ci.splitlines()
    assert "python3 -m venv" in ci and "mktemp -d" in ci  # never the machine's own environment


def test_ruff_clean():
    ruff = shutil.which("ruff") or os.path.join(os.path.dirname(sys.executable), "ruff")
    if not os.path.exists(ruff):
        pytest.fail("ruff is not installed: it is part of the [test] extra")
    result = subprocess.run([ruff, "check", "--no-cache", ROOT], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _imports_of(path: str, package: str) -> set[str]:
    """Modules of `package` that the module at `path` imports (relative imports resolved)."""
    module = os.path.relpath(path, ROOT)[: -len(".py")].replace(os.sep, ".").removesuffix(".__init__")
    is_package = path.endswith("__init__.py")
    found = set()
    for node in ast.walk(ast.parse(read(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [f"{target}.{alias.name}" for alias in node.names]
            found.update(n for n in [target, *names] if n.startswith(package))
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith(package))
    return found


@pytest.mark.parametrize("package", ["semclip_kernels", "semclip_train", "training"])
def test_no_import_cycles(package):
    modules = {}
    for folder, _, files in os.walk(os.path.join(ROOT, package)):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                key = os.path.relpath(path, ROOT)[: -len(".py")].replace(os.sep, ".").removesuffix(".__init__")
                modules[key] = path
    graph = {key: {m for m in _imports_of(path, package) if m in modules and m != key} for key, path in modules.items()}

    def is_ancestor_package(a: str, b: str) -> bool:  # a package's __init__ importing its own submodules
        return b.startswith(a + ".")

    visiting, done = [], set()

    def visit(node: str) -> None:
        if node in done:
            return
        if node in visiting:
            cycle = visiting[visiting.index(node) :] + [node]
            pytest.fail("import cycle: " + " -> ".join(cycle))
        visiting.append(node)
        for nxt in sorted(graph[node]):
            if not is_ancestor_package(node, nxt) and not is_ancestor_package(nxt, node):
                visit(nxt)
        visiting.pop()
        done.add(node)

    for key in sorted(graph):
        visit(key)


def test_the_library_never_imports_its_applications():
    # semclip_kernels is the library; semclip_train (open_clip's trainer), training/ and benchmarks/ use it.
    applications = ("semclip_train", "training", "benchmarks")
    offenders = []
    for folder, _, files in os.walk(os.path.join(ROOT, "semclip_kernels")):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                for app in applications:
                    offenders += [f"{os.path.relpath(path, ROOT)}: {m}" for m in sorted(_imports_of(path, app))]
    assert not offenders, offenders


def test_nothing_reads_outside_the_repository():
    # Users have only the clone: data the code or tests need ships in it (training/evaluation_data/).
    outside = ["..", "shared"]
    patterns = ["/".join(outside), '"' + '", "'.join(outside) + '"']
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    offenders = []
    for path in tracked:
        if path == "tests/repo/test_repo.py":  # these patterns themselves
            continue
        if path.endswith((".py", ".md", ".toml", ".cfg", ".txt", ".json", ".sh")) or path == ".ci/run":
            text = read(path)
            offenders += [f"{path}: {pattern}" for pattern in patterns if pattern in text]
    assert not offenders, offenders
