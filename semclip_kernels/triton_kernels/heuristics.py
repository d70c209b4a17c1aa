"""Block sizes and launch parameters of the fused kernels, from a small table keyed on d and dtype.

The call sites never pick a number: they ask `forward_config` / `backward_config`.
`benchmarks/kernel_resources.py` compiles every entry for sm_80 and sm_90 and
checks registers, spills and shared memory.

Why these entries:
- BLOCK_D is one value per dtype for both kernels (see `_BLOCK_D`).
- The forward keeps one float32 [BLOCK_M, BLOCK_N] accumulator; 128×128 with 8
  warps is the usual tensor-core GEMM tile. Shared memory per pipeline stage is
  (BLOCK_M + BLOCK_N)·BLOCK_D·itemsize = 16 KB for 16-bit, so 4 stages fit
  sm_80 (163 KB) and sm_90 (227 KB). float32 uses 128×64: at 128×128 the
  full-float32 (FMA) dot needs 255 registers and spills on sm_90.
- The backward holds the dots, the softmax weights and dS of a tile, then the
  [BLOCK_M, BLOCK_D] and [BLOCK_N, BLOCK_D] gradient slices, plus 2-D pointer
  tensors for the atomic adds: a 64×64 tile compiles without spills (16-bit:
  4 warps, ~180 registers). float32 needs 8 warps (4 warps spill 4 KB on the
  full-float32 FMA path) and an explicit register cap of 168: left alone,
  ptxas squeezes some variants to 80 registers and spills; at 128 it spills
  on sm_80.
  Measured with benchmarks/kernel_resources.py.
- Small d shrinks BLOCK_D to d rounded up (at least 16), so no work is spent on padding.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton


@dataclass(frozen=True)
class KernelConfig:
    block_m: int
    block_n: int
    block_d: int
    num_warps: int
    num_stages: int
    group_m: int = 8
    maxnreg: int | None = None  # register cap passed to ptxas (None: ptxas decides)


# BLOCK_D per operand size, shared by the forward and the backward: the backward's recomputed
# dots must round exactly like the forward's (same d-slices, same dot), or its softmax weights
# stop summing to 1 against the forward's log-partitions; with logits in the thousands that
# costs 1e-4 in the gradients (tests/test_triton_backward.py::test_large_logits_default_blocks).
_BLOCK_D = {2: 32, 4: 32, 8: 16}
# (kind, operand bytes) -> config for d >= BLOCK_D; see the module docstring.
_TABLE: dict[tuple[str, int], KernelConfig] = {
    ("forward", 2): KernelConfig(block_m=128, block_n=128, block_d=32, num_warps=8, num_stages=4),
    ("forward", 4): KernelConfig(block_m=128, block_n=64, block_d=32, num_warps=8, num_stages=3),
    ("forward", 8): KernelConfig(block_m=64, block_n=64, block_d=16, num_warps=4, num_stages=2),
    ("backward", 2): KernelConfig(block_m=64, block_n=64, block_d=32, num_warps=4, num_stages=2),
    ("backward", 4): KernelConfig(block_m=64, block_n=64, block_d=32, num_warps=8, num_stages=2, maxnreg=168),
    ("backward", 8): KernelConfig(block_m=32, block_n=32, block_d=16, num_warps=4, num_stages=1),
}
assert all(config.block_d == _BLOCK_D[size] for (_, size), config in _TABLE.items())
MIN_BLOCK = 16  # smallest tl.dot dimension
MAX_BLOCK = 256


def _block_from_option(value: int) -> int:
    """A user tile size (PartitionOptions) as a power of two tl.dot accepts."""
    return min(MAX_BLOCK, max(MIN_BLOCK, triton.next_power_of_2(value)))


def _config(
    kind: str, dim: int, dtype: torch.dtype, block_rows: int | None, block_cols: int | None
) -> KernelConfig:
    config = _TABLE[(kind, dtype.itemsize)]
    block_d = min(config.block_d, max(MIN_BLOCK, triton.next_power_of_2(dim)))
    config = replace(config, block_d=block_d)
    if block_rows is not None:
        config = replace(config, block_m=_block_from_option(block_rows))
    if block_cols is not None:
        config = replace(config, block_n=_block_from_option(block_cols))
    return config


def forward_config(
    dim: int, dtype: torch.dtype, block_rows: int | None = None, block_cols: int | None = None
) -> KernelConfig:
    """Launch configuration of `lse_forward_kernel` for features of size `dim` and `dtype`."""
    return _config("forward", dim, dtype, block_rows, block_cols)


def backward_config(
    dim: int, dtype: torch.dtype, block_rows: int | None = None, block_cols: int | None = None
) -> KernelConfig:
    """Launch configuration of `backward_kernel` for features of size `dim` and `dtype`."""
    return _config("backward", dim, dtype, block_rows, block_cols)
