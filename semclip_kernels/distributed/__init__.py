"""The loss over the global batch of a `torch.distributed` job (docs/contract.md §5).

- `global_batch`: the entry point (`distributed_loss`), its options (`RankGroup`) and the cross-rank checks.
- `collectives`: all-gather and reductions with autograd.
- `ring`: column blocks passed rank to rank instead of all-gathered.
"""

from .global_batch import MODES, RankGroup, distributed_loss

__all__ = ["MODES", "RankGroup", "distributed_loss"]
