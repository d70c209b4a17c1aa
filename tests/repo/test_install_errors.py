"""Installing without setuptools or without torch fails with one sentence naming the command to run first.

A missing module is simulated in a child interpreter (`sys.modules[name] = None` makes its import fail),
as `pip install --no-build-isolation -e .` meets it in a fresh virtual environment.
"""

from __future__ import annotations

import os
import subprocess
import sys

from harness import REPO_ROOT

REPO = REPO_ROOT


def run_without(module: str, code: str) -> subprocess.CompletedProcess:
    program = f"import sys; sys.modules[{module!r}] = None; {code}"
    env = {k: v for k, v in os.environ.items() if k != "SEMCLIP_SKIP_CPP"}
    return subprocess.run([sys.executable, "-c", program], cwd=REPO, env=env, capture_output=True, text=True)


def test_build_backend_without_setuptools_names_the_command():
    done = run_without("setuptools", "sys.path.insert(0, 'tools'); import semclip_build_backend")
    assert done.returncode != 0
    last_line = done.stderr.strip().splitlines()[-1]
    assert last_line.startswith("ImportError: ") and "run `pip install setuptools wheel torch` first" in last_line


def test_build_backend_is_setuptools():
    done = subprocess.run(
        [sys.executable, "-c", "import sys; sys.path.insert(0, 'tools'); import semclip_build_backend as b; "
         "import setuptools.build_meta as s; assert b.build_editable is s.build_editable; print(sorted(b.__all__))"],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "build_wheel" in done.stdout and "build_editable" in done.stdout


def test_setup_without_torch_names_the_command():
    code = "sys.argv = ['setup.py', '--name']; import runpy; runpy.run_path('setup.py', run_name='__main__')"
    done = run_without("torch", code)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "semclip-kernels builds its C++ kernel against the installed torch: run `pip install torch` first "
        "(README: Install), then `pip install --no-build-isolation -e .` again (SEMCLIP_SKIP_CPP=1: no kernel)"
    ]


def extras_of_setup_py() -> dict[str, list[str]]:
    """setup.py's `extras_require`, read from its source (the one owner of the extras table)."""
    import ast

    with open(os.path.join(REPO, "setup.py"), encoding="utf-8") as handle:
        tree = ast.parse(handle.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "extras_require":
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py has no extras_require")


def test_extras_are_spelled_as_every_pip_asks_for_them():
    # setuptools writes extras normalized (PEP 685: "open_clip" becomes "open-clip"); pip before 23.3 (what
    # `python3.11 -m venv` ships: 23.2.1) compares the name asked for unnormalized, so ".[open_clip]" installed
    # nothing there. A name already in normal form is found by every pip.
    import re

    for name in extras_of_setup_py():
        assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", name), f"extra {name!r} is not in normal form"


def test_documented_install_commands_name_existing_extras():
    import glob
    import re

    extras = set(extras_of_setup_py())
    docs = [path for path in glob.glob("docs/*.md", root_dir=REPO) if path != "docs/CHANGELOG.md"]  # not history
    paths = [".ci/run", "README.md", *docs, *glob.glob("training/**/*.py", root_dir=REPO, recursive=True)]
    unknown = []
    for path in paths:
        with open(os.path.join(REPO, path), encoding="utf-8") as handle:
            text = handle.read()
        for match in re.finditer(r'-e "?\.\[([^\]]+)\]', text):
            unknown += [f"{path}: {name}" for name in match.group(1).split(",") if name not in extras]
    assert not unknown, unknown


def load_setup_py(folder: str) -> dict:
    """The globals of setup.py run from `folder` (`setup.py --name`: nothing is built)."""
    import contextlib
    import io
    import runpy

    argv = sys.argv
    sys.argv = ["setup.py", "--name"]
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return runpy.run_path(os.path.join(folder, "setup.py"), run_name="setup_under_test")
    finally:
        sys.argv = argv


def test_an_unchanged_kernel_is_not_compiled_again(tmp_path, monkeypatch):
    # `pip install -e ".[extra]"` builds in fresh temporary folders: without the build key every install
    # recompiled the kernel (minutes). A copy of the tree, and a stand-in for the compiler that writes a library.
    import shutil

    shutil.copytree(os.path.join(REPO, "csrc"), tmp_path / "csrc")
    shutil.copy(os.path.join(REPO, "setup.py"), tmp_path / "setup.py")
    shutil.copy(os.path.join(REPO, "README.md"), tmp_path / "README.md")
    (tmp_path / "semclip_kernels").mkdir()
    monkeypatch.delenv("SEMCLIP_SKIP_CPP", raising=False)
    monkeypatch.delenv("SEMCLIP_REBUILD_CPP", raising=False)
    setup_globals = load_setup_py(str(tmp_path))
    ext = setup_globals["ext_modules"][0]
    compiled = []

    class StandInBuildExt:  # what setuptools' build_ext does in place: build in a temporary folder, copy back
        def __init__(self, build_folder: str, force: bool = False) -> None:
            self.inplace, self.force, self.build_folder = True, force, build_folder

        def get_ext_filename(self, name: str) -> str:
            return name.replace(".", os.sep) + ".so"

        def get_ext_fullpath(self, name: str) -> str:
            return os.path.join(self.build_folder, self.get_ext_filename(name))

        def build_extension(self, extension) -> None:
            compiled.append(extension.name)
            os.makedirs(os.path.dirname(self.get_ext_fullpath(extension.name)), exist_ok=True)
            with open(self.get_ext_fullpath(extension.name), "w") as handle:
                handle.write(f"library {len(compiled)}")

        def run(self) -> None:
            self.build_extension(ext)
            shutil.copy(self.get_ext_fullpath(ext.name), os.path.join(tmp_path, self.get_ext_filename(ext.name)))

    build_ext = setup_globals["reusing_build_ext"](StandInBuildExt)
    in_place = tmp_path / "semclip_kernels" / "_C.so"

    def install(**kwargs) -> None:  # a fresh temporary build folder each time, as pip gives
        build_ext(str(tmp_path / f"build{len(os.listdir(tmp_path))}"), **kwargs).run()

    install()
    assert compiled == [ext.name] and in_place.read_text() == "library 1"
    install()  # adding an extra: nothing changed
    assert compiled == [ext.name] and in_place.read_text() == "library 1"
    install(force=True)
    assert len(compiled) == 2
    with open(tmp_path / "csrc" / sorted(os.listdir(tmp_path / "csrc"))[0], "a") as handle:
        handle.write("\n// changed\n")
    install()  # a changed source compiles again
    assert len(compiled) == 3 and in_place.read_text() == "library 3"
    install()
    assert len(compiled) == 3
    monkeypatch.setenv("SEMCLIP_REBUILD_CPP", "1")
    install()
    assert len(compiled) == 4
