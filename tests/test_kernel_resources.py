"""The fused Triton kernels' default configurations compile for sm_80 and sm_90 without spills.

Compiled ahead of time (no GPU needed) with Triton's CUDA backend; resources read
with the cuobjdump in Triton's wheel. The script runs in a child process without
TRITON_INTERPRET (kernels defined under the interpreter cannot be compiled). The
full sweep (every variant, d and dtype) is `python -m benchmarks.kernel_resources`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

kernel_resources = pytest.importorskip("benchmarks.kernel_resources")
_ok, _reason = kernel_resources.cuda_target_status()
pytestmark = pytest.mark.skipif(not _ok, reason=f"this Triton install cannot target CUDA: {_reason}")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_default_configurations_fit(tmp_path):
    out = tmp_path / "resources.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "benchmarks.kernel_resources", "--defaults-only", "--dims", "512",
           "--arch", "80", "90", "--dtypes", "bfloat16", "float32", "--json", str(out)]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    rows = json.loads(out.read_text())
    compiled = {(r["kernel"], r["dtype"], r["arch"]) for r in rows}
    kernels, dtypes, archs = ("lse_forward", "backward"), ("bfloat16", "float32"), (80, 90)
    assert compiled == {(k, t, a) for k in kernels for t in dtypes for a in archs}
    for r in rows:
        assert r["stack_bytes"] == 0 and r["local_bytes"] == 0, r  # no register spills
        assert 0 < r["shared_bytes"] <= r["shared_limit_bytes"], r
        assert 0 < r["registers"] <= 255, r
    assert done.returncode == 0, done.stdout + done.stderr
