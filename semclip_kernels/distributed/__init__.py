"""The loss over the global batch of a `torch.distributed` job (docs/contract.md §5).

- `global_batch`: the softmax loss's entry point (`distributed_loss`); `sigmoid_global`: the sigmoid loss's.
- `rank_group`: where this process sits (`RankGroup`) and the cross-rank checks, for both.
- `collectives`: all-gather, reductions and point-to-point exchanges, with autograd.
- `ring`: column blocks passed rank to rank instead of all-gathered.
"""

from .global_batch import distributed_loss
from .rank_group import MODES, RankGroup

__all__ = ["MODES", "RankGroup", "distributed_loss"]
