"""The partitions primitive of one named backend, as the tests call it (through the one autograd layer).

    partitions(backend, rows, cols, scale, col_bias, n_query_cols, options) -> (row_lse, query_lse)
    partitions_backward(backend, rows, cols, scale, col_bias, n_query_cols, row_lse, query_lse,
                        g_row, g_query, needs, options) -> (grad_rows, grad_cols, grad_scale)

The backward alone is given statistics computed elsewhere and no column-mass bounds (the filter then
never skips a column whose mass it cannot bound); gradients come back in the inputs' dtypes.
"""

from __future__ import annotations

import torch

from semclip_kernels import backends
from semclip_kernels.backends.options import PartitionOptions
from semclip_kernels.backends.values import Needs, StatGrads, Stats, problem


def partitions(backend: str, rows, cols, scale, col_bias, n_query_cols: int, options: PartitionOptions):
    return backends.partitions(rows, cols, scale, col_bias, n_query_cols, backend=backend, options=options)


def partitions_backward(backend: str, rows, cols, scale, col_bias, n_query_cols: int, row_lse, query_lse,
                        g_row, g_query, needs, options: PartitionOptions):  # fmt: skip
    p = problem(rows.detach(), cols.detach(), scale.detach(), col_bias, n_query_cols, options)
    stats = Stats(row_lse.detach(), query_lse.detach(), row_lse.new_empty(0))
    grads = backends.backward(p, stats, StatGrads(g_row, g_query), Needs(*needs), backend)
    return (
        None if grads.rows is None else grads.rows.to(rows.dtype),
        None if grads.cols is None else grads.cols[0].to(cols.dtype),
        None if grads.scale is None else grads.scale.to(scale.dtype).reshape(scale.shape),
    )


def last_backward_stats(backend: str, device: str | torch.device = "cpu"):
    return backends.last_backward_stats(backend, device)


def opcheck_forward_and_backward(backend: str, rows, cols, scale, col_bias, n_query_cols: int,
                                 options: PartitionOptions, needs_list, bands=()) -> None:  # fmt: skip
    """`torch.library.opcheck` of the backend's registered forward and backward ops (schema, fake
    implementation, autograd registration) on the flat form of this problem."""
    from semclip_kernels.backends.flat import flatten
    from semclip_kernels.backends.values import PositiveBand

    backends.resolve_backend(backend, rows.device)  # loads and registers the backend
    # The bands' entries are also left out of the partitions (`Problem.positives`), as the loss does.
    p = problem(rows, cols, scale, col_bias, n_query_cols, options, tuple(b for b in bands if b[1] >= 1))
    tensors, ints, floats = flatten(p)
    forward_op = getattr(torch.ops.semclip, f"partitions_{backend}_forward")
    backward_op = getattr(torch.ops.semclip, f"partitions_{backend}_backward")
    torch.library.opcheck(forward_op.default, (tensors, ints, floats))
    with torch.no_grad():
        stats = list(forward_op(tensors, ints, floats))
    g_row = torch.rand(rows.shape[0], device=rows.device)
    g_query = torch.rand(n_query_cols, device=rows.device)
    positives = tuple(PositiveBand(first, per_row, torch.rand(rows.shape[0], per_row, device=rows.device))
                      for first, per_row in bands)  # fmt: skip
    grad_tensors, grad_ints, _ = flatten(StatGrads(g_row, g_query, positives))
    grad_ints = flatten(Stats(stats[0], stats[1], stats[2], tuple(stats[3:])))[1] + grad_ints  # stats, then grads
    detached = [t.detach() for t in tensors]
    for needs in needs_list:
        torch.library.opcheck(backward_op.default, (detached, ints, floats, stats, grad_tensors, grad_ints,
                                                    list(needs)))  # fmt: skip
