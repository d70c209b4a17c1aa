"""backend="triton": determinism, no atomics, float16 at large batch, large logits, the backward-only entry.

Runs through Triton's interpreter on CPU (see conftest.py). The interpreter runs programs one
at a time, so a race could not show here; what the tests pin instead is that the default
forward+backward executes no atomic operation at all (every output has one owner program)
and that repeated calls agree bit for bit.
"""

from __future__ import annotations

import math

import pytest
import torch
import triton
import triton.language as tl
from oracle import make_case, max_norm_rel_err, semclip_loss_float64
from primitive import partitions, partitions_backward

import semclip_kernels as sk
from semclip_kernels.backends.options import PartitionOptions
from semclip_kernels.backends.values import column_mass_bounds

triton_fused = pytest.importorskip("semclip_kernels.backends.triton_fused")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if not triton_fused.is_available(torch.device(DEVICE))[0]:
    pytest.skip(f"Triton backend unavailable: {triton_fused.is_available(torch.device(DEVICE))[1]}",
                allow_module_level=True)

from semclip_kernels.triton_kernels import tl_utils  # noqa: E402

pytestmark = pytest.mark.needs_triton
TILES = {"block_rows": 16, "block_cols": 16}
interpreted_only = pytest.mark.skipif(not tl_utils.INTERPRETED, reason="counts operations of Triton's interpreter")


def features_of(case):
    return [case.image, case.text, case.paraphrase, case.negation]


def loss_and_grads(case, backend: str, loss_factor: float = 1.0, **options):
    leaves = case.leaves()
    for leaf in leaves:
        leaf.grad = None
    loss = sk.semclip_loss(case.image, case.text, case.logit_scale, case.paraphrase, case.negation,
                           backend=backend, **options)  # fmt: skip
    (loss * loss_factor).backward()
    return loss.detach(), [leaf.grad.clone() for leaf in leaves]


def oracle_grads(case, loss_factor: float = 1.0):
    leaves = [leaf.detach().cpu().double().requires_grad_() for leaf in case.leaves()]
    image, text, *extras, scale = leaves
    para, neg = (extras + [None, None])[:2] if len(extras) == 2 else (None, None)
    (semclip_loss_float64(image, text, scale, para, neg) * loss_factor).backward()
    return [leaf.grad for leaf in leaves]


def on_device(case):
    for name in ("image", "text", "paraphrase", "negation", "logit_scale"):
        value = getattr(case, name)
        if value is not None:
            setattr(case, name, value.detach().to(DEVICE).requires_grad_())
    return case


class AtomicCounter:
    """Counts the atomic operations Triton's interpreter executes (every tl.atomic_* goes through these)."""

    def __init__(self, monkeypatch):
        from triton.runtime.interpreter import InterpreterBuilder

        self.count = 0
        for name in ("create_atomic_rmw", "create_atomic_cas"):
            original = getattr(InterpreterBuilder, name)

            def counting(builder, *args, _original=original, **kwargs):
                self.count += 1
                return _original(builder, *args, **kwargs)

            monkeypatch.setattr(InterpreterBuilder, name, counting)


@triton.jit
def _atomic_add_kernel(ptr):
    tl.atomic_add(ptr, 1.0)


@interpreted_only
def test_default_forward_backward_executes_no_atomics(monkeypatch):
    counter = AtomicCounter(monkeypatch)
    # The counter sees atomics when there are some (so a zero below means something).
    total = torch.zeros(1)
    _atomic_add_kernel[(3,)](total)
    assert counter.count == 3 and float(total) == 3.0
    counter.count = 0
    # Default options (filter on), and the unfiltered path; several strips, panels and ragged tiles.
    case = on_device(make_case(37, 24, 1, 2, tau=14.3, seed=3))
    loss_and_grads(case, "triton", **TILES)
    loss_and_grads(case, "triton", grad_filter_eps=0.0, **TILES)
    assert counter.count == 0


def test_repeated_calls_are_bitwise_identical():
    case = on_device(make_case(21, 24, 1, 2, tau=14.3, seed=4))
    first_loss, first_grads = loss_and_grads(case, "triton", **TILES)
    second_loss, second_grads = loss_and_grads(case, "triton", **TILES)
    assert torch.equal(first_loss, second_loss)
    for first, second in zip(first_grads, second_grads):
        assert torch.equal(first, second)


def test_float16_large_batch_keeps_small_weights():
    # The weights dS are ~1e-9 here, below float16's smallest subnormal (6e-8): cast as they are
    # they would flush to zero (the negation gradient then came back 1.5e-2 off float64). The
    # panel stores dS·2^e and the GEMMs undo 2^e in float32.
    # The largest tiles (256×256) keep the interpreter's program count, hence its time, low.
    case = on_device(make_case(2048, 16, 1, 1, tau=14.3, dtype=torch.float16, seed=8, normalize=True))
    _, grads = loss_and_grads(case, "triton", loss_factor=0.05, block_rows=256, block_cols=256)
    expected = oracle_grads(case, loss_factor=0.05)
    for name, grad, ref in zip(("image", "text", "paraphrase", "negation"), grads, expected):
        assert grad.dtype == torch.float16
        err = max_norm_rel_err(grad.cpu(), ref)
        assert err <= 2e-3, f"{name} gradient off by {err:.2e}"


def test_large_logits_within_ten_times_reference_error():
    # Feature norms 5–30 at τ = 100, plain CLIP: logits up to 9e4, where float32 itself limits
    # accuracy (docs/contract.md §4). The backward's logits are bitwise the forward's, so the
    # softmax weights it forms are normalized by the very statistics they came from.
    gen = torch.Generator().manual_seed(0)

    def features(n):
        x = torch.randn(n, 4, generator=gen, dtype=torch.float64)
        return x / x.norm(dim=1, keepdim=True) * torch.empty(n, 1, dtype=torch.float64).uniform_(5, 30, generator=gen)

    image, text = features(74), features(74)
    scale = torch.tensor(100.0)
    expected = oracle_grads(type("Case", (), {"leaves": lambda self: [image, text, scale]})())
    errors = {}
    for backend in ("reference", "triton"):
        leaves = [t.float().clone().to(DEVICE).requires_grad_() for t in (image, text, scale)]
        sk.semclip_loss(leaves[0], leaves[1], leaves[2], backend=backend).backward()
        errors[backend] = [max_norm_rel_err(leaf.grad.cpu(), ref) for leaf, ref in zip(leaves, expected)]
    for name, triton_err, reference_err in zip(("image", "text", "logit_scale"), errors["triton"], errors["reference"]):
        # At least float32's unit roundoff as the reference's error: it can be exact by luck.
        assert triton_err <= 10 * max(reference_err, 2**-24), (name, triton_err, reference_err)


def block_problem(query_cols: int, seed: int = 21):
    """A block of rows and columns with statistics of a larger batch (reference backend, float64)."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randn(27, 36, generator=gen, dtype=torch.float64) / 3
    cols = torch.randn(45, 36, generator=gen, dtype=torch.float64) / 3
    other_rows = torch.randn(10, 36, generator=gen, dtype=torch.float64) / 3
    col_bias = torch.zeros(45, dtype=torch.float64)
    col_bias[query_cols:] = math.log(0.5)
    scale = torch.tensor(4.0, dtype=torch.float64)
    with torch.no_grad():
        row_lse, _ = partitions("reference", rows, cols, scale, col_bias, query_cols, PartitionOptions())
        _, col_lse = partitions("reference", torch.cat([rows, other_rows]), cols, scale, col_bias, query_cols,
                                          PartitionOptions())  # fmt: skip
        row_lse = torch.logaddexp(row_lse, torch.randn(27, generator=gen, dtype=torch.float64))  # other columns
    g_row = torch.rand(27, generator=gen, dtype=torch.float64)
    g_col = torch.rand(query_cols, generator=gen, dtype=torch.float64)
    return rows, cols, scale, col_bias, row_lse, col_lse, g_row, g_col


def block_gradients_float64(rows, cols, scale, col_bias, row_lse, col_lse, g_row, g_col):
    """Gradients of the block's weights `g·exp(S − lse)`, by autograd through a float64 surrogate."""
    query_cols = col_lse.shape[0]
    a, c, s = (t.clone().requires_grad_() for t in (rows, cols, scale))
    logits = s * a @ c.T
    surrogate = (g_row[:, None] * torch.exp(logits + col_bias - row_lse[:, None]).detach() * logits).sum()
    surrogate = surrogate + (g_col * torch.exp(logits[:, :query_cols] - col_lse).detach()
                             * logits[:, :query_cols]).sum()  # fmt: skip
    return torch.autograd.grad(surrogate, [a, c, s])


def to_device32(*tensors):
    return [t.float().to(DEVICE) for t in tensors]


@pytest.mark.parametrize("query_cols", [30, 45])
def test_backward_only_entry_with_given_statistics(query_cols):
    # The distributed ring differentiates a block against global statistics: here the statistics of
    # a larger batch (more rows and columns than the block) computed by the reference backend.
    problem = block_problem(query_cols)
    expected = block_gradients_float64(*problem)
    rows, cols, scale, col_bias, row_lse, col_lse, g_row, g_col = to_device32(*problem)
    actual = partitions_backward(
        "triton", rows, cols, scale, col_bias, query_cols, row_lse, col_lse, g_row, g_col, (True, True, True),
        PartitionOptions(**TILES),
    )  # fmt: skip
    assert actual[0].dtype == torch.float32 and actual[2].shape == ()
    for got, ref in zip(actual, expected):
        assert max_norm_rel_err(got.cpu(), ref) <= 1e-5
    # Only what is needed is computed.
    only_cols = partitions_backward(
        "triton", rows, cols, scale, col_bias, query_cols, row_lse, col_lse, g_row, None, (False, True, False),
        PartitionOptions(**TILES),
    )  # fmt: skip
    assert only_cols[0] is None and only_cols[2] is None and only_cols[1].shape == cols.shape


@pytest.mark.parametrize("panel_cols", [16, 32, None])
@pytest.mark.parametrize("filter_eps", [0.0, 1e-9])
def test_panels_of_any_width(panel_cols, filter_eps):
    # The panel width is the backward's memory knob: one tile column, two, or the default (one panel).
    from semclip_kernels.triton_kernels import backward, config

    problem = block_problem(45, seed=5)
    expected = block_gradients_float64(*problem)
    rows, cols, scale, col_bias, row_lse, col_lse, g_row, g_col = to_device32(*problem)
    tile = config.tile_config(36, torch.float32, 16, 16)
    mass_lb = column_mass_bounds(col_bias, col_lse, row_lse)  # every column is a query here: the filter's bound
    result = backward.partitions_backward(
        rows, cols, scale.reshape(1), col_bias, 45, row_lse, col_lse, mass_lb, g_row, g_col, (True, True, True),
        "ieee", filter_eps, tile, config.gemm_config(36, torch.float32), panel_cols=panel_cols,
    )  # fmt: skip
    assert result.tiles == 2 * 3
    for got, ref in zip((result.grad_rows, result.grad_cols, result.grad_scale), expected):
        assert max_norm_rel_err(got.cpu(), ref) <= 1e-5
