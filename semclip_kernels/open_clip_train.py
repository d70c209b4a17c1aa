"""Moved: open_clip's trainer with SemCLIPLoss is the application `python -m semclip_train.open_clip`.

This module only says so: the library never imports the applications built on it.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

NEW_COMMAND = "python -m semclip_train.open_clip"


def main(argv: Sequence[str] | None = None) -> int:
    print(
        f"python -m semclip_kernels.open_clip_train moved: run `{NEW_COMMAND}` with the same flags (docs/open_clip.md)",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
