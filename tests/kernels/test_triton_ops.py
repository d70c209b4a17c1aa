"""backend="triton" as torch.library custom ops: schema, fake (meta) implementations, autograd, torch.compile.

Runs through Triton's interpreter on CPU (see conftest.py), at toy sizes.
"""

from __future__ import annotations

import math

import pytest
import torch
from primitive import opcheck_forward_and_backward, partitions

from semclip_kernels.backends.options import PartitionOptions

triton_fused = pytest.importorskip("semclip_kernels.backends.triton_fused")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if not triton_fused.is_available(torch.device(DEVICE))[0]:
    pytest.skip(f"Triton backend unavailable: {triton_fused.is_available(torch.device(DEVICE))[1]}",
                allow_module_level=True)

pytestmark = pytest.mark.needs_triton


def inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    rows = (torch.randn(20, 24, generator=gen) / 3).to(DEVICE)
    cols = (torch.randn(36, 24, generator=gen) / 3).to(DEVICE)
    col_bias = torch.zeros(36, device=DEVICE)
    col_bias[24:] = math.log(0.5)
    scale = torch.tensor([5.0], device=DEVICE)
    return rows, cols, scale, col_bias


def test_forward_and_backward_ops_pass_opcheck():
    rows, cols, scale, col_bias = inputs()
    opcheck_forward_and_backward(
        "triton", rows.requires_grad_(), cols.requires_grad_(), scale.reshape(()).requires_grad_(), col_bias, 24,
        PartitionOptions(16, 16, 0.0), ((True, True, True), (False, True, False)), bands=((0, 1), (20, 0)),
    )  # fmt: skip


def test_compiled_fullgraph_matches_eager():
    rows, cols, scale, col_bias = inputs(2)
    options = PartitionOptions(block_rows=16, block_cols=16)

    def objective(a, c, s):
        row_lse, col_lse = partitions("triton", a, c, s, col_bias, 24, options)
        return row_lse.sum() + 0.5 * col_lse.sum()

    results = []
    for fn in (objective, torch.compile(objective, fullgraph=True, backend="aot_eager")):
        leaves = [t.clone().requires_grad_() for t in (rows, cols, scale.reshape(()))]
        value = fn(*leaves)
        value.backward()
        results.append([value.detach()] + [leaf.grad for leaf in leaves])
    for eager, compiled in zip(*results):
        assert torch.equal(eager, compiled)


def test_second_derivatives_raise():
    rows, cols, scale, col_bias = inputs(3)
    rows.requires_grad_()
    row_lse, _ = partitions("triton", rows, cols, scale.reshape(()), col_bias, 24,
                                         PartitionOptions(block_rows=16, block_cols=16))  # fmt: skip
    # One refusal for every backend (backends/ops.py): create_graph=True still gives the first derivatives,
    # and differentiating them again raises, naming the backend.
    (grad,) = torch.autograd.grad(row_lse.sum(), rows, create_graph=True)
    assert grad.shape == rows.shape
    with pytest.raises(RuntimeError, match="backend='triton' does not support double backward.*first derivatives only"):
        torch.autograd.grad(grad.square().sum(), rows)
    (grad,) = torch.autograd.grad(row_lse.sum(), rows)  # first derivatives still work
    assert grad.shape == rows.shape
