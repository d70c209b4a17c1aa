"""The Triton kernels' tuning candidates (the default first) compile for sm_80 and sm_90 without spills or atomics.

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

import torch

from benchmarks import kernel_resources
from semclip_kernels.triton_kernels import config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_triton_can_target_cuda():
    # Triton ships with torch's CUDA build (the README's install): its CUDA backend must compile here.
    ok, reason = kernel_resources.cuda_target_status()
    assert ok, f"this Triton install cannot target CUDA: {reason}"


def test_candidate_configurations_fit(tmp_path):
    # Every tuning candidate tile (the default is the first), as the installed Triton compiles it.
    out = tmp_path / "resources.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "benchmarks.kernel_resources", "--defaults-only", "--candidates", "--dims", "512",
           "--arch", "80", "90", "--dtypes", "bfloat16", "float32", "--json", str(out)]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    rows = json.loads(out.read_text())
    compiled = {(r["kernel"], r["dtype"], r["arch"], r["block_m"], r["block_n"]) for r in rows}
    kernels = ("lse_forward", "ds_panel", "grad_rows", "grad_cols")
    dtypes, archs = {"bfloat16": torch.bfloat16, "float32": torch.float32}, (80, 90)
    tiles = {
        name: [(t.block_m, t.block_n) for t in config.tile_candidates(512, dtype)] for name, dtype in dtypes.items()
    }
    sigmoid_tiles = {name: config.sigmoid_tile_config(512, dtype) for name, dtype in dtypes.items()}
    expected = {(k, t, a, *tile) for k in kernels for t in dtypes for a in archs for tile in tiles[t]}
    expected |= {
        (k, t, a, sigmoid_tiles[t].block_m, sigmoid_tiles[t].block_n)
        for k in ("sigmoid_rows", "sigmoid_cols")
        for t in dtypes
        for a in archs
    }
    assert compiled == expected
    for r in rows:
        assert r["stack_bytes"] == 0 and r["local_bytes"] == 0, r  # no register spills
        assert 0 < r["shared_bytes"] <= r["shared_limit_bytes"], r
        assert 0 < r["registers"] <= 255, r
        assert r["atomics"] == 0, r  # the default path has no ATOM*/RED* instruction
        if r["dtype"] == "bfloat16":  # tensor cores: HMMA on sm_80, HGMMA on sm_90
            assert r["tensor_core"] > 0, r
    assert done.returncode == 0, done.stdout + done.stderr


def test_sass_counts_read_opcodes():
    # Predicated and plain instructions count; a warp reduction (REDUX) is not a memory reduction.
    sass = """
        /*0100*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ ;
        /*0110*/              @P0  REDG.E.ADD.F32.FTZ.RN.STRONG.GPU desc[UR6][R2.64], R5 ;
        /*0120*/                   ATOMG.E.CAS.STRONG.GPU PT, R7, [R2.64], R4, R5 ;
        /*0130*/                   REDUX.SUM UR5, R3 ;
        /*0140*/                   HMMA.16816.F32.BF16 R8, R4, R12, R8 ;
    """
    assert kernel_resources.sass_counts(sass) == {"atomics": 2, "tensor_core": 2}
