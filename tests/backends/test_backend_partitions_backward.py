"""The backward-only entry `partitions_backward` of every CPU backend (docs/contract.md §7).

A distributed ring differentiates each travelling block against the global statistics. So here a
global problem is cut into row and column blocks, each block's `partitions_backward` gets the
global `row_lse`/`col_lse` (computed in float64, then rounded to float32 as a real ring would pass
them), and the blocks' gradients, summed, must equal float64 autograd of the global objective.
"""

from __future__ import annotations

import math

import pytest
import torch
from oracle import max_norm_rel_err
from primitive import partitions_backward

from semclip_kernels.backends.options import PartitionOptions

BACKENDS = ("reference", "torch", "cpp")
ROW_BLOCKS = (10, 14)
# (columns, of which query columns first) per column block: each block lays out its queries first.
COL_BLOCKS = ((15, 9), (11, 4))


def global_problem(tau: float, seed: int, norm: float = 2.0):
    gen = torch.Generator().manual_seed(seed)
    dim = 6
    rows = [torch.randn(n, dim, generator=gen, dtype=torch.float64) / math.sqrt(dim) * norm for n in ROW_BLOCKS]
    cols = [torch.randn(k, dim, generator=gen, dtype=torch.float64) / math.sqrt(dim) * norm for k, _ in COL_BLOCKS]
    biases = []
    for k, q in COL_BLOCKS:
        bias = torch.zeros(k, dtype=torch.float64)
        bias[q:] = math.log(0.4)  # negations weighted by β = 0.4
        biases.append(bias)
    g_rows = [torch.rand(n, generator=gen, dtype=torch.float64) for n in ROW_BLOCKS]
    g_cols = [torch.rand(q, generator=gen, dtype=torch.float64) for _, q in COL_BLOCKS]
    return rows, cols, biases, g_rows, g_cols


def float64_global(tau, rows, cols, biases, g_rows, g_cols):
    """Global statistics and the gradients of Σ g_row·row_lse + Σ g_col·col_lse by float64 autograd."""
    rows = [r.clone().requires_grad_() for r in rows]
    cols = [c.clone().requires_grad_() for c in cols]
    scale = torch.tensor(tau, dtype=torch.float64, requires_grad=True)
    all_rows, all_cols, all_bias = torch.cat(rows), torch.cat(cols), torch.cat(biases)
    logits = scale * all_rows @ all_cols.T
    row_lse = torch.logsumexp(logits + all_bias, dim=1)
    blocks = COL_BLOCKS[:len(cols)]
    query = torch.cat([torch.arange(sum(k for k, _ in blocks[:j]), sum(k for k, _ in blocks[:j]) + q)
                       for j, (_, q) in enumerate(blocks)])
    col_lse = torch.logsumexp(logits[:, query], dim=0)
    ((row_lse * torch.cat(g_rows)).sum() + (col_lse * torch.cat(g_cols)).sum()).backward()
    return row_lse.detach(), col_lse.detach(), [r.grad for r in rows], [c.grad for c in cols], scale.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tau,norm", [(5.0, 2.0), (60.0, 1.5)])
def test_blocks_against_global_statistics_sum_to_float64_autograd(backend, tau, norm):
    rows, cols, biases, g_rows, g_cols = global_problem(tau, seed=int(tau), norm=norm)
    row_lse, col_lse, expected_rows, expected_cols, expected_scale = float64_global(
        tau, rows, cols, biases, g_rows, g_cols)
    row_parts = torch.split(row_lse.float(), ROW_BLOCKS)
    col_parts = torch.split(col_lse.float(), [q for _, q in COL_BLOCKS])
    scale = torch.tensor(tau)
    options = PartitionOptions(block_rows=4, block_cols=8)  # several tiles per block
    grad_rows = [torch.zeros(r.shape) for r in rows]
    grad_cols = [torch.zeros(c.shape) for c in cols]
    grad_scale = torch.zeros(())
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            g_r, g_c, g_s = partitions_backward(
                backend, r.float(), c.float(), scale, biases[j].float(), COL_BLOCKS[j][1], row_parts[i], col_parts[j],
                g_rows[i].float(), g_cols[j].float(), (True, True, True), options,
            )
            assert g_r.dtype == torch.float32 and g_c.dtype == torch.float32 and g_s.shape == ()
            grad_rows[i] += g_r
            grad_cols[j] += g_c
            grad_scale += g_s
    for got, expected in zip(grad_rows + grad_cols + [grad_scale], expected_rows + expected_cols + [expected_scale]):
        assert max_norm_rel_err(got, expected) <= 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_the_requested_gradients_come_back(backend):
    rows, cols, biases, g_rows, g_cols = global_problem(3.0, seed=3)
    row_lse, col_lse, expected_rows, _, expected_scale = float64_global(3.0, rows[:1], cols[:1], biases[:1],
                                                                        g_rows[:1], g_cols[:1])
    grads = partitions_backward(
        backend, rows[0].float(), cols[0].float(), torch.tensor(3.0), biases[0].float(), COL_BLOCKS[0][1],
        row_lse.float(), col_lse.float(), g_rows[0].float(), g_cols[0].float(), (True, False, True), PartitionOptions(),
    )
    assert grads[1] is None
    assert max_norm_rel_err(grads[0], expected_rows[0]) <= 1e-4
    assert max_norm_rel_err(grads[2], expected_scale) <= 1e-4
