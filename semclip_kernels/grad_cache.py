"""Gradient caching: a global batch larger than memory, its loss evaluated once (docs/grad_cache.md).

A contrastive loss couples every sample of the batch with every other, so plain gradient accumulation
(one loss per micro-batch) is not the gradient of the global batch's loss. Gradient caching (GradCache,
Gao et al. 2021) computes exactly that gradient with one micro-batch's activations in memory:

1. encode every micro-batch without grad, keeping only its features (and the random state it started from);
2. evaluate the loss once on all features and backpropagate it to the features (and to anything else the
   loss uses, such as a temperature);
3. encode each micro-batch again, with grad and with the random state of its first pass restored (dropout,
   stochastic depth draw the same masks), and backpropagate its slice of the features' cached gradient.

Parameters receive the gradient of the global batch's loss, accumulated in `.grad` as `loss.backward()`
would leave it; the optimizer step is the caller's. Nothing here depends on open_clip;
`semclip_train.open_clip.grad_cache` uses it inside open_clip's trainer.

    from semclip_kernels import SemCLIPLoss
    from semclip_kernels.grad_cache import grad_cache_backward

    loss_fn = SemCLIPLoss()
    def encode(batch):                                   # one micro-batch -> its features
        images, texts = batch
        return {"image_features": model.encode_image(images, normalize=True),
                "text_features": model.encode_text(texts, normalize=True)}
    micro_batches = [next(loader) for _ in range(8)]     # 8 × 1024 = one global batch of 8192
    loss = grad_cache_backward(micro_batches, encode, lambda f: loss_fn(**f, logit_scale=model.logit_scale.exp()))
    optimizer.step(); optimizer.zero_grad()
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

Features = torch.Tensor | Sequence[torch.Tensor] | dict[str, torch.Tensor]

__all__ = ["CachedStep", "Features", "RandomState", "grad_cache_backward", "grad_cache_forward"]


class RandomState:
    """The global random state a pass draws from: the CPU generator and, once CUDA is in use, every CUDA
    device's generator (dropout and stochastic depth on either device)."""

    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


def _flatten(features: Features, where: str) -> tuple[list[Any], list[torch.Tensor]]:
    """(keys, tensors) of an encode output: a tensor, a tuple/list of tensors or a dict of tensors."""
    if isinstance(features, torch.Tensor):
        keys, tensors = [None], [features]
    elif isinstance(features, dict):
        keys, tensors = list(features), list(features.values())
    elif isinstance(features, (tuple, list)):
        keys, tensors = list(range(len(features))), list(features)
    else:
        raise TypeError(
            f"{where}: encode must return a tensor, a tuple/list of tensors or a dict of tensors, "
            f"got {type(features).__name__}"
        )
    if not tensors:
        raise ValueError(f"{where}: encode returned no tensors")
    for key, tensor in zip(keys, tensors):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{where}: encode's output {key!r} must be a tensor, got {type(tensor).__name__}")
    return keys, tensors


def _rebuild(template: Features, keys: list[Any], tensors: list[torch.Tensor]) -> Features:
    """`tensors` in the structure of `template` (what `loss_fn` receives)."""
    if isinstance(template, torch.Tensor):
        return tensors[0]
    if isinstance(template, dict):
        return dict(zip(keys, tensors))
    return type(template)(tensors) if isinstance(template, tuple) else list(tensors)


def _micro_batch_size(keys: list[Any], tensors: list[torch.Tensor], where: str) -> int:
    """The rows of one micro-batch: the common first dimension of its per-sample outputs (0-dim outputs,
    such as a temperature, are shared by the whole step and have none)."""
    sizes = {key: t.shape[0] for key, t in zip(keys, tensors) if t.dim() > 0}
    if not sizes:
        raise ValueError(
            f"{where}: encode returned only 0-dim tensors; at least one output must be per-sample features [rows, ...]"
        )
    if len(set(sizes.values())) > 1:
        raise ValueError(
            f"{where}: encode's per-sample outputs must share their first dimension (the micro-batch size), got {sizes}"
        )
    return next(iter(sizes.values()))


def grad_cache_backward(
    micro_batches: Sequence[Any],
    encode: Callable[[Any], Features],
    loss_fn: Callable[[Features], torch.Tensor],
    *,
    model: nn.Module | None = None,
    scale_loss: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Backpropagate the loss of the global batch formed by `micro_batches`, evaluating it once.

    Args:
        micro_batches: the micro-batches of one optimizer step (anything `encode` accepts), all of one size.
        encode: one micro-batch -> its features: a tensor, a tuple/list of tensors or a dict of tensors.
            Outputs with a first dimension are per-sample (every one has the micro-batch's rows) and reach
            `loss_fn` concatenated over the micro-batches in order. 0-dim outputs (open_clip's
            `logit_scale.exp()`, `logit_bias`) are shared by the step: `loss_fn` gets the first micro-batch's,
            and their gradient flows back once, through the last micro-batch's second pass.
            It is called twice per micro-batch (without grad, then with grad) under the same random state,
            so it must be a deterministic function of the micro-batch and that state; put autocast inside it.
        loss_fn: the features of the global batch (the structure `encode` returns) -> a scalar loss tensor.
            It runs once; parameters it uses directly (a closure over `model.logit_scale`) get their
            gradient from it, except under DistributedDataParallel (see `model`).
        model: the module `encode` runs, when it is a `DistributedDataParallel` (or anything with
            `no_sync()`): every micro-batch but the last re-encodes under `model.no_sync()`, so the
            gradients are all-reduced once per step. A DDP parameter that `loss_fn` uses directly would
            miss that all-reduce: it raises a ValueError instead (return it from `encode` as a 0-dim output).
        scale_loss: applied to the loss before its backward (`GradScaler.scale` for float16 training).

    Returns:
        The loss of the global batch, detached.

    The random state (CPU, and CUDA once initialized) ends where the first passes left it, as after one
    forward over the micro-batches; the second passes replay their first pass's draws.
    """
    step = grad_cache_forward(micro_batches, encode, loss_fn, model=model, scale_loss=scale_loss, same_size=True)
    step.replay()
    return step.loss


def grad_cache_forward(
    micro_batches: Sequence[Any],
    encode: Callable[[Any], Features],
    loss_fn: Callable[[Features], torch.Tensor],
    *,
    model: nn.Module | None = None,
    scale_loss: Callable[[torch.Tensor], torch.Tensor] | None = None,
    same_size: bool = False,
) -> CachedStep:
    """Steps 1 and 2 of `grad_cache_backward` (first passes, the loss once, its backward to the features);
    `CachedStep.replay` is step 3. For a caller whose backward comes later, from outside (a trainer that
    calls `loss.backward()` on what its loss module returned): replay from a hook on that loss.

    Arguments as `grad_cache_backward`'s, except that micro-batches may differ in size unless `same_size`
    (the last one of a ragged global batch is usually smaller).
    """
    if isinstance(micro_batches, (str, bytes)) or not isinstance(micro_batches, Sequence):
        raise TypeError(
            f"micro_batches must be a sequence (a list) of micro-batches, got {type(micro_batches).__name__}"
        )
    if not micro_batches:
        raise ValueError("micro_batches must hold at least one micro-batch, got an empty sequence")
    if not callable(encode) or not callable(loss_fn):
        raise TypeError("encode and loss_fn must be callables")
    no_sync = getattr(model, "no_sync", None) if model is not None else None

    # 1. First passes: features without grad, and the random state each pass started from.
    states: list[RandomState] = []
    first: list[torch.Tensor] = []  # micro_batches[0]'s outputs
    gathered: list[_GatheredRows | None] = []  # per-sample outputs, written in place as they come
    keys: list[Any] = []
    template: Features | None = None
    sizes: list[int] = []
    with torch.no_grad():
        for index, micro_batch in enumerate(micro_batches):
            where = f"micro_batches[{index}]"
            states.append(RandomState())
            out = encode(micro_batch)
            out_keys, tensors = _flatten(out, where)
            size = _micro_batch_size(out_keys, tensors, where)
            if index == 0:
                keys, template = out_keys, out
                first = [t.detach() for t in tensors]
                gathered = [_GatheredRows(t, len(micro_batches)) if t.dim() > 0 else None for t in first]
            else:
                if out_keys != keys:
                    raise ValueError(f"{where}: encode returned outputs {out_keys}, micro_batches[0] gave {keys}")
                for key, tensor, ref in zip(keys, tensors, first):
                    if tensor.dim() != ref.dim() or tensor.shape[1:] != ref.shape[1:] or tensor.dtype != ref.dtype:
                        raise ValueError(
                            f"{where}: encode's output {key!r} has shape {tuple(tensor.shape)} and dtype "
                            f"{tensor.dtype}, micro_batches[0]'s has {tuple(ref.shape)} and {ref.dtype}"
                        )
                if same_size and size != sizes[0]:
                    raise ValueError(
                        f"{where} has {size} rows, micro_batches[0] has {sizes[0]}: every micro-batch "
                        "of a step must have the same size"
                    )
            sizes.append(size)
            for rows, tensor in zip(gathered, tensors):
                if rows is not None:
                    rows.append(tensor.detach())
            del out, tensors

    # 2. The loss, once, on leaves holding the global batch's features.
    leaves = []
    for rows, ref in zip(gathered, first):
        value = rows.value() if rows is not None else ref.clone()
        leaves.append(value.requires_grad_(value.is_floating_point() or value.is_complex()))
    del first, gathered
    loss = loss_fn(_rebuild(template, keys, leaves))
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise ValueError(
            f"loss_fn must return a scalar tensor, got "
            f"{tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__}"
        )
    guard = _DirectParameterUse(model) if no_sync is not None else contextlib.nullcontext()
    with guard:
        if loss.requires_grad:
            (scale_loss(loss) if scale_loss is not None else loss).backward()
    cached = [leaf.grad for leaf in leaves]
    return CachedStep(loss.detach(), list(micro_batches), encode, states, cached, sizes, no_sync)


class CachedStep:
    """A gradient-cached step after its loss: the loss (detached) and each feature's cached gradient.

    `replay(grad_output)` runs step 3: every micro-batch encoded again with grad, under the random state of
    its first pass, backpropagating `grad_output ×` its slice of the cached gradient. Call it once.
    """

    def __init__(
        self,
        loss: torch.Tensor,
        micro_batches: list[Any],
        encode: Callable[[Any], Features],
        states: list[RandomState],
        cached: list[torch.Tensor | None],
        sizes: list[int],
        no_sync: Callable[[], contextlib.AbstractContextManager] | None,
    ) -> None:
        self.loss = loss
        self.micro_batches, self.encode, self.states = micro_batches, encode, states
        self.cached, self.sizes, self.no_sync = cached, sizes, no_sync

    def replay(self, grad_output: torch.Tensor | None = None) -> None:
        """Step 3; the random state ends where it was when this was called."""
        cached, sizes, no_sync = self.cached, self.sizes, self.no_sync
        if no_sync is None and all(grad is None for grad in cached):
            return  # nothing to backpropagate into the towers (all frozen, or the loss uses none)
        last = len(self.micro_batches) - 1
        before = RandomState()
        try:
            offset = 0
            for index, micro_batch in enumerate(self.micro_batches):
                rows = sizes[index]
                self.states[index].restore()
                sync = contextlib.nullcontext() if no_sync is None or index == last else no_sync()
                # enable_grad: called from a backward hook, this runs where autograd turned grad mode off.
                with sync, torch.enable_grad():
                    _, tensors = _flatten(self.encode(micro_batch), f"micro_batches[{index}]")
                    outputs, grads = [], []
                    for tensor, grad in zip(tensors, cached):
                        if grad is None or not tensor.requires_grad:
                            continue  # unused by the loss, or a frozen tower
                        if tensor.dim() > 0:
                            if tensor.shape[0] != rows:
                                raise RuntimeError(
                                    f"micro_batches[{index}]: encode's second pass returned "
                                    f"{tensor.shape[0]} rows, its first pass {rows}"
                                )
                            outputs.append(tensor)
                            grads.append(_scaled(grad[offset : offset + rows], grad_output))
                        elif index == last:  # a shared output: its gradient once per step
                            outputs.append(tensor)
                            grads.append(_scaled(grad, grad_output))
                    if outputs:
                        torch.autograd.backward(outputs, grads)
                offset += rows
        finally:
            before.restore()
        self.micro_batches, self.cached = [], []  # once: free the inputs and the cached gradients


def _scaled(grad: torch.Tensor, grad_output: torch.Tensor | None) -> torch.Tensor:
    """A slice of a cached gradient times the gradient arriving at the loss (one slice at a time: scaling
    the whole cache first would be a second copy of it)."""
    return grad if grad_output is None else grad * grad_output.to(grad.dtype)


class _GatheredRows:
    """One per-sample output of the first passes, its micro-batches written one after another into a single
    tensor as they come: the global batch's features exist once (a concatenation at the end would hold them
    twice). Room for `n_micro_batches` of the first one's rows; a larger micro-batch later grows it."""

    def __init__(self, first: torch.Tensor, n_micro_batches: int) -> None:
        self.rows = first.new_empty((first.shape[0] * n_micro_batches, *first.shape[1:]))
        self.filled = 0

    def append(self, part: torch.Tensor) -> None:
        end = self.filled + part.shape[0]
        if end > self.rows.shape[0]:
            grown = self.rows.new_empty((max(end, 2 * self.rows.shape[0]), *self.rows.shape[1:]))
            grown[: self.filled].copy_(self.rows[: self.filled])
            self.rows = grown
        self.rows[self.filled : end].copy_(part)
        self.filled = end

    def value(self) -> torch.Tensor:
        return self.rows if self.filled == self.rows.shape[0] else self.rows[: self.filled]


class _DirectParameterUse:
    """Within the block, raise if the loss's backward reaches a parameter of `model` directly: under DDP
    its gradient would never be all-reduced (the reducer only counts gradients of its own forward)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.hit: list[str] = []
        self.handles: list[Any] = []

    def __enter__(self) -> _DirectParameterUse:
        for name, parameter in self.model.named_parameters():
            if parameter.requires_grad:
                self.handles.append(
                    parameter.register_post_accumulate_grad_hook(lambda _, name=name: self.hit.append(name))
                )
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()
        if self.hit and exc[0] is None:
            raise ValueError(
                f"loss_fn uses parameters of model directly ({', '.join(self.hit)}): under "
                "DistributedDataParallel their gradients would not be all-reduced. Return them from "
                "encode (as 0-dim outputs, like open_clip's logit_scale.exp()) instead."
            )
