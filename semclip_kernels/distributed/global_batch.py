"""The SemCLIP loss over the global batch of a `torch.distributed` job (docs/contract.md §5).

The global batch is every rank's batch concatenated in rank order. Each rank computes
the partitions of *its own* rows against *all* columns, with the backend primitive's
arbitrary rows/columns form (never a local × global matrix):

    row_lse[i]   = Z_i  = log Σ_{c ∈ all columns} exp(τ<I_i, C_c> + bias_c)   local images i
    query_lse[q] = Y(q) = log Σ_{k ∈ all images}  exp(τ<Q_q, I_k>)            local queries q = [T; P]

and `algebra.combine_partitions` turns them into this rank's share `loss_r` of §1 (local
means). With equal local batches, mean_r loss_r is the global loss.

Three ways to bring the other ranks' features ("modes"), one implementation (ring.py):
- "gather": all-gather every rank's images and text columns, then two primitive calls (a ring of
  one step whose group is every rank).
- "ring": the blocks `[C_s; I_s]` travel around the ring (ring.py).
- "hierarchical": a ring across groups of `group_size` consecutive ranks (a node's NVLink
  domain), all-gathering within the group at each step (ring.py).

Gradient semantics follow open_clip's `ClipLoss` for all four combinations of
`local_loss` and `gather_with_grad` (docs/distributed.md has the table).
"""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist

from ..algebra import Columns, combine_partitions, positive_logits
from ..validation import DIRECTIONS, SUPPORTED_DTYPES, LossConfig, SemCLIPInputs
from .collectives import MeanOverRanks, SumScaleGradOverRanks, gather, group_timeout
from .ring import RingConfig, RingPartitions

# "gather": all-gather the columns (open_clip's way); "ring": column blocks travel rank to rank (Inf-CL's way);
# "hierarchical": all-gather within groups of ranks, ring across the groups.
MODES = ("gather", "ring", "hierarchical")


@dataclasses.dataclass(frozen=True)
class RankGroup:
    """Where this process sits in the job and open_clip's options for it, validated when made."""

    rank: int
    world_size: int
    local_loss: bool = False
    gather_with_grad: bool = False
    mode: str = "gather"
    # "hierarchical" only: ranks per group (all-gather inside, ring across). None: the local
    # world size that torchrun sets (LOCAL_WORLD_SIZE), i.e. one group per node.
    group_size: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"distributed_mode must be one of {MODES}, got {self.mode!r}")
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={self.rank}, world_size={self.world_size}")
        if self.mode != "hierarchical":
            if self.group_size is not None:
                raise ValueError(
                    f"group_size applies to distributed_mode='hierarchical' only, got group_size={self.group_size} "
                    f"with distributed_mode={self.mode!r}"
                )
            return
        size = self.group_size
        if size is None:
            local = os.environ.get("LOCAL_WORLD_SIZE", "1" if self.world_size == 1 else None)
            if local is None:
                raise ValueError(
                    "distributed_mode='hierarchical' needs group_size (ranks per group, e.g. GPUs per node); "
                    "it defaults to LOCAL_WORLD_SIZE, which is not set (not launched by torchrun)"
                )
            size = int(local)
        if isinstance(size, bool) or not isinstance(size, int) or size < 1 or self.world_size % size:
            raise ValueError(
                f"group_size must be a positive divisor of world_size={self.world_size}, got {size!r}"
                + (" (from LOCAL_WORLD_SIZE)" if self.group_size is None else "")
            )
        object.__setattr__(self, "group_size", size)  # frozen: resolve the default once, here

    @property
    def ring_group_size(self) -> int:
        """Ranks whose blocks are all-gathered at each ring step: 1 in "ring", `group_size` in
        "hierarchical", everyone in "gather" (a single step)."""
        if self.mode == "gather":
            return self.world_size
        return 1 if self.mode == "ring" else self.group_size

    @property
    def remote_grad(self) -> bool:
        """Gradients of the other ranks' features come home, unless open_clip's
        local_loss=True, gather_with_grad=False (gathered copies are constants there)."""
        return self.gather_with_grad or not self.local_loss

    @property
    def grad_weight(self) -> float:
        """The weight with which each rank differentiates its own share `loss_r` of `L = mean_r loss_r`.

        With local_loss=False the sum over ranks then gives open_clip's feature gradients
        (world_size·dL with gather_with_grad, dL without).
        """
        return 1.0 if self.gather_with_grad else 1.0 / self.world_size


def distributed_loss(inputs: SemCLIPInputs, columns: Columns, config: LossConfig, group: RankGroup) -> torch.Tensor:
    """This rank's SemCLIP loss of the global batch, open_clip's semantics.

    - `local_loss=False`: every rank returns the global loss `L`.
    - `local_loss=True`: rank r returns `loss_r` (its rows and queries against all
      columns and images); the mean over ranks is `L`.
    Gradient on this rank's features (and `τ`):
        local_loss, gather_with_grad = False, False: dL/d(own features), dL/dτ
                                       False, True:  world_size · dL/d(own features), dL/dτ
                                       True,  True:  world_size · dL/d(own features), d loss_r/dτ
                                       True,  False: own rows only (image→text for images,
                                                     text→image for queries), d loss_r/dτ
    """
    _check_process_group(group)
    _check_layout_across_ranks(inputs, columns, config, group)
    if not group.local_loss and _needs_grad(inputs.logit_scale):
        # Every rank returns the global loss but differentiates only its own share: τ's gradient
        # is the sum of the shares.
        scale = SumScaleGradOverRanks.apply(inputs.logit_scale, 1.0 / (group.grad_weight * group.world_size))
        inputs = dataclasses.replace(inputs, logit_scale=scale)

    text_pos, para_pos = _positive_logits(inputs, config.paraphrase_weight, group.remote_grad, config.directions)
    row_lse, query_lse = _ring_partitions(inputs, columns, config, group)
    loss_r = combine_partitions(row_lse, query_lse, text_pos, para_pos, config.paraphrase_weight, config.directions)
    if group.local_loss:
        return loss_r
    return MeanOverRanks.apply(loss_r, group.world_size, group.grad_weight)


def _positive_logits(
    inputs: SemCLIPInputs, paraphrase_weight: float, remote_grad: bool, directions: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if remote_grad:
        return positive_logits(inputs, paraphrase_weight)
    # open_clip with local_loss=True, gather_with_grad=False: s(I_i, T_i) in image→text
    # differentiates the image only, in text→image the text only. Both directions weigh the
    # positives alike, so the mean of the two one-sided copies (bitwise equal values) carries
    # exactly those gradients.
    paraphrase = None if inputs.paraphrase is None else inputs.paraphrase.detach()
    image_side = positive_logits(
        dataclasses.replace(inputs, text=inputs.text.detach(), paraphrase=paraphrase), paraphrase_weight
    )
    if directions == "image_to_text":
        return image_side
    text_side = positive_logits(dataclasses.replace(inputs, image=inputs.image.detach()), paraphrase_weight)
    text_pos = (image_side[0] + text_side[0]) / 2
    para_pos = None if image_side[1] is None else (image_side[1] + text_side[1]) / 2
    return text_pos, para_pos


def _ring_partitions(
    inputs: SemCLIPInputs, columns: Columns, config: LossConfig, group: RankGroup
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every mode (ring.py): one ring per position in a group of ranks.

    Rank r = g·size + l sits at position l of group g; its ring is the ranks at position l of
    every group ("ring" mode: groups of one, a single ring of every rank; "gather": one group of
    every rank, a single step).
    """
    size = group.ring_group_size
    n_groups = group.world_size // size
    position, group_index = group.rank % size, group.rank // size
    # At step t this rank's group holds the blocks of group (g − t): their owners, in member order.
    owners = tuple((group_index - step) % n_groups * size + member for step in range(n_groups)
                   for member in range(size))  # fmt: skip
    ring = RingConfig(
        next_rank=(group_index + 1) % n_groups * size + position,
        prev_rank=(group_index - 1) % n_groups * size + position,
        n_steps=n_groups,
        n_query_cols=columns.n_query_cols,
        backend=config.backend,
        options=config.options,
        remote_grad=group.remote_grad,
        group_size=size,
        group=_intra_group(size) if 1 < size < group.world_size else None,  # None: the default group
        owner_rank=owners,
        world_size=group.world_size,
        keep_gathered=group.mode == "gather",
    )
    return RingPartitions.apply(inputs.image, columns.joined(), inputs.logit_scale, columns.col_bias, ring)


# This process's group of consecutive ranks, per (default process group, group size): creating
# groups is collective, so it happens once, on the first call of every rank.
_intra_groups: dict[tuple[dist.ProcessGroup, int], dist.ProcessGroup] = {}


def _intra_group(size: int) -> dist.ProcessGroup:
    key = (dist.group.WORLD, size)
    if key not in _intra_groups:
        # new_subgroups makes the groups [0, size), [size, 2·size), ...; with the default group's
        # timeout (a new group otherwise gets the backend's default, 30 minutes on Gloo).
        own, _ = dist.new_subgroups(group_size=size, timeout=group_timeout())
        _intra_groups[key] = own
    return _intra_groups[key]


# --------------------------------------------------------------------------- checks


def _needs_grad(tensor: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and tensor.requires_grad


def _check_process_group(group: RankGroup) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("world_size > 1 needs torch.distributed: call torch.distributed.init_process_group first")
    if dist.get_world_size() != group.world_size or dist.get_rank() != group.rank:
        raise ValueError(
            f"rank={group.rank}, world_size={group.world_size} do not match torch.distributed's "
            f"rank={dist.get_rank()}, world_size={dist.get_world_size()}"
        )


def _check_layout_across_ranks(inputs: SemCLIPInputs, columns: Columns, config: LossConfig, group: RankGroup) -> None:
    """Every rank must have the same local layout, τ and weights.

    One small all-gather of a table of integers (the float settings by their bit patterns);
    all ranks see the same table, so all raise together. τ differing across ranks means the
    ranks disagree on the loss itself (DDP keeps parameters in sync, so it is a bug upstream).
    """
    float_bits = torch.tensor(
        [float(inputs.logit_scale.detach()), config.paraphrase_weight, config.hard_negative_weight],
        dtype=torch.float64,
    ).view(torch.int64)
    fields = {
        "local batch size B (image_features.shape[0])": inputs.batch,
        "feature dim d": inputs.image.shape[1],
        "paraphrases per image Pn": inputs.n_paraphrases,
        "negations per image Mn": inputs.n_negations,
        "directions": DIRECTIONS.index(config.directions),  # before the query columns, which it decides
        "text columns K": columns.n_cols,
        "query columns": columns.n_query_cols,
        "feature dtype": SUPPORTED_DTYPES.index(inputs.image.dtype),
        "image_features requires grad": int(_needs_grad(inputs.image)),
        "text/paraphrase/negation requires grad": int(any(_needs_grad(block) for block in columns.blocks)),
        "logit_scale requires grad": int(_needs_grad(inputs.logit_scale)),
        "distributed_mode": MODES.index(group.mode),
        "group_size": group.ring_group_size,
        "logit_scale (bits of its float64 value)": int(float_bits[0]),
        "paraphrase_weight (bits)": int(float_bits[1]),
        "hard_negative_weight (bits)": int(float_bits[2]),
    }
    local = torch.tensor(list(fields.values()), dtype=torch.int64, device=inputs.image.device)
    what = "the exchange of every rank's batch layout (the loss's first exchange)"
    table = gather(local[None], group.world_size, what=what).cpu()  # [world_size, n_fields]
    for column, name in enumerate(fields):
        values = table[:, column].tolist()
        if len(set(values)) == 1:
            continue
        if column == 0:
            raise ValueError(
                f"distributed SemCLIP loss needs the same local batch size on every rank, got {values} "
                "(ranks 0..world_size-1); drop or pad the last incomplete batch (e.g. DataLoader(drop_last=True))"
            )
        if "bits" in name:
            values = torch.tensor(values, dtype=torch.int64).view(torch.float64).tolist()
            name = name.split(" (")[0]
            raise ValueError(
                f"distributed SemCLIP loss: {name} differs across ranks: {values}; every rank must pass the same"
            )
        if name == "distributed_mode":
            values = [MODES[value] for value in values]
        if name == "directions":
            values = [DIRECTIONS[value] for value in values]
        raise ValueError(f"distributed SemCLIP loss: {name} differs across ranks: {values}")
