"""Where this process sits in a `torch.distributed` job (`RankGroup`) and the checks that every rank agrees
(docs/contract.md §5, §8): one owner for both losses.
"""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist

from ..algebra import Columns
from ..validation import DIRECTIONS, SUPPORTED_DTYPES, LossConfig, SemCLIPInputs, check_rank_and_world_size
from .collectives import gather

# "gather": all-gather the columns (open_clip's way); "ring": column blocks travel rank to rank (Inf-CL's way);
# "hierarchical": all-gather within groups of ranks, ring across the groups.
MODES = ("gather", "ring", "hierarchical")


@dataclasses.dataclass(frozen=True)
class RankGroup:
    """Where this process sits in the job and open_clip's options for it, validated when made (the softmax
    and the sigmoid loss alike; the sigmoid loss has no `local_loss`/`gather_with_grad` and no "hierarchical")."""

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
        check_rank_and_world_size(self.rank, self.world_size)
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


# --------------------------------------------------------------------------- checks


def needs_grad(tensor: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and tensor.requires_grad


def check_process_group(group: RankGroup) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("world_size > 1 needs torch.distributed: call torch.distributed.init_process_group first")
    if dist.get_world_size() != group.world_size or dist.get_rank() != group.rank:
        raise ValueError(
            f"rank={group.rank}, world_size={group.world_size} do not match torch.distributed's "
            f"rank={dist.get_rank()}, world_size={dist.get_world_size()}"
        )


def check_layout_across_ranks(
    inputs: SemCLIPInputs, columns: Columns, config: LossConfig, group: RankGroup, loss: str = "SemCLIP loss"
) -> None:
    """Every rank must have the same local layout, τ and weights (both losses; `loss` names it in errors).

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
        "image_features requires grad": int(needs_grad(inputs.image)),
        "text/paraphrase/negation requires grad": int(any(needs_grad(block) for block in columns.blocks)),
        "logit_scale requires grad": int(needs_grad(inputs.logit_scale)),
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
                f"distributed {loss} needs the same local batch size on every rank, got {values} "
                "(local batch size B = image_features.shape[0] of ranks 0..world_size-1); "
                "drop or pad the last incomplete batch (e.g. DataLoader(drop_last=True))"
            )
        if "bits" in name:
            values = torch.tensor(values, dtype=torch.int64).view(torch.float64).tolist()
            name = name.split(" (")[0]
            raise ValueError(
                f"distributed {loss}: {name} differs across ranks: {values}; every rank must pass the same"
            )
        if name == "distributed_mode":
            values = [MODES[value] for value in values]
        if name == "directions":
            values = [DIRECTIONS[value] for value in values]
        raise ValueError(f"distributed {loss}: {name} differs across ranks: {values}")
