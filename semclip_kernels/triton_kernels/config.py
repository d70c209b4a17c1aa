"""Launch configurations of the fused kernels: the one place that turns (d, dtype, options) into constexprs.

Every launcher asks `tile_launch`, `gemm_launch` for a `Launch` (constexprs + warps,
stages, register cap); `benchmarks/kernel_resources.py` compiles the very same `Launch`
objects ahead of time, so what the resource table reports is what the backend runs.

Tiles of `S = τ·A·Cᵀ`. The forward (`lse_forward_kernel`) and the backward's dS panel
(`ds_panel_kernel`) compute their logits with the same helper (`tl_utils.tile_logits`)
from the same `TileConfig`: same BLOCK_M, BLOCK_N, BLOCK_D, warps. The backward's
recomputed logits are then bitwise the forward's, so its softmax weights are normalized
by exactly the statistics they were computed with (docs/contract.md §4).

Tile candidates (`TILE_CANDIDATES`, per operand size): a few tiles, each compiled ahead of
time without spills on sm_80 and sm_90 by every supported Triton version (3.6, 3.8, 3.9:
`python -m benchmarks.kernel_resources --candidates`, docs/triton.md has the table). The
first of each is the default; on a GPU `tuning.select_tile` times the candidates once per
(GPU, d, dtype, Triton version) and caches the fastest (docs/gpu.md). Why these entries:
- 16-bit: 128×64, BLOCK_D 32, 8 warps, 3 stages (default): a float32 [128, 64] accumulator is
  32 registers per thread, leaving room for the dS panel's softmax weights; shared memory per stage
  (BLOCK_M + BLOCK_N)·BLOCK_D·2 = 12 KB. BLOCK_D 64 spills in the dS panel under Triton 3.6 (sm_80,
  capped at 128 registers). Other: 64×128×64 with 8 warps / 3 stages (with 4 warps / 2 stages the dS panel
  needs 255 registers and spills once it folds the positives into dS).
  No 128×128 tile fits the forward on sm_90 (it spills 8-72 bytes with 8 warps, 2 or 3 stages, and
  with 16 warps under Triton 3.6).
- float32: 128×64, BLOCK_D 16, 8 warps, 2 stages (default): BLOCK_D 32 spills 8 bytes in the dS
  panel under Triton 3.9 on sm_90; at 128×128 the full-float32 dot needs 255 registers and spills.
  Other: 64×64×32, 8 warps, 2 stages.
- float64 (gradcheck, tests): 64×64×16, 4 warps; one candidate, never timed.
- The sigmoid kernels (`sigmoid_forward.py`): their row-block kernel also holds the gradient tile and
  three per-row partials, and spills at the tiles above (16-bit on sm_90: 112 bytes; float32: ~490 bytes).
  16-bit: 128×32×64, 8 warps, 3 stages; float32: 32×64×16, 4 warps, 2 stages (64×64×16 with 8 warps
  spills 16 bytes in the column kernel under Triton 3.6, sm_80; 64×32×16 spills under Triton 3.9, sm_90):
  no spills on sm_80 or sm_90 with Triton 3.6, 3.8 and 3.9 (`python -m benchmarks.kernel_resources`).
- Gradient GEMMs (`grad_gemm.py`): an output tile of BLOCK_M (or BLOCK_N) feature rows ×
  BLOCK_OUT_D features, reducing over the panel's tiles one dS tile at a time.
- Small d shrinks BLOCK_D to d rounded up (at least 16): no work on padding.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import triton
import triton.language as tl

from . import tl_utils


@dataclass(frozen=True)
class TileConfig:
    """Tile of `S` shared by the forward and the backward's dS panel."""

    block_m: int
    block_n: int
    block_d: int
    num_warps: int
    num_stages: int
    group_m: int = 8


@dataclass(frozen=True)
class GemmConfig:
    """Output tile width (features), reduction chunk and launch of the gradient GEMMs."""

    block_out_d: int
    num_warps: int
    num_stages: int
    block_k: int | None = None  # None: a whole dS tile side per dot


# Keyed on the operand size in bytes (2: float16/bfloat16, 4: float32, 8: float64); the first is the default.
TILE_CANDIDATES: dict[int, tuple[TileConfig, ...]] = {
    2: (
        TileConfig(block_m=128, block_n=64, block_d=32, num_warps=8, num_stages=3),
        TileConfig(block_m=64, block_n=128, block_d=64, num_warps=8, num_stages=3),
    ),
    4: (
        TileConfig(block_m=128, block_n=64, block_d=16, num_warps=8, num_stages=2),
        TileConfig(block_m=64, block_n=64, block_d=32, num_warps=8, num_stages=2),
    ),
    8: (TileConfig(block_m=64, block_n=64, block_d=16, num_warps=4, num_stages=2),),
}
_SIGMOID_TILES: dict[int, TileConfig] = {
    8: TILE_CANDIDATES[8][0],
    2: TileConfig(block_m=128, block_n=32, block_d=64, num_warps=8, num_stages=3),
    4: TileConfig(block_m=32, block_n=64, block_d=16, num_warps=4, num_stages=2),
}
_GEMMS: dict[int, GemmConfig] = {
    2: GemmConfig(block_out_d=128, num_warps=8, num_stages=3),
    4: GemmConfig(block_out_d=64, num_warps=8, num_stages=2, block_k=16),
    8: GemmConfig(block_out_d=32, num_warps=4, num_stages=1, block_k=16),
}
MIN_BLOCK = 16  # smallest tl.dot dimension
MAX_BLOCK = 256


@dataclass(frozen=True)
class Launch:
    """Everything a kernel launch fixes at compile time: constexprs and launch options."""

    constexprs: dict[str, object] = field(hash=False)
    num_warps: int
    num_stages: int

    def kwargs(self) -> dict[str, object]:
        """Keyword arguments of `kernel[grid](...)`."""
        return dict(self.constexprs, num_warps=self.num_warps, num_stages=self.num_stages)


def _block_from_option(value: int) -> int:
    """A user tile size (PartitionOptions) as a power of two tl.dot accepts."""
    return min(MAX_BLOCK, max(MIN_BLOCK, triton.next_power_of_2(value)))


def _block_d(preferred: int, dim: int) -> int:
    return min(preferred, max(MIN_BLOCK, triton.next_power_of_2(dim)))


def tile_config(
    dim: int, dtype: torch.dtype, block_rows: int | None = None, block_cols: int | None = None
) -> TileConfig:
    """The default tile of the forward and of the dS panel for features of size `dim` and `dtype`.

    `block_rows` / `block_cols` (PartitionOptions) replace its sides. The backend asks
    `tuning.select_tile`, which starts from this tile or from a timed candidate.
    """
    return _tile_from(TILE_CANDIDATES[dtype.itemsize][0], dim, block_rows, block_cols)


def sigmoid_tile_config(
    dim: int, dtype: torch.dtype, block_rows: int | None = None, block_cols: int | None = None
) -> TileConfig:
    """The tile of both sigmoid kernels (the same tile: the column kernel recomputes the row kernel's logits)."""
    return _tile_from(_SIGMOID_TILES[dtype.itemsize], dim, block_rows, block_cols)


def _tile_from(config: TileConfig, dim: int, block_rows: int | None, block_cols: int | None) -> TileConfig:
    config = sized_tile(config, dim)
    if block_rows is not None:
        config = replace(config, block_m=_block_from_option(block_rows))
    if block_cols is not None:
        config = replace(config, block_n=_block_from_option(block_cols))
    return config


def sized_tile(config: TileConfig, dim: int) -> TileConfig:
    """`config` with BLOCK_D shrunk to `dim` rounded up to a power of two (at least 16)."""
    return replace(config, block_d=_block_d(config.block_d, dim))


def tile_candidates(dim: int, dtype: torch.dtype) -> tuple[TileConfig, ...]:
    """The candidate tiles for `dim` and `dtype` (BLOCK_D sized to `dim`; duplicates removed), default first."""
    return tuple(dict.fromkeys(sized_tile(config, dim) for config in TILE_CANDIDATES[dtype.itemsize]))


def gemm_config(dim: int, dtype: torch.dtype) -> GemmConfig:
    config = _GEMMS[dtype.itemsize]
    return replace(config, block_out_d=_block_d(config.block_out_d, dim))


def dot_precision(dtype: torch.dtype) -> str:
    """TF32 for float32 inputs when PyTorch's matmuls may use it (never under the interpreter).

    Read once per forward and saved for its backward: the recompute must use the same dots.
    """
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not tl_utils.INTERPRETED:
        return "tf32"
    return "ieee"


def upcast_dot(dtype: torch.dtype) -> bool:
    """Interpreter work-around for 16-bit tl.dot (see tl_utils.dot_operand)."""
    return tl_utils.INTERPRETED and dtype in (torch.float16, torch.bfloat16)


def acc_dtype(dtype: torch.dtype) -> tl.dtype:
    return tl.float64 if dtype == torch.float64 else tl.float32


def _numeric_constexprs(dtype: torch.dtype, precision: str) -> dict[str, object]:
    return dict(ACC_DTYPE=acc_dtype(dtype), UPCAST_DOT=upcast_dot(dtype), DOT_PRECISION=precision)


def tile_launch(config: TileConfig, dtype: torch.dtype, precision: str, **flags: bool) -> Launch:
    """Launch of a tile kernel (`lse_forward_kernel`, `ds_panel_kernel`); `flags` are its feature constexprs."""
    constexprs = dict(
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_D=config.block_d,
        **_numeric_constexprs(dtype, precision), **flags,
    )  # fmt: skip
    return Launch(constexprs, config.num_warps, config.num_stages)


def gemm_launch(tile: TileConfig, gemm: GemmConfig, dtype: torch.dtype, precision: str, **flags: bool) -> Launch:
    """Launch of a gradient GEMM (`grad_rows_kernel`, `grad_cols_kernel`) over dS tiles of shape `tile`."""
    constexprs = dict(
        BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_OUT_D=gemm.block_out_d,
        BLOCK_K=min(gemm.block_k or MAX_BLOCK, tile.block_m, tile.block_n),
        **_numeric_constexprs(dtype, precision), **flags,
    )  # fmt: skip
    return Launch(constexprs, gemm.num_warps, gemm.num_stages)
