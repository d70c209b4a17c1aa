"""The positive logits are computed in float64 over chunks of rows (`algebra.POSITIVE_LOGITS_CHUNK`): a batch
spanning several chunks, its last one partial, near convergence (where the positives' digits matter) and at
random features, equals the float64 oracle for every CPU backend. The temperature's gradient is compared at
random features only: near convergence the torch backend's float32 τ-gradient is a known gap of its own
(3e-4 relative at this point, the same before the chunking)."""

from __future__ import annotations

import pytest
import torch
from oracle import max_norm_rel_err, semclip_loss_float64

import semclip_kernels as sk
from semclip_kernels.algebra import POSITIVE_LOGITS_CHUNK

BACKENDS = [name for name in ("reference", "torch", "cpp") if sk.backend_status(name, "cpu")[0]]
BATCH, DIM, PN, MN = 2 * POSITIVE_LOGITS_CHUNK + 37, 8, 2, 1


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def features(spread: float | None) -> list[torch.Tensor]:
    """float64 unit features: random (spread None) or captions/paraphrases near their image, negations 4× farther."""
    gen = torch.Generator().manual_seed(1)
    image = _unit(torch.randn(BATCH, DIM, generator=gen, dtype=torch.float64))

    def near(s: float | None, n: int | None) -> torch.Tensor:
        shape = (BATCH, DIM) if n is None else (BATCH, n, DIM)
        noise = torch.randn(shape, generator=gen, dtype=torch.float64)
        if s is None:
            return _unit(noise)
        return _unit((image if n is None else image[:, None]) + s * noise / DIM**0.5)

    return [image, near(spread, None), near(spread, PN), near(None if spread is None else 4 * spread, MN)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tau, spread", [(30.0, 0.5), (10.0, None)], ids=["near-convergence", "random"])
@pytest.mark.parametrize("directions", ["both", "image_to_text"])
def test_batch_of_several_chunks_equals_the_oracle(backend, tau, spread, directions):
    exact = [t.requires_grad_() for t in features(spread)]
    leaves = [t.detach().float().requires_grad_() for t in exact]
    scale = torch.tensor(tau, requires_grad=True)
    loss = sk.semclip_loss(*leaves[:2], scale, *leaves[2:], backend=backend, directions=directions)
    loss.backward()
    exact_scale = torch.tensor(tau, dtype=torch.float64, requires_grad=True)
    want = semclip_loss_float64(exact[0], exact[1], exact_scale, exact[2], exact[3], directions=directions)
    want.backward()
    assert abs(float(loss.detach()) - float(want)) <= 1e-5 * float(want), (float(loss), float(want))
    compared = [*leaves, scale] if spread is None else leaves
    for name, a, b in zip(("image", "text", "paraphrase", "negation", "scale"), compared, [*exact, exact_scale]):
        assert max_norm_rel_err(a.grad, b.grad) <= 1e-4, name
