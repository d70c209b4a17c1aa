"""The compiled, fused CPU kernel of the sigmoid pair sum (csrc/sigmoid_cpu.cpp, in `semclip_kernels._C`).

A pure kernel: no autograd, no operator registration (the layer's dispatch table lists it). One pass over
cache-sized tiles of `S = τ·A·Cᵀ` computes the pair sum and, for the inputs asked for, its gradients
(docs/siglip.md). Computes in float32 (float64 for float64 inputs); float16/bfloat16 features are upcast
to float32 once (an `O((M + K)·d)` copy) and their gradients cast back.
"""

from __future__ import annotations

import torch

from . import cpp
from .sigmoid_values import PairSums, SigmoidProblem
from .values import Needs

# The softmax kernel's tile (docs/cpu_kernel.md): 256 × 512 float32 logits and their gradients fit a core's L2.
DEFAULT_BLOCK_ROWS = cpp.DEFAULT_BLOCK_ROWS
DEFAULT_BLOCK_COLS = cpp.DEFAULT_BLOCK_COLS
gradients_in_forward = True  # measured in docs/siglip.md


def is_available(device: torch.device) -> tuple[bool, str]:
    ok, reason = cpp.is_available(device)
    if ok and not hasattr(cpp.extension(), "sigmoid_pairs"):
        return False, "the C++ extension semclip_kernels._C predates the sigmoid kernel: rebuild it"
    return ok, reason


def pair_sum(problem: SigmoidProblem, needs: Needs) -> PairSums:
    """`base.SigmoidPairKernels.pair_sum` on the compiled kernel."""
    rows, cols, options = problem.rows, problem.joined_cols(), problem.options
    compute, wanted = problem.stat_dtype, (needs.rows, needs.cols, needs.scale, needs.scale)
    outputs = cpp.extension().sigmoid_pairs(
        rows.detach().to(compute).contiguous(), cols.detach().to(compute).contiguous(), float(problem.scale),
        float(problem.bias), problem.col_weight.detach().to(compute).contiguous(), problem.col_owner.contiguous(),
        *wanted, options.block_rows, options.block_cols, options.grad_filter_eps,
    )  # fmt: skip
    total, grad_rows, grad_cols, grad_scale, grad_bias, stats = outputs
    return PairSums(
        total, grad_rows.to(rows.dtype) if needs.rows else None, grad_cols.to(cols.dtype) if needs.cols else None,
        grad_scale if needs.scale else None, grad_bias if needs.scale else None, (int(stats[0]), int(stats[1])),
    )  # fmt: skip
