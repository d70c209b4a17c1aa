"""The values of the partitions primitive (docs/contract.md §7, docs/backends.md): what a backend is given
and what it returns. One owner of their fields, their meaning and their flat form for custom ops.

    Problem    rows [M, d], cols (blocks [K_j, d]), scale, col_bias [K], n_query_cols, options, positives
    Stats      row_lse [M], query_lse [Kq], col_mass_lb [K] (or [0]), aux (backend-private)
    StatGrads  row [M], query [Kq], positives (bands of extra dS entries)
    Needs      which of rows / cols / scale to differentiate
    Grads      rows [M, d], cols (blocks), scale, in the statistics dtype; what the backward did
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from .dtypes import stat_dtype
from .flat import flat_value
from .options import PartitionOptions


@dataclass(frozen=True)
class BackwardStats:
    """What a backward did (informative).

    tiles: tiles of `S = τ·A·Cᵀ` the backward visited.
    skipped_tiles: of those, how many the gradient filter skipped (0 without filtering).
    exact_lines: rows or columns recomputed with per-line shifts because the tile's shared
        shift was unsafe for them (backends without a shared shift report 0).
    """

    tiles: int = 0
    skipped_tiles: int = 0
    exact_lines: int = 0

    @property
    def skipped_fraction(self) -> float:
        return self.skipped_tiles / self.tiles if self.tiles else 0.0

    @staticmethod
    def of(counts: torch.Tensor) -> BackwardStats:
        """From a backward's `[tiles, skipped_tiles, exact_lines]` counts (reading a device tensor synchronizes)."""
        return BackwardStats(*(int(v) for v in counts.tolist()))

    def __add__(self, other: BackwardStats) -> BackwardStats:
        return BackwardStats(
            self.tiles + other.tiles, self.skipped_tiles + other.skipped_tiles, self.exact_lines + other.exact_lines
        )


@flat_value
@dataclass(frozen=True)
class Problem:
    """The log-partitions of `S = scale·rows·colsᵀ` (docs/contract.md §7).

    rows: `[M, d]`. cols: the columns as blocks `[K_j, d]` of the rows' dtype, logically concatenated in
    order (the layer never joins them; `joined_cols` does, for a kernel that needs one matrix).
    scale: 0-dim, statistics dtype. col_bias: `[K]`, statistics dtype (added in the row direction only).
    n_query_cols: the first `Kq` columns, whose column partitions are wanted.
    options: tiles and filter; `None` fields are resolved by the autograd layer (`options.resolved`) before a
        kernel sees the problem.
    positives: bands `(first_col, per_row)` of entries `(i, first_col + i·per_row + p)`, `p < per_row`, left
        out of BOTH partitions (and so of dS: a backward gives them only what a `PositiveBand` adds). A loss
        whose positive logits are its own business (the log1p form, `algebra.combine_partitions`) gets the
        off-positive partitions this way, with no cancellation near convergence. Partitions of disjoint row
        or column sets still combine by log-sum-exp (the positives lie in one of the sets).
    """

    rows: torch.Tensor
    cols: tuple[torch.Tensor, ...]
    scale: torch.Tensor
    col_bias: torch.Tensor
    n_query_cols: int
    options: PartitionOptions = dataclasses.field(default_factory=PartitionOptions)
    positives: tuple[tuple[int, int], ...] = ()

    #: Which `Needs`/`Grads` field differentiates each differentiable field (the autograd layer reads this).
    GRADIENT_FIELDS: ClassVar[dict[str, str]] = {"rows": "rows", "cols": "cols", "scale": "scale"}

    @property
    def n_rows(self) -> int:
        return self.rows.shape[0]

    @property
    def n_cols(self) -> int:
        return sum(block.shape[0] for block in self.cols)

    @property
    def stat_dtype(self) -> torch.dtype:
        return stat_dtype(self.rows.dtype)

    def joined_cols(self) -> torch.Tensor:
        """The columns as one `[K, d]` tensor: the block itself when there is one, else a temporary copy."""
        return self.cols[0] if len(self.cols) == 1 else torch.cat(self.cols)

    def detached(self) -> Problem:
        """The same problem on detached tensors (what kernels read)."""
        return dataclasses.replace(
            self, rows=self.rows.detach(), cols=tuple(c.detach() for c in self.cols), scale=self.scale.detach(),
            col_bias=self.col_bias.detach(),
        )  # fmt: skip


def problem(
    rows: torch.Tensor,
    cols: torch.Tensor | Sequence[torch.Tensor],
    scale: torch.Tensor,
    col_bias: torch.Tensor,
    n_query_cols: int,
    options: PartitionOptions | None = None,
    positives: tuple[tuple[int, int], ...] = (),
) -> Problem:
    """A `Problem` with `cols` given as one tensor or as blocks, `scale` and `col_bias` brought to the
    statistics dtype."""
    blocks = (cols,) if isinstance(cols, torch.Tensor) else tuple(cols)
    stat = stat_dtype(rows.dtype)
    return Problem(rows, blocks, scale.reshape(()).to(stat), col_bias.to(stat), n_query_cols,
                   options or PartitionOptions(), tuple(positives))  # fmt: skip


def positive_entries(
    positives: Sequence[tuple[int, int]], rows: slice, cols: slice, device: torch.device
) -> torch.Tensor | None:
    """`[rows, cols]` boolean mask of the entries in the bands `positives` (`Problem.positives`); None if
    no band reaches the tile."""
    mask = None
    row_ids = torch.arange(rows.start, rows.stop, device=device)[:, None]
    col_ids = torch.arange(cols.start, cols.stop, device=device)[None, :]
    for first_col, per_row in positives:
        slot = col_ids - first_col - row_ids * per_row
        inside = (slot >= 0) & (slot < per_row)
        mask = inside if mask is None else mask | inside
    return mask


@flat_value
@dataclass(frozen=True)
class Stats:
    """What a forward computed: all its backward needs.

    row_lse: `[M]`, `log Σ_c exp(S_ic + b_c)`.
    query_lse: `[Kq]`, `log Σ_i exp(S_iq)` for the query columns.
    col_mass_lb: `[K]` lower bounds of `log Σ_i exp(S_ic + b_c − row_lse_i)` (each column's row-softmax
        mass, what the gradient filter measures a column's weights against), or `[0]`: unknown (the
        filter then skips no tile holding such a column). Masses of disjoint row sets add: their bounds
        combine by logaddexp.
    aux: backend-private tensors the forward hands its own backward (cpp: each tile's max logit).
    own: whether `row_lse` and `query_lse` are this problem's own partitions (its forward's), so that each
        line's weights sum to 1 exactly; False for statistics combined or rebased elsewhere. A backend may
        then write a line's weight total as its gradient (triton: τ's gradient, `triton_kernels.backward`).
    """

    row_lse: torch.Tensor
    query_lse: torch.Tensor
    col_mass_lb: torch.Tensor
    aux: tuple[torch.Tensor, ...] = ()
    own: bool = False

    #: The `StatGrads` field that holds the gradient arriving at each differentiable statistic.
    STAT_GRAD_FIELDS: ClassVar[dict[str, str]] = {"row_lse": "row", "query_lse": "query"}

    @staticmethod
    def like(problem: Problem, dtype: torch.dtype | None = None, col_mass_lb: bool = True) -> Stats:
        """Empty statistics of `problem`'s forward in `dtype` (default: the statistics dtype), no `aux`;
        `col_mass_lb` `[K]`, or `[0]` for a backend without bounds (a kernel's `stats_like`)."""
        dtype, new = dtype or problem.stat_dtype, problem.rows.new_empty
        bounds = new((problem.n_cols if col_mass_lb else 0,), dtype=dtype)
        return Stats(new((problem.n_rows,), dtype=dtype), new((problem.n_query_cols,), dtype=dtype), bounds,
                     own=True)  # fmt: skip

    def rebased(self, row_lse: torch.Tensor, query_lse: torch.Tensor) -> Stats:
        """These statistics' block against the statistics of a larger (global) batch.

        The mass bound used `max_i row_lse_i`; with larger partitions the masses shrink, by at most the
        growth of that maximum: shifting by it keeps every bound valid.
        """
        lb = self.col_mass_lb
        if lb.numel() and self.row_lse.numel():
            growth = row_lse.detach().amax().to(lb.dtype) - self.row_lse.detach().amax().to(lb.dtype)
            lb = lb - growth.clamp_min(0)
        return Stats(row_lse, query_lse, lb, self.aux)


def column_mass_bounds(col_bias: torch.Tensor, col_lse: torch.Tensor, row_lse: torch.Tensor) -> torch.Tensor:
    """`min(0, b_c + col_lse_c − max_i row_lse_i)`: a lower bound of each column's row-softmax mass (log).

    `col_lse [K]` is every column's unbiased log-partition over the rows. NaN propagates (a NaN bound never
    lets the filter skip a tile). Empty rows give -inf (no mass).
    """
    if row_lse.numel() == 0:
        return torch.full_like(col_lse, -math.inf)
    bound = col_bias.to(col_lse.dtype) + col_lse - row_lse.amax().to(col_lse.dtype)
    return torch.where(bound > 0, torch.zeros_like(bound), bound)  # NaN compares false: stays NaN


@flat_value
@dataclass(frozen=True)
class PositiveBand:
    """Extra entries of `dS`: `dS[i, first_col + i·per_row + p] += grad[i, p]` (grad `[M, per_row]`).

    A loss's positive logits `s(A_i, C_c)` enter its gradient through these, inside the kernels' own
    `dS`, where they cancel against the softmax weights in float32 (docs/backends.md).
    """

    first_col: int
    per_row: int
    grad: torch.Tensor

    def columns(self, n_rows: int, device: torch.device) -> torch.Tensor:
        """`[M, per_row]` column index of every entry."""
        rows = torch.arange(n_rows, device=device)[:, None] * self.per_row
        return self.first_col + rows + torch.arange(self.per_row, device=device)[None, :]


@flat_value
@dataclass(frozen=True)
class StatGrads:
    """The gradient arriving at the statistics: `row [M]`, `query [Kq]` (None: zero), and positive bands."""

    row: torch.Tensor | None = None
    query: torch.Tensor | None = None
    positives: tuple[PositiveBand, ...] = ()


@flat_value
@dataclass(frozen=True)
class Needs:
    rows: bool = True
    cols: bool = True
    scale: bool = True

    def any(self) -> bool:
        return self.rows or self.cols or self.scale


@flat_value
@dataclass(frozen=True)
class Grads:
    """A backward's result, each gradient in the statistics dtype (None where not needed).

    cols: one gradient per block of `Problem.cols`, shaped like it.
    counts: what the backward did, `[tiles, skipped_tiles, exact_lines]` int64 (`BackwardStats.of`); a tensor,
        so that a device counter is read only when someone asks.
    """

    rows: torch.Tensor | None
    cols: tuple[torch.Tensor, ...] | None
    scale: torch.Tensor | None
    counts: torch.Tensor

    @staticmethod
    def like(problem, needs: Needs) -> Grads:
        """Empty gradients shaped like `problem`'s differentiable fields (`GRADIENT_FIELDS`), statistics dtype."""
        grads = {}
        for field, grad_field in type(problem).GRADIENT_FIELDS.items():
            value = getattr(problem, field)
            if not getattr(needs, grad_field):
                grads[grad_field] = None
            elif isinstance(value, tuple):
                grads[grad_field] = tuple(block.new_empty(block.shape, dtype=problem.stat_dtype) for block in value)
            else:
                grads[grad_field] = value.new_empty(value.shape, dtype=problem.stat_dtype)
        return Grads(**grads, counts=torch.empty(3, dtype=torch.int64))


def counts(tiles: int, skipped_tiles: int = 0, exact_lines: int = 0) -> torch.Tensor:
    """A backward's counts as `Grads.counts` holds them."""
    return torch.tensor([tiles, skipped_tiles, exact_lines], dtype=torch.int64)


def split_cols(grad_cols: torch.Tensor, problem: Problem) -> tuple[torch.Tensor, ...]:
    """A `[K, d]` column gradient as views shaped like `problem.cols` (no copy)."""
    if len(problem.cols) == 1:
        return (grad_cols.view(problem.cols[0].shape),)
    sizes = [block.shape[0] for block in problem.cols]
    return tuple(part.view(block.shape) for part, block in zip(torch.split(grad_cols, sizes), problem.cols))


_POSITIVE_CHUNK = 1024  # rows per chunk of `add_positive_terms`


def band_block(problem: Problem, band: PositiveBand) -> tuple[int, int]:
    """`(block index, first row in that block)` of the column block that holds all of `band`'s columns."""
    start = 0
    last = band.first_col + problem.n_rows * band.per_row  # one past the band's last column
    for index, block in enumerate(problem.cols):
        stop = start + block.shape[0]
        if start <= band.first_col and last <= stop:
            return index, band.first_col - start
        start = stop
    raise ValueError(
        f"a positive band (first_col={band.first_col}, per_row={band.per_row}, {problem.n_rows} rows) must lie "
        f"within one column block, got blocks of {[b.shape[0] for b in problem.cols]} columns"
    )


def add_positive_terms(problem: Problem, positives: Sequence[PositiveBand], grads: Grads, needs: Needs) -> Grads:
    """Grads plus the positive bands' terms, for a backend that keeps its gradients in float32 (or float64):

        grad_rows_i += τ·Σ_p g_ip·C_c(i,p),   grad_cols_c(i,p) += τ·g_ip·A_i,   grad_τ += Σ g_ip·<A_i, C_c(i,p)>

    in the statistics dtype; the given gradients are updated in place. O(M·n·d) work, no `[K, d]` copy.
    τ's terms are summed in float64 from the bands' own (float64) weights, then added to `grads.scale` once:
    near-duplicate positives get O(1), opposite weights whose dots are 1e-4 apart, so these terms' sum is a
    difference that one float32 rounding of a weight or of a partial sum would dominate.
    """
    stat = problem.stat_dtype
    band_scale = torch.zeros((), dtype=torch.float64, device=problem.rows.device)
    dim = problem.rows.shape[1]
    tau = problem.scale.detach().to(stat)
    for band in positives:
        block, local_first = band_block(problem, band)
        per_row = band.per_row
        partners_all = problem.cols[block].detach().reshape(-1, dim)
        grad_block = grads.cols[block].view(-1, dim) if needs.cols and grads.cols is not None else None
        # In chunks of rows: temporaries of a fixed size, never a feature-sized one (docs/contract.md §3).
        for start in range(0, problem.n_rows, _POSITIVE_CHUNK):
            stop = min(start + _POSITIVE_CHUNK, problem.n_rows)
            cols = slice(local_first + start * per_row, local_first + stop * per_row)
            partners = partners_all[cols].to(stat).view(stop - start, per_row, dim)
            rows = problem.rows.detach()[start:stop].to(stat)
            g = band.grad.detach()[start:stop].to(stat).reshape(stop - start, per_row)
            if needs.rows and grads.rows is not None:
                grads.rows[start:stop].add_(torch.einsum("mn,mnd->md", g, partners).mul_(tau))
            if grad_block is not None:
                grad_block[cols].add_((g[:, :, None] * rows[:, None, :]).reshape(-1, dim).mul_(tau))
            if needs.scale and grads.scale is not None:
                dots = torch.einsum("md,mnd->mn", rows.double(), partners.double())
                weights = band.grad.detach()[start:stop].double().reshape(stop - start, per_row)
                band_scale = band_scale + (weights * dots).sum()
    if not (needs.scale and grads.scale is not None and positives):
        return grads
    return dataclasses.replace(grads, scale=(grads.scale.double() + band_scale).to(grads.scale.dtype))
