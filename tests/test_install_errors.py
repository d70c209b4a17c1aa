"""Installing without setuptools or without torch fails with one sentence naming the command to run first.

A missing module is simulated in a child interpreter (`sys.modules[name] = None` makes its import fail),
as `pip install --no-build-isolation -e .` meets it in a fresh virtual environment.
"""

from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
