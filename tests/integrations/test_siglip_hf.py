"""SemSigLipLoss equals HF transformers' SiglipModel(return_loss=True) loss (docs/contract.md §8), on a tiny
random configuration (no weights downloaded): value and the gradients reaching the model's parameters."""

from __future__ import annotations

import pytest
import torch

import semclip_kernels as sk

transformers = pytest.importorskip("transformers")


def tiny_siglip() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.SiglipConfig(
        text_config={"vocab_size": 99, "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "max_position_embeddings": 16},
        vision_config={"image_size": 16, "patch_size": 4, "hidden_size": 32, "intermediate_size": 37,
                       "num_hidden_layers": 2, "num_attention_heads": 4},
    )  # fmt: skip
    return transformers.SiglipModel(config).eval()


@pytest.mark.parametrize("backend", ["reference", "torch", "cpp"])
def test_equals_hf_siglip_model_loss(backend):
    if not sk.backend_status(backend, "cpu")[0]:
        pytest.skip(f"{backend} unavailable")
    model = tiny_siglip()
    gen = torch.Generator().manual_seed(1)
    pixels = torch.randn(6, 3, 16, 16, generator=gen)
    tokens = torch.randint(1, 99, (6, 10), generator=gen)
    with torch.no_grad():  # the model's bias starts at 0 and its scale at log 1: make both matter
        model.logit_bias.fill_(-3.0)
        model.logit_scale.fill_(2.0)

    out = model(input_ids=tokens, pixel_values=pixels, return_loss=True)
    expected = out.loss
    expected_grads = torch.autograd.grad(expected, list(model.parameters()), allow_unused=True)

    out = model(input_ids=tokens, pixel_values=pixels)
    loss_fn = sk.SemSigLipLoss(backend=backend)
    got = loss_fn(out.image_embeds, out.text_embeds, model.logit_scale.exp(), model.logit_bias)
    got_grads = torch.autograd.grad(got, list(model.parameters()), allow_unused=True)

    assert abs(float(got.detach()) - float(expected.detach())) <= 1e-5 * abs(float(expected.detach()))
    # Relative to the largest gradient entry: some parameters' gradients are ~1e-8, float32 noise of the towers.
    largest = max(float(ref.abs().max()) for ref in expected_grads if ref is not None)
    compared = 0
    for grad, ref in zip(got_grads, expected_grads):
        if ref is None:
            assert grad is None
            continue
        assert float((grad - ref).abs().max()) <= 1e-5 * largest
        compared += 1
    assert compared > 10  # the towers, the scale and the bias
    # The scale's and the bias's own gradients, relative to themselves.
    names = [name for name, _ in model.named_parameters()]
    for name in ("logit_scale", "logit_bias"):
        grad, ref = got_grads[names.index(name)], expected_grads[names.index(name)]
        assert float((grad - ref).abs().max()) <= 1e-4 * float(ref.abs().max()), name
