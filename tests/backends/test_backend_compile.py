"""torch.compile and custom ops (issue 11): the cpp kernels and the torch backend's tile loops are
`torch.library` custom ops with fake
implementations and registered autograd (`opcheck`), and `torch.compile(fullgraph=True)` of a function
calling `partitions` works for cpp and torch and matches eager. Compiling takes tens of seconds on two
cores: one small compiled test per backend.
"""

from __future__ import annotations

import math

import pytest
import torch
from primitive import opcheck_forward_and_backward, partitions

from semclip_kernels.backends.options import PartitionOptions

pytestmark = pytest.mark.needs_cpp


def primitive_args(n_rows=12, n_cols=20, n_query=12, dim=8, tau=5.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randn(n_rows, dim, generator=gen) / math.sqrt(dim)
    cols = torch.randn(n_cols, dim, generator=gen) / math.sqrt(dim)
    col_bias = torch.zeros(n_cols)
    col_bias[n_query:] = math.log(0.5)
    return rows, cols, torch.tensor(tau), col_bias, n_query


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_custom_ops_pass_opcheck(backend):
    rows, cols, scale, col_bias, n_query = primitive_args()
    for eps in (1e-10, None):
        opcheck_forward_and_backward(
            backend, rows.requires_grad_(), cols.requires_grad_(), scale.requires_grad_(), col_bias, n_query,
            PartitionOptions(8, 16, eps), ((True, True, True), (True, False, False)), bands=((0, 1),),
        )  # fmt: skip


def objective(module, rows, cols, scale, col_bias, n_query):
    row_lse, col_lse = partitions(module, rows, cols, scale, col_bias, n_query, PartitionOptions(8, 16))
    return (row_lse * torch.linspace(0.5, 1.5, row_lse.shape[0])).sum() + col_lse.sum()


@pytest.mark.parametrize("module", ["cpp", "torch"])
def test_compiled_fullgraph_matches_eager(module):
    torch._dynamo.reset()
    args = primitive_args()
    leaves = [t.clone().requires_grad_() for t in args[:3]]
    eager = objective(module, *leaves, *args[3:])
    eager_grads = torch.autograd.grad(eager, leaves)
    compiled_fn = torch.compile(lambda r, c, s: objective(module, r, c, s, *args[3:]), fullgraph=True)
    leaves_c = [t.clone().requires_grad_() for t in args[:3]]
    compiled = compiled_fn(*leaves_c)
    compiled_grads = torch.autograd.grad(compiled, leaves_c)
    assert abs(float(compiled) - float(eager)) <= 1e-6 * abs(float(eager))
    for got, expected in zip(compiled_grads, eager_grads):
        assert float((got - expected).abs().max()) <= 1e-6 * float(expected.abs().max())
