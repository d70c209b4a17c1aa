"""Zero-copy text columns: recognise `[T; P; N]` that already lie back to back in one buffer.

The loss lays out its text columns as `[T; P; N]` (docs/contract.md §7). When a training loop
encodes captions, paraphrases and negations in ONE text-tower pass, in the order

    [all captions; all paraphrases (image-major); all negations (image-major)]

the tower's `[K, d]` output already *is* that layout, and the loop hands the loss three views
of it (`out[:B]`, `out[B:B+B·Pn].view(B, Pn, d)`, `out[B+B·Pn:].view(B, Mn, d)`).
`adjacent_view_columns` returns the `[K', d]` tensor covering them without a copy, so that
`torch.cat` (K·d floats kept alive from the forward to the backward) disappears. Anything else
returns None and the caller concatenates as before.

Memory in the backward (measured, see the open_clip integration's report): every autograd path
that reaches the buffer through a *slice* of it (the positives `s(I_i, T_i)` read through
`text = out[:B]`, for instance) makes autograd allocate a zeroed gradient of the whole buffer for
that path and sum them. So the saving is realised only when the loss differentiates the joined
columns once: the positive-term gradients added into the column gradient inside the same
autograd node (e.g. a loss-level Function whose backward calls the backend's backward-only entry
and then adds the positives in place), not through the views.
"""

from __future__ import annotations

import torch


def _rows(block: torch.Tensor, dim: int) -> int:
    """Rows of `dim` features in a `[B, d]` or `[B, n, d]` block."""
    return block.numel() // dim if dim else 0


def adjacent_view_columns(
    text: torch.Tensor,
    paraphrase: torch.Tensor | None = None,
    negation: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """The `[K', d]` tensor covering exactly `[text; paraphrase; negation]` (absent blocks left
    out) without copying, or None when the blocks are not adjacent contiguous views of one buffer.

    Args:
        text: `[B, d]` captions.
        paraphrase: `[B, d]`, `[B, Pn, d]` or None.
        negation: `[B, d]`, `[B, Mn, d]` or None.

    Returns None (never raises) whenever the result could not be built soundly: blocks in another
    order, with gaps or overlaps, non-contiguous, of different dtypes/devices/widths, on different
    storages, views of different autograd bases, or inside a `torch.compile` trace.

    Autograd: the result is differentiable and its gradient reaches the tensor the views came
    from exactly once (see the comment in the body).
    """
    blocks = [b for b in (text, paraphrase, negation) if b is not None]
    if len(blocks) == 1:
        return text  # [T] alone is already the column block; nothing to join
    # Shape checks are the validator's job (it names the argument); here a mismatch only means "not ours".
    if text.dim() != 2 or any(b.dim() not in (2, 3) for b in blocks[1:]):
        return None
    dim = text.shape[-1]
    if any(b.shape[-1] != dim or b.dtype != text.dtype or b.device != text.device for b in blocks):
        return None
    # Under dynamo/fake tensors there is no real storage to compare (and data_ptr would break a
    # fullgraph trace); the compiled graph may fuse the concatenation itself.
    if torch.compiler.is_compiling():
        return None
    # Empty blocks (Pn = 0) add no rows; their storage and offset carry no meaning.
    blocks = [b for b in blocks if b.numel() > 0]
    if len(blocks) == 1:
        return text if blocks[0] is text else None  # B = 0 is invalid anyway: not ours to join
    if not all(b.is_contiguous() for b in blocks):
        return None
    storage = text.untyped_storage().data_ptr()
    if any(b.untyped_storage().data_ptr() != storage for b in blocks):
        return None
    # Row-major contiguous blocks are adjacent (and in this order) iff each starts where the
    # previous one ends, counted in elements of the shared storage.
    for before, after in zip(blocks, blocks[1:]):
        if after.storage_offset() != before.storage_offset() + before.numel():
            return None
    rows = sum(_rows(b, dim) for b in blocks)
    size, stride, offset = (rows, dim), (dim, 1), text.storage_offset()

    needs_grad = [b.requires_grad for b in blocks]
    if not any(needs_grad):
        # No autograd: any of the views addresses the whole storage.
        return text.as_strided(size, stride, offset)
    # Autograd: the loss reads the columns through the result AND the positives through the views
    # themselves (s(I_i, T_i), s(I_i, P_ip)). Both paths must end in the one tensor the views were
    # taken from, so that autograd sums them there, each once. `as_strided` on a view would chain
    # the column gradient through that view's backward into the base, which is also correct but
    # only for the rows of that view's own extent; taking it on the common base (`_base`, the root
    # of every view chain) makes the column gradient land on the base directly, scattered by
    # as_strided's backward into exactly the K'·d elements the columns cover. We require every
    # block to be a view of the same base with the same requires_grad as the base: a block made
    # under no_grad (or detached) must not start receiving gradient through the columns.
    base = text._base
    if base is None or any(b._base is not base for b in blocks):
        return None
    if any(flag != base.requires_grad for flag in needs_grad):
        return None
    if base.is_contiguous() and offset == base.storage_offset() and rows * dim == base.numel():
        # The usual case (the blocks tile the whole tower output): a plain view, whose backward is a
        # reshape of the incoming gradient. as_strided's backward would allocate a zeroed buffer of
        # the base's storage and scatter into it: one more K·d temporary.
        return base.view(size)
    return base.as_strided(size, stride, offset)
