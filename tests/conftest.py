import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

if not torch.cuda.is_available():  # no GPU: run backend="triton" through Triton's interpreter (before any import)
    os.environ.setdefault("TRITON_INTERPRET", "1")
