"""Portable tiled partitions: plain PyTorch ops over tiles of `S = τ·A·Cᵀ`.

Runs on any device. Never holds more than a few `block_rows × block_cols`
tiles at a time (the logits, their exponentials and the weights).

Forward, one pass over the tiles:
    row_lse[i] = logaddexp over column tiles of logsumexp_c(S_ic + bias_c)
    col_lse[c] = logaddexp over row tiles    of logsumexp_i(S_ic)          (c < Kq)
Backward, recomputing each tile once:
    dS_ic   = g_row_i · exp(S_ic + bias_c − row_lse_i) + g_col_c · exp(S_ic − col_lse_c)
    grad_A += τ · dS @ C_tile,  grad_C += τ · dSᵀ @ A_tile,  grad_τ += Σ dS ⊙ (A·Cᵀ)

Eager CPU fast path: one exponential per element. With the tile's max `m`,
`e = exp(S − m)` feeds both directions (row sums `e·β`, column sums `Σ_i e`,
and in the backward `dS = e ⊙ (u ⊗ β + 1 ⊗ v)` with `u_i = g_row_i·e^{m−row_lse_i}`,
`v_c = g_col_c·e^{m−col_lse_c}`, `β = e^{bias}`). A shared shift is exact only
while every line of the tile lies near `m`; a tile where some line does not
(its sum underflows, or `m − lse` could overflow) takes the two-exponential
path with per-line shifts instead. That choice reads the tile's statistics on
the host, so it is taken only in eager mode on CPU: CUDA tensors and code
being compiled by `torch.compile` always take the per-line path, which never
synchronises with the host (the scale stays a tensor too).

Eager CPU tile rows run on a pool of worker threads whose torch ops are each
single-threaded (`torch.get_num_threads()` workers): one OpenMP team per op
would meet at a barrier after every exponential, max and product of a tile, and
on a loaded machine each barrier waits for a descheduled thread (an exp of a
512 × 1024 tile: 0.4 ms alone, 24 ms with two threads beside other processes).
A worker owns its row tiles' outputs; the column accumulations (`col_lse`,
`grad_C`) take turns in row-tile order, so every sum is added in the same order
as one serial loop and the result does not depend on the worker count or on
scheduling.

On CUDA the gradient products run in the inputs' 16-bit dtype; `dS` is scaled
by a power of two before the cast so that small weights do not flush to zero
(docs/contract.md §4), and the scale is undone in float32.
"""

from __future__ import annotations

import math
import os
import queue
import threading
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from .dtypes import stat_dtype
from .values import (
    Grads,
    Needs,
    Problem,
    StatGrads,
    Stats,
    add_positive_terms,
    counts,
    positive_entries,
    split_cols,
)

DEFAULT_BLOCK_ROWS = 512
DEFAULT_BLOCK_COLS = 1024
# A shared-shift row/column sum below e^-50 has lost the line's own maximum to the
# tile's: recompute that tile with per-line shifts.
_MIN_SHARED_SUM = math.exp(-50.0)
# exp(m − lse) above e^20 could overflow once multiplied into a weight, and only then
# could a weight whose exp(S − m) underflowed matter: fall back beyond it.
_MAX_SHARED_EXCESS = 20.0
# A tile's largest |dS| is scaled to below 2^14 before a float16 cast: float16 then keeps
# weights down to 2^-38 of it (its smallest subnormal is 2^-24), instead of flushing every
# weight below 2^-24 absolute (issue: B = 32768 puts off-diagonal weights near 1e-8).
_OPERAND_TARGET_EXPONENT = 14

# The statistics are kept in float64 between forward and backward. Rounded to float32, a log-partition of
# magnitude |lse| carries up to half its ulp into every weight exp(S − lse) (4e-6 at |lse| ≈ 100, 5e-4 at
# 1e4), and those errors do not average out where the loss cancels them against its positive logits (the
# τ gradient with identical rows). Per line, float64 costs nothing.
_PRECISE = torch.float64

differentiable = False


def is_available(device: torch.device) -> tuple[bool, str]:
    return True, ""


def _eager_fast_path(x: torch.Tensor) -> bool:
    """Whether host-side tile decisions are allowed: eager mode on CPU (no device sync, no graph break)."""
    return not x.is_cuda and not torch.compiler.is_compiling()


def _low_precision_products(x: torch.Tensor) -> bool:
    """Whether the gradient products run in the 16-bit input dtype (tensor cores; CUDA only)."""
    return x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`a @ b` in the operands' dtype with float32 (or float64) accumulation and output."""
    if a.dtype in (torch.float32, torch.float64):
        return a @ b
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    # CPU half-precision GEMMs are slow and round their output: upcast the tile.
    return a.float() @ b.float()


def _add_product(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float | torch.Tensor) -> None:
    """`out += alpha · a @ b`, in place, with `b` brought to `a`'s dtype (see `_mm_f32`)."""
    if isinstance(alpha, float) and a.dtype == out.dtype and b.dtype == out.dtype:
        out.addmm_(a, b, alpha=alpha)
    else:
        out.add_(_mm_f32(a, b.to(a.dtype)) * alpha)


def scaled_to_operand_dtype(grad_logits: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """`(dS · 2^k cast to dtype, 2^-k)`: a power-of-two scale that puts the tile's largest |dS| below 2^14.

    Powers of two scale exactly, so undoing the scale in float32 (multiplying the products by the
    returned factor) loses nothing; the cast then flushes only weights below 2^-38 of the tile's
    largest. Computed on the device (no host synchronisation); an all-zero or non-finite tile keeps
    factor 1 (NaN and inf still reach the products).
    """
    largest = grad_logits.abs().amax()
    _, exponent = torch.frexp(largest)  # largest = mantissa · 2^exponent, mantissa in [0.5, 1)
    usable = torch.isfinite(largest) & (largest > 0)
    shift = torch.where(usable, _OPERAND_TARGET_EXPONENT - exponent, torch.zeros_like(exponent))
    scaled = torch.ldexp(grad_logits, shift.to(grad_logits.dtype)).to(dtype)
    return scaled, torch.ldexp(torch.ones((), dtype=grad_logits.dtype, device=grad_logits.device),
                               (-shift).to(grad_logits.dtype))


def _scaled_dots(a: torch.Tensor, b: torch.Tensor, tau: float | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The logits tile `τ · a @ bᵀ` in float32 (float64), the scale folded into the product when it is a float."""
    if isinstance(tau, float) and a.dtype == dtype:
        return torch.addmm(torch.zeros((), dtype=dtype, device=a.device), a, b.T, beta=0, alpha=tau)
    return _mm_f32(a, b.T).mul_(tau)


def _tiles(n: int, block: int) -> list[slice]:
    return [slice(start, min(start + block, n)) for start in range(0, n, block)]


def _tile_workers(x: torch.Tensor) -> int:
    """Threads for the tile rows: `torch.get_num_threads()` in eager CPU mode, else 1 (the caller's thread).

    An active dispatch mode (a tracer, a memory probe) sees only its own thread's ops: it gets the caller's.
    """
    if not _eager_fast_path(x) or is_in_torch_dispatch_mode():
        return 1
    return torch.get_num_threads()


class _ColumnTurns:
    """Row tile `i` adds into column tile `j`'s accumulators only after row tile `i − 1` has."""

    def __init__(self, n_row_tiles: int, n_col_tiles: int, threaded: bool) -> None:
        self._done = [[threading.Event() for _ in range(n_col_tiles)] for _ in range(n_row_tiles)] if threaded else None

    def turn(self, i: int, j: int) -> _Turn:
        return _Turn(self._done, i, j)

    def finish_row(self, i: int) -> None:
        """Release every turn of row tile `i` (after it raised: its successors must not wait forever)."""
        if self._done is not None:
            for done in self._done[i]:
                done.set()


class _Turn:
    def __init__(self, done: list[list[threading.Event]] | None, i: int, j: int) -> None:
        self._done, self._i, self._j = done, i, j

    def __enter__(self) -> None:
        if self._done is not None and self._i > 0:
            self._done[self._i - 1][self._j].wait()

    def __exit__(self, *exc) -> None:
        if self._done is not None:
            self._done[self._i][self._j].set()


class _SingleThreadedWorkers:
    """Daemon threads whose torch ops each run on one thread (their own `torch.set_num_threads(1)`)."""

    def __init__(self, n: int) -> None:
        self.tasks: queue.SimpleQueue = queue.SimpleQueue()
        threads_before = torch.get_num_threads()
        ready = threading.Barrier(n + 1)
        for _ in range(n):
            threading.Thread(target=self._serve, args=(ready,), daemon=True, name="semclip-torch-tiles").start()
        ready.wait()
        # Each worker's set_num_threads(1) also set the count that threads started later begin with: restore it
        # (the workers keep their own).
        torch.set_num_threads(threads_before)

    def _serve(self, ready: threading.Barrier) -> None:
        torch.set_num_threads(1)
        ready.wait()
        while True:
            task = self.tasks.get()
            task()


_workers: dict[int, _SingleThreadedWorkers] = {}
_workers_lock = threading.Lock()


def _forget_workers_after_fork() -> None:
    """A forked child (a DataLoader worker) has none of the parent's threads: it starts its own."""
    global _workers_lock
    _workers.clear()
    _workers_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_workers_after_fork)


def _single_threaded_workers(n: int) -> _SingleThreadedWorkers:
    with _workers_lock:
        if n not in _workers:
            _workers[n] = _SingleThreadedWorkers(n)
        return _workers[n]


def _run_row_tiles(
    n_row_tiles: int, n_col_tiles: int, row_tile: Callable[[int, _ColumnTurns], None], n_workers: int
) -> None:
    """`row_tile(i, turns)` for every row tile `i`, on `n_workers` single-threaded workers (1: this thread).

    Workers take the row tiles in increasing order, so the earliest unfinished one never waits for a turn.
    """
    n_workers = min(n_workers, n_row_tiles)
    if n_workers <= 1:
        turns = _ColumnTurns(n_row_tiles, n_col_tiles, threaded=False)
        for i in range(n_row_tiles):
            row_tile(i, turns)
        return
    turns = _ColumnTurns(n_row_tiles, n_col_tiles, threaded=True)
    next_row = iter(range(n_row_tiles))
    lock = threading.Lock()
    errors: list[BaseException] = []
    finished = threading.Semaphore(0)
    # Thread-local modes: the workers take the caller's.
    grad_enabled, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def drive() -> None:
        try:
            with torch.inference_mode(inference), torch.set_grad_enabled(grad_enabled):
                drive_rows()
        finally:
            finished.release()

    def drive_rows() -> None:
        while True:
            with lock:
                i = None if errors else next(next_row, None)
            if i is None:
                return
            try:
                row_tile(i, turns)
            except BaseException as error:  # re-raised in the caller's thread
                with lock:
                    errors.append(error)
                turns.finish_row(i)

    workers = _single_threaded_workers(n_workers)
    for _ in range(n_workers):
        workers.tasks.put(drive)
    for _ in range(n_workers):
        finished.acquire()
    if errors:
        raise errors[0]


def _split(lse: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """`lse = hi + lo` in `dtype`: `(S − hi) − lo` keeps float64's precision in float32 arithmetic."""
    hi = lse.to(dtype)
    return hi, (lse - hi.to(lse.dtype)).to(dtype)


def _line_lse(logits: torch.Tensor, bias: torch.Tensor | None, dim: int) -> torch.Tensor:
    """`log Σ exp(S + bias)` along `dim`, in float64, shifted by the line's max logit before the bias is added.

    `(S − max) + bias` is exact where `S + bias` would round at the magnitude of S.
    """
    line_max = logits.amax(dim, keepdim=True)
    shift = torch.where(torch.isfinite(line_max), line_max, torch.zeros_like(line_max))
    shifted = logits - shift
    if bias is not None:
        shifted = shifted + bias
    # log Σ exp(shifted) is small (at most log K), so float32 keeps it to ~5e-7 absolute.
    return torch.logsumexp(shifted, dim).to(torch.float64) + shift.squeeze(dim).to(torch.float64)


def _per_line_lse(logits: torch.Tensor, bias: torch.Tensor, n_q: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _line_lse(logits, bias, 1), _line_lse(logits[:, :n_q], None, 0)


def _shared_shift_lse(logits: torch.Tensor, bias: torch.Tensor, n_q: int, mask: torch.Tensor | None = None):
    """Both directions' log-sum-exps from one `exp(S − m)`; None where the shared shift is unsafe.

    `mask`: the tile's left-out entries; a line made only of them sums to 0 exactly (lse -inf), which is
    not an underflow."""
    tile_max = logits.max()
    if not math.isfinite(float(tile_max)):  # every entry left out (or inf/NaN): the per-line path
        return None
    exps = logits.sub_(tile_max).exp_()  # the logits are not needed afterwards
    row_sum = exps @ bias.exp() if bool(bias.any()) else exps.sum(1)
    col_sum = exps[:, :n_q].sum(0)
    row_seen, col_seen = row_sum, col_sum
    if mask is not None:
        row_seen = row_sum.masked_fill(mask.all(1), 1.0)
        col_seen = col_sum.masked_fill(mask[:, :n_q].all(0), 1.0)
    smallest = min(float(row_seen.min()), float(col_seen.min()) if n_q else 1.0)
    if smallest < _MIN_SHARED_SUM:  # NaNs compare False and propagate through the fast path
        return None
    tile_max = tile_max.double()
    return row_sum.double().log_().add_(tile_max), col_sum.double().log_().add_(tile_max)


def _per_line_grad_logits(logits, bias, row_lse, col_lse, g_row, g_col) -> torch.Tensor:
    """`dS = g_row ⊙ row softmax + g_col ⊙ column softmax` with per-line shifts."""
    n_q = col_lse.shape[0]
    row_hi, row_lo = _split(row_lse, logits.dtype)
    grad_logits = torch.exp((logits - row_hi[:, None]).sub_(row_lo[:, None]).add_(bias)).mul_(g_row[:, None])
    if n_q:
        col_hi, col_lo = _split(col_lse, logits.dtype)
        col_softmax = torch.exp((logits[:, :n_q] - col_hi).sub_(col_lo))
        grad_logits[:, :n_q].addcmul_(col_softmax, g_col)
    return grad_logits


def _shared_shift_grad_logits(logits, bias, row_lse, col_lse, g_row, g_col) -> torch.Tensor | None:
    """`dS = exp(S − m) ⊙ (u ⊗ e^bias + 1 ⊗ v)`, one exponential per element; None where unsafe."""
    n_q = col_lse.shape[0]
    tile_max = logits.max()
    if not math.isfinite(float(tile_max)):
        return None
    row_excess, col_excess = tile_max.double() - row_lse, tile_max.double() - col_lse
    largest = max(float(row_excess.max()), float(col_excess.max()) if n_q else -math.inf)
    if not largest <= _MAX_SHARED_EXCESS:  # also NaN statistics: the per-line path propagates them
        return None
    u = g_row * row_excess.exp_().to(g_row.dtype)
    v = torch.zeros_like(bias)
    v[:n_q] = g_col * col_excess.exp_().to(g_col.dtype)
    weights = torch.addr(v, u, bias.exp())  # u_i·β_c + v_c
    return logits.sub_(tile_max).exp_().mul_(weights)


def _masked(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The tile with the entries `Problem.positives` leaves out set to -inf (in place)."""
    return logits if mask is None else logits.masked_fill_(mask, -math.inf)


def _forward_tiles(rows, cols, scale, col_bias, n_query_cols, block_rows, block_cols, positives=()):
    """`(row_lse, col_lse)` in float64 (see `_PRECISE`), tile by tile, `positives` left out."""
    dtype = stat_dtype(scale.dtype)
    fast = _eager_fast_path(rows)
    tau = float(scale) if fast else scale.to(dtype)
    n_rows, n_cols = rows.shape[0], cols.shape[0]
    row_lse = torch.full((n_rows,), -math.inf, dtype=_PRECISE, device=rows.device)
    col_lse = torch.full((n_query_cols,), -math.inf, dtype=_PRECISE, device=rows.device)
    row_tiles, col_tiles = _tiles(n_rows, block_rows), _tiles(n_cols, block_cols)

    def row_tile(i: int, turns: _ColumnTurns) -> None:
        r = row_tiles[i]
        for j, c in enumerate(col_tiles):
            mask = positive_entries(positives, r, c, rows.device)
            logits = _masked(_scaled_dots(rows[r], cols[c], tau, dtype), mask)
            n_q = max(0, min(c.stop, n_query_cols) - c.start)
            lse = _shared_shift_lse(logits, col_bias[c], n_q, mask) if fast else None
            if fast and lse is None:  # the shift consumed the logits: recompute them
                logits = _masked(_scaled_dots(rows[r], cols[c], tau, dtype), mask)
            tile_row_lse, tile_col_lse = lse or _per_line_lse(logits, col_bias[c], n_q)
            row_lse[r] = torch.logaddexp(row_lse[r], tile_row_lse)
            with turns.turn(i, j):
                if n_q:
                    q = slice(c.start, c.start + n_q)
                    col_lse[q] = torch.logaddexp(col_lse[q], tile_col_lse)

    _run_row_tiles(len(row_tiles), len(col_tiles), row_tile, _tile_workers(rows))
    return row_lse, col_lse


_MIN_READ_OFF_SCALE = 1e-30  # below it, τ's gradient is summed per tile (as csrc's kernels do)


def _backward_tiles(rows, cols, scale, col_bias, row_lse, col_lse, g_row, g_col, needs, block_rows, block_cols,
                    fast: bool, positives=()):  # fmt: skip
    """`(grad_rows, grad_cols, grad_scale)` in the statistics dtype (None where not needed); lse in float64.

    `fast`: take the eager shared-shift path (decided where `torch.compiler.is_compiling()` is reliable:
    in the forward, or by the caller of the backward-only entry). `positives`: the entries left out of the
    partitions (`Problem.positives`), 0 in dS.
    """
    need_rows, need_cols, need_scale = needs
    dtype = stat_dtype(scale.dtype)
    tau = float(scale) if fast else scale.to(dtype)
    n_rows, n_cols, n_query_cols = rows.shape[0], cols.shape[0], col_lse.shape[0]
    # grad_τ = Σ dS ⊙ A·Cᵀ = Σ_i <grad_A_i, A_i> / τ: read it off a feature gradient after the loop
    # (eager: τ is known on the host), else accumulate it per tile. Below 1e-30 (or at 0) the feature gradient
    # τ·dS·C falls into float32's subnormals and keeps nothing of dτ.
    scale_per_tile = need_scale and not (fast and abs(tau) >= _MIN_READ_OFF_SCALE and (need_rows or need_cols))
    grad_rows = torch.zeros(rows.shape, dtype=dtype, device=rows.device) if need_rows else None
    grad_cols = torch.zeros(cols.shape, dtype=dtype, device=cols.device) if need_cols else None
    # float64 partial sums: τ's gradient is a difference of large, nearly equal terms (the loss's
    # positive logits cancel most of it), so float32 accumulation over B·K products is not enough.
    grad_scale = torch.zeros((), dtype=torch.float64, device=rows.device)
    low_precision = _low_precision_products(rows)
    row_tiles, col_tiles = _tiles(n_rows, block_rows), _tiles(n_cols, block_cols)
    tile_scale_sums = [[None] * len(col_tiles) for _ in row_tiles]

    def row_tile(i: int, turns: _ColumnTurns) -> None:
        r = row_tiles[i]
        for j, c in enumerate(col_tiles):
            q = slice(c.start, max(c.start, min(c.stop, n_query_cols)))
            tile_args = (col_bias[c], row_lse[r], col_lse[q], g_row[r], g_col[q])
            # The logits exactly as the forward computed them (docs/contract.md §4: weights consistent with the
            # statistics); A·Cᵀ for τ's per-tile gradient is that product before the scale, or one of its own.
            if isinstance(tau, float):
                logits = _scaled_dots(rows[r], cols[c], tau, dtype)
                products = _mm_f32(rows[r], cols[c].T) if scale_per_tile else None
            else:
                products = _mm_f32(rows[r], cols[c].T)
                logits = products * tau
            mask = positive_entries(positives, r, c, rows.device)
            logits = _masked(logits, mask)
            grad_logits = _shared_shift_grad_logits(logits, *tile_args) if fast else None
            if grad_logits is None:  # the shared path leaves logits intact when it declines
                grad_logits = _per_line_grad_logits(logits, *tile_args)
            if mask is not None:  # left out of the partitions (a line made only of them has lse = -inf: NaN)
                grad_logits.masked_fill_(mask, 0.0)
            if scale_per_tile:
                tile_scale_sums[i][j] = torch.sum(grad_logits.double() * products.double())
            alpha = tau
            if low_precision:
                grad_logits, inverse = scaled_to_operand_dtype(grad_logits, rows.dtype)
                alpha = tau * inverse
            if need_rows:
                _add_product(grad_rows[r], grad_logits, cols[c], alpha)
            with turns.turn(i, j):
                if need_cols:
                    _add_product(grad_cols[c], grad_logits.T, rows[r], alpha)

    _run_row_tiles(len(row_tiles), len(col_tiles), row_tile, _tile_workers(rows) if fast else 1)
    if scale_per_tile:
        for tile_sums in tile_scale_sums:  # in the serial loop's order
            for tile_sum in tile_sums:
                grad_scale = grad_scale + tile_sum
    if need_scale and not scale_per_tile:
        feature, grad = (rows, grad_rows) if need_rows else (cols, grad_cols)
        # In float64, one row tile at a time: whole float64 copies of the gradient and the features
        # would cost 2·M·d·8 bytes (64 MiB at B = 8192, d = 512), beyond the §3 tile budget.
        for r in row_tiles if need_rows else col_tiles:
            grad_scale = grad_scale + torch.dot(grad[r].double().reshape(-1), feature[r].double().reshape(-1))
        grad_scale = grad_scale / tau
    return grad_rows, grad_cols, grad_scale.to(dtype) if need_scale else None


def _blocks(problem: Problem) -> tuple[int, int]:
    """The tile (the layer resolved the options: `options.resolved`)."""
    return problem.options.block_rows, problem.options.block_cols


def forward(problem: Problem) -> Stats:
    """Row and query-column log-partitions (float64, see `_PRECISE`), tile by tile. This backend does not
    filter gradients: no column-mass bounds."""
    row_lse, query_lse = _forward_tiles(problem.rows, problem.joined_cols(), problem.scale, problem.col_bias,
                                        problem.n_query_cols, *_blocks(problem), problem.positives)  # fmt: skip
    return Stats(row_lse, query_lse, row_lse.new_empty((0,)), own=True)


def stats_like(problem: Problem) -> Stats:
    new = problem.rows.new_empty
    return Stats(new((problem.n_rows,), dtype=_PRECISE), new((problem.n_query_cols,), dtype=_PRECISE),
                 new((0,), dtype=_PRECISE), own=True)  # fmt: skip


def backward(problem: Problem, stats: Stats, grads: StatGrads, needs: Needs) -> Grads:
    """Gradients in the statistics dtype, tile by tile, `problem.positives` left out; the positive bands added
    to the float32 gradients after the tiles (`add_positive_terms`, O(M·n·d)): their τ terms are a difference
    of O(1) weights with near-duplicate positives, summed in float64 there, where a tile's float32 dS (or the
    τ read off the row gradient) would keep 1e-3 of it."""
    dtype = problem.stat_dtype
    row_lse, query_lse = stats.row_lse.to(_PRECISE), stats.query_lse.to(_PRECISE)
    g_row = torch.zeros_like(row_lse, dtype=dtype) if grads.row is None else grads.row.to(dtype)
    g_col = torch.zeros_like(query_lse, dtype=dtype) if grads.query is None else grads.query.to(dtype)
    cols = problem.joined_cols()
    block_rows, block_cols = _blocks(problem)
    grad_rows, grad_cols, grad_scale = _backward_tiles(
        problem.rows, cols, problem.scale, problem.col_bias.to(dtype), row_lse, query_lse, g_row, g_col,
        (needs.rows, needs.cols, needs.scale), block_rows, block_cols, _eager_fast_path(problem.rows),
        problem.positives,
    )  # fmt: skip
    tiles = -(-problem.n_rows // block_rows) * -(-problem.n_cols // block_cols)
    result = Grads(grad_rows, None if grad_cols is None else split_cols(grad_cols, problem), grad_scale, counts(tiles))
    return add_positive_terms(problem, grads.positives, result, needs)
