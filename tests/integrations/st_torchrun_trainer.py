"""Run by tests/integrations/test_sentence_transformers.py under torchrun (2 Gloo ranks): two SentenceTransformerTrainer
steps (DDP) with CachedMultipleNegativesRankingLoss and with SemCLIPRankingLoss, both gathering across ranks;
rank 0 writes how far apart the parameters ended, and how far they moved, as JSON.

    python -m torch.distributed.run --nproc_per_node 2 tests/integrations/st_torchrun_trainer.py MODEL OUT RESULT_JSON
"""

from __future__ import annotations

import json
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(__file__))

from sentence_transformers.sentence_transformer import losses  # noqa: E402
from st_tiny import load_model, train  # noqa: E402

from semclip_kernels.integrations.sentence_transformers import SemCLIPRankingLoss  # noqa: E402

warnings.filterwarnings("ignore")


def main(model_dir: str, out_dir: str, result: str) -> None:
    ddp = {"ddp_backend": "gloo", "batch": 4}
    theirs = train(model_dir, lambda m: losses.CachedMultipleNegativesRankingLoss(
        m, mini_batch_size=3, gather_across_devices=True), out_dir, **ddp)  # fmt: skip
    ours = train(model_dir, lambda m: SemCLIPRankingLoss(m, mini_batch_size=3, gather_across_devices=True), out_dir,
                 **ddp)  # fmt: skip
    start = {name: p.detach() for name, p in load_model(model_dir).named_parameters()}
    if int(os.environ.get("RANK", "0")) == 0:
        with open(result, "w") as file:
            json.dump({
                "max_param_diff": max(float((ours[n] - theirs[n]).abs().max()) for n in theirs),
                "moved": max(float((theirs[n] - start[n]).abs().max()) for n in theirs if n in start),
            }, file)  # fmt: skip


if __name__ == "__main__":
    main(*sys.argv[1:4])
