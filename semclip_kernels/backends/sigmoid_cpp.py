"""The compiled, fused CPU kernel of the sigmoid pair sum (csrc/sigmoid_cpu.cpp, in `semclip_kernels._C`).

A pure kernel: no autograd, no operator registration (`sigmoid_dispatch.py` wires it in). One pass over
cache-sized tiles of `S = τ·A·Cᵀ` computes the pair sum and, for the inputs asked for, its gradients
(docs/siglip.md). Computes in float32 (float64 for float64 inputs); float16/bfloat16 features are upcast
to float32 once (an `O((M + K)·d)` copy) and their gradients cast back.
"""

from __future__ import annotations

import torch

from .dtypes import stat_dtype

try:
    from semclip_kernels import _C
except ImportError as error:  # not built: `auto` falls back, `cpp` explains how to build
    _C = None
    _IMPORT_ERROR = f"{type(error).__name__}: {error}"
else:
    _IMPORT_ERROR = ""

# The softmax kernel's tile (docs/cpu_kernel.md): 256 × 512 float32 logits and their gradients fit a core's L2.
DEFAULT_BLOCK_ROWS = 256
DEFAULT_BLOCK_COLS = 512


def is_available(device: torch.device) -> tuple[bool, str]:
    if device.type != "cpu":
        return False, f"the cpp backend runs on CPU tensors only, got {device.type}"
    if _C is None:
        return False, (
            f"the C++ extension semclip_kernels._C is not built ({_IMPORT_ERROR}); build it with "
            "`pip install --no-build-isolation -e .` from the repository root"
        )
    if not hasattr(_C, "sigmoid_pairs"):
        return False, "the C++ extension semclip_kernels._C predates the sigmoid kernel: rebuild it"
    return True, ""


def pair_sum(
    rows: torch.Tensor,
    cols: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    col_weight: torch.Tensor,
    col_owner: torch.Tensor,
    needs: tuple[bool, bool, bool, bool],
    block_rows: int,
    block_cols: int,
    grad_filter_eps: float,
) -> tuple:
    """`(pair_sum, grad_rows, grad_cols, grad_scale, grad_bias, (tiles, skipped_tiles))` (see
    `sigmoid_torch.pair_sum`)."""
    compute = stat_dtype(rows.dtype)
    outputs = _C.sigmoid_pairs(
        rows.detach().to(compute).contiguous(), cols.detach().to(compute).contiguous(), float(scale), float(bias),
        col_weight.detach().to(compute).contiguous(), col_owner.contiguous(), *needs,
        block_rows, block_cols, grad_filter_eps,
    )  # fmt: skip
    total, grad_rows, grad_cols, grad_scale, grad_bias, stats = outputs
    return (
        total.to(stat_dtype(scale.dtype)),
        grad_rows.to(rows.dtype) if needs[0] else None,
        grad_cols.to(cols.dtype) if needs[1] else None,
        grad_scale.to(scale.dtype) if needs[2] else None,
        grad_bias.to(bias.dtype) if needs[3] else None,
        (int(stats[0]), int(stats[1])),
    )
